"""Issue 10's fault campaign, findings 1-6, each reproduced against the real parts:
crafted bundles and recipes, bytes changed in place, read-only folders, a full
filesystem (a small tmpfs where one can be mounted), concurrent runs, and the cache's
garbage collection. Against main each of these failed; here each must hold.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fetch_fixtures import isolate, make_project, sha256
from sdrecipe.cli import main
from sdrecipe.errors import RecipeError
from sdrecipe.schema import load_yaml
from test_artifacts import EXPECTED
from test_recipe import GOOD


# --- finding 5: a recipe loader that cannot be blown up -------------------------------------

def alias_bomb(levels: int = 6) -> str:
    """Each level a list of nine aliases of the one before: 9**levels strings once expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for n in range(1, levels + 1):
        refs = ", ".join([f"*a{n - 1}"] * 9)
        lines.append(f"a{n}: &a{n} [{refs}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    with pytest.raises(RecipeError, match=r"bomb.yaml:1: .*anchors and aliases"):
        load_yaml(path)


def test_a_recipe_with_aliases_is_one_line_error_from_the_cli(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(GOOD + alias_bomb())
    assert main(["--recipe", str(recipe), "lint"]) == 2
    err = capsys.readouterr().err
    assert "anchors and aliases" in err and str(recipe) in err and "Traceback" not in err


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: one\nschema: 1\nname: two\n")
    with pytest.raises(RecipeError, match=r"dup.yaml:3: .*duplicate key 'name' at lines 1 and 3"):
        load_yaml(path)


def test_a_non_utf8_recipe_names_the_file_and_byte_offset(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(GOOD.replace("name: tiny", "name: caf\xe9").encode("latin-1"))
    offset = GOOD.index("name: tiny") + len("name: caf")
    assert main(["--recipe", str(recipe), "lint"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:" in err and f"byte offset {offset} (0xe9)" in err
    assert "Traceback" not in err


def test_nesting_too_deep_is_an_error_not_a_crash(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply"):
        load_yaml(path)


# --- finding 3: two runs into one new deployment ----------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DEBRIS = (".stable-diffusion.partial", "*.sdrecipe-tmp", "incoming/*", "*.partial")


def sdrecipe(recipe: Path, deploy: Path, *args: str, env: dict | None = None,
             **popen) -> subprocess.Popen:
    """`python -m sdrecipe` of this checkout as a process of its own."""
    env = dict(env or os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "sdrecipe", "--recipe", str(recipe),
                             "--deploy-dir", str(deploy), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def debris(*roots: Path) -> list[str]:
    """What a failed or raced run left half-made (lock files are not: they stay by design)."""
    return sorted(str(p) for root in roots for pattern in DEBRIS for p in root.rglob(pattern)
                  if p.suffix != ".lock")


@pytest.fixture
def project(world, tmp_path, monkeypatch):
    cache = isolate(monkeypatch, tmp_path, world["mirror"])
    recipe = make_project(world, tmp_path, world["daemon"].url("upstream.git"))
    return {"recipe": recipe, "cache": cache, "tmp": tmp_path}


def placed_right(deploy: Path) -> bool:
    return all(sha256((deploy / rel).read_bytes()) == sha256(data) for rel, data in EXPECTED.items())


def test_two_concurrent_fetches_into_a_new_deployment_ten_trials(project, monkeypatch):
    for trial in range(10):
        deploy = project["tmp"] / f"deploy-{trial}"
        monkeypatch.setenv("SDRECIPE_CACHE", str(project["tmp"] / f"cache-{trial}"))
        runs = [sdrecipe(project["recipe"], deploy, "fetch", "--profile", "cpu")
                for _ in range(2)]
        results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
        for code, out, err in results:
            assert code == 0 and "Traceback" not in err, (trial, out, err)
        assert placed_right(deploy), trial
        assert debris(deploy, project["tmp"] / f"cache-{trial}") == [], trial
        waits = [line for _, _, err in results for line in err.splitlines() if "waiting" in line]
        assert all(re.fullmatch(r"sdrecipe: waiting for pid \d+ \(sdrecipe fetch\) holding "
                                + re.escape(str(deploy / ".sdrecipe" / "deploy.lock")), line)
                   for line in waits), waits


def test_a_second_fetch_names_the_holder_waits_and_repairs_after_a_kill(project):
    deploy = project["tmp"] / "deploy"
    held = dict(os.environ, SDRECIPE_TEST_HOLD="source:begin")
    first = sdrecipe(project["recipe"], deploy, "fetch", "--profile", "cpu", env=held)
    lock = deploy / ".sdrecipe" / "deploy.lock"
    deadline = time.monotonic() + 60
    while not (lock.parent / "records" / "source.json").exists():  # the first holds the lock
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    second = sdrecipe(project["recipe"], deploy, "fetch", "--profile", "cpu")
    line = second.stderr.readline()
    assert line.strip() == f"sdrecipe: waiting for pid {first.pid} (sdrecipe fetch) holding {lock}"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    code = second.wait(timeout=120)
    out, err = second.communicate()
    assert code == 0 and "Traceback" not in err, err
    assert placed_right(deploy) and debris(deploy, project["cache"]) == []
