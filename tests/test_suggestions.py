"""Every command sdrecipe prints as a fix or next step runs as printed (issue 11).

Each scenario is a real failure in the tiny world (tests/fetch_fixtures.py: the template
project, its upstream served by a real `git daemon`, model files by the loopback HTTP
mirror), met by `python -m sdrecipe` with a non-default --recipe and --deploy-dir, so a
suggestion missing either would act on another deployment and fail here. `suggestions`
collects every command marked as one (in backticks: `target.suggestion`), and each is
checked in two ways:
- always: the real argparse parser of `sdrecipe` (cli.build_parser) accepts it, and it
  names this recipe, this deployment and this profile;
- where it can run here, it is run through the shell exactly as printed, and the fixing
  one is shown to fix the scenario (status then says the stage is done, or the original
  command gets past the error).
Parsed only, because they cannot run here: `deploy` and `env build` (they build the real
830 MB environment from the lock), `lock` (it resolves against PyPI and the conda channels)
and `env check` after a failed smoke generation (its environment is a stand-in
interpreter that only fails).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fetch_fixtures import isolate, make_project, sha256
from sdrecipe.cli import build_parser
from test_faults import CKPT, tamper_in_place

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "cpu"
SUGGESTION = re.compile(r"`([^`\n]+)`")
# a finding's first line in doctor's output quotes the error a user meets (patch 0003's
# message names `sdrecipe fetch` itself): a quote, not one of doctor's suggestions
QUOTED_SYMPTOM = re.compile(r"^(error|warning) \[")


@pytest.fixture
def tiny(world, tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path, world["mirror"])
    recipe = make_project(world, tmp_path, world["daemon"].url("upstream.git"))
    project = recipe.parents[1]  # the real cpu env and its lock, and a verify section
    shutil.copytree(ROOT / "env", project / "env")
    shutil.copy(ROOT / "lock" / f"{PROFILE}.conda-lock.yml", project / "lock")
    text = recipe.read_text().replace("    accelerator: none\n", "    accelerator: none\n"
                                      f"    env: env/profiles/{PROFILE}.yaml\n")
    recipe.write_text(text + "verify:\n  prompt: a tiny test\n  seed: 42\n")
    return {"recipe": recipe.resolve(), "deploy": tmp_path / "my deploy", "tmp": tmp_path}


def environ() -> dict:
    """This checkout's sdrecipe, whichever way a suggestion spells the program."""
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def sdrecipe(tiny, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(tiny["recipe"]),
                           "--deploy-dir", str(tiny["deploy"]), *args], capture_output=True,
                          text=True, env=environ(), cwd=tiny["tmp"], timeout=300)


def suggestions(text: str) -> list[str]:
    """Every sdrecipe command the output suggests, in order, each once."""
    found = []
    for line in text.splitlines():
        if QUOTED_SYMPTOM.match(line):
            continue
        for command in SUGGESTION.findall(line):
            words = shlex.split(command)
            if words and Path(words[0]).name == "sdrecipe" and command not in found:
                found.append(command)
    return found


def parsed(tiny, command: str):
    """The command as sdrecipe's own parser reads it, checked to be for this deployment."""
    words = shlex.split(command)
    try:
        args = build_parser().parse_args(words[1:])
    except SystemExit:
        pytest.fail(f"not a valid sdrecipe command line: {command}")
    assert args.recipe and Path(args.recipe) == tiny["recipe"], command
    if args.command not in ("lock", "lint", "upstream-lock"):
        assert args.deploy_dir and Path(args.deploy_dir) == tiny["deploy"], command
    if hasattr(args, "profile"):
        assert args.profile == PROFILE, command
    return args


def run_as_printed(tiny, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=environ(),
                          cwd=tiny["tmp"], timeout=300)


def failing(tiny, *args: str, code: int = 2) -> tuple[str, list[str]]:
    """Run a command that must fail with `code`; its output and suggestions, each parsed."""
    done = sdrecipe(tiny, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    if code == 2:  # the one-line error rule
        assert len([l for l in done.stderr.splitlines() if l.startswith("sdrecipe: error:")]) == 1
    found = suggestions(done.stdout + done.stderr)
    assert found, (done.stdout, done.stderr)
    for command in found:
        parsed(tiny, command)
    return done.stdout + done.stderr, found


def verb(tiny, command: str) -> str:
    """`patch apply`, `env build`, `fetch`: the command's verb as the parser read it."""
    args = parsed(tiny, command)
    return " ".join(filter(None, [args.command, getattr(args, "action", None),
                                  getattr(args, "kind", None)]))


def stages(tiny) -> dict:
    done = sdrecipe(tiny, "status", "--profile", PROFILE, "--format", "json")
    return {s["stage"]: s["state"] for s in json.loads(done.stdout)["stages"]}


def test_status_of_an_empty_deployment_suggests_its_own_deploy(tiny):
    text, found = failing(tiny, "status", "--profile", PROFILE, code=1)
    assert [parsed(tiny, c).command for c in found] == ["deploy"]  # parsed only: builds the env
    assert "would run: source, artifacts, patches, env, preseed, verify" in text


def test_verify_before_deploy_says_fetch_and_the_fetch_fixes_it(tiny):
    text, found = failing(tiny, "verify", "--profile", PROFILE)
    assert "is not placed" in text
    [fetch] = found
    assert parsed(tiny, fetch).command == "fetch"
    assert run_as_printed(tiny, fetch).returncode == 0
    assert stages(tiny)["artifacts"] == "done" and stages(tiny)["source"] == "done"

    text, found = failing(tiny, "verify", "--profile", PROFILE)  # got past it: no env yet
    assert "is missing: run" in text
    assert [parsed(tiny, c).command for c in found] == ["deploy"]


def test_a_changed_model_file_says_fetch_verify_and_that_repairs_it(tiny):
    assert sdrecipe(tiny, "fetch", "--profile", PROFILE).returncode == 0
    checkpoint = tiny["deploy"] / CKPT
    pinned = sha256(checkpoint.read_bytes())
    tamper_in_place(checkpoint)

    text, [repair] = failing(tiny, "verify", "--profile", PROFILE)
    assert "expected sha256" in text
    assert parsed(tiny, repair).verify
    assert run_as_printed(tiny, repair).returncode == 0
    assert sha256(checkpoint.read_bytes()) == pinned
    text, _ = failing(tiny, "verify", "--profile", PROFILE)  # past the integrity check now
    assert "expected sha256" not in text and "is missing: run" in text


def test_a_patch_edited_by_hand_status_and_doctor_give_the_fix_that_fixes_it(tiny):
    assert sdrecipe(tiny, "fetch", "--profile", PROFILE).returncode == 0
    source = tiny["deploy"] / "stable-diffusion"
    assert sdrecipe(tiny, "patch", "apply", "--profile", PROFILE,
                    "--source", str(source)).returncode == 0
    patched = subprocess.run(["git", "-C", str(source), "diff", "--name-only", "HEAD"],
                             capture_output=True, text=True).stdout.split()[0]
    edited = source / patched
    edited.write_text(edited.read_text().replace("\n", " \n", 1))

    text, from_status = failing(tiny, "status", "--profile", PROFILE, code=1)
    assert "edited by hand" in text
    text, from_doctor = failing(tiny, "doctor", "--profile", PROFILE, code=1)
    assert "edited by hand" in text
    [force] = [c for c in from_status if verb(tiny, c) == "patch apply"]
    assert force in from_doctor and parsed(tiny, force).force

    assert run_as_printed(tiny, force).returncode == 0
    assert stages(tiny)["patches"] != "blocked"
    text = sdrecipe(tiny, "doctor", "--profile", PROFILE).stdout
    assert "[patch-series]" not in text


def test_a_stale_lock_and_missing_models_doctor_names_this_recipes_commands(tiny):
    base = tiny["recipe"].parents[1] / "env" / "environment.yaml"
    base.write_text(base.read_text().replace("einops==0.3.0", "einops==0.4.1"))
    text, found = failing(tiny, "doctor", "--profile", PROFILE, code=1)
    assert "[stale-lock]" in text
    assert sorted(verb(tiny, c) for c in found) == ["env build", "fetch", "lock"]
    [fetch] = [c for c in found if verb(tiny, c) == "fetch"]  # the models are not there yet
    assert run_as_printed(tiny, fetch).returncode == 0
    assert stages(tiny)["artifacts"] == "done"
    assert "[local-hf-models]" not in sdrecipe(tiny, "doctor", "--profile", PROFILE).stdout


def test_submit_and_env_check_without_an_environment_say_what_to_build(tiny):
    assert sdrecipe(tiny, "fetch", "--profile", PROFILE).returncode == 0
    _, found = failing(tiny, "submit", "verify", "--profile", PROFILE)
    assert sorted(verb(tiny, c) for c in found) == ["deploy", "env build"]
    _, found = failing(tiny, "env", "check", "--profile", PROFILE)
    assert [verb(tiny, c) for c in found] == ["env build"]


def test_smoke_verify_before_deploy_and_a_failed_generator_name_smoke_commands(tiny):
    text, found = failing(tiny, "verify", "--smoke", "--profile", PROFILE)
    [deploy] = found
    assert parsed(tiny, deploy).command == "deploy" and parsed(tiny, deploy).smoke

    from sdrecipe.config import Config
    from sdrecipe.errors import SdrecipeError
    from sdrecipe.layout import Deployment
    from sdrecipe.project import load_recipe
    from sdrecipe.smoke import generate
    from sdrecipe.target import Target
    target = Target(load_recipe(tiny["recipe"]), Deployment(tiny["deploy"]), PROFILE,
                    Config({}, None), smoke=True)
    python = tiny["deploy"] / "envs" / PROFILE / "bin" / "python"  # a stand-in that fails
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(SdrecipeError) as failed:
        generate(target)
    [check] = suggestions(str(failed.value))
    assert verb(tiny, check) == "env check"
