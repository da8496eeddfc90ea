"""Issue 10's fault campaign, findings 1-6, each reproduced against the real parts:
crafted bundles and recipes, bytes changed in place, read-only folders, a full
filesystem (a small tmpfs where one can be mounted), concurrent runs, and the cache's
garbage collection. Against main each of these failed; here each must hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from conftest import required_or_skip
from fetch_fixtures import HF_FILES, isolate, make_project, sha256
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


# --- finding 4: one-line errors, never a traceback --------------------------------------------

def in_namespace(script: str) -> subprocess.CompletedProcess:
    """A shell script as root of a new user and mount namespace (`unshare -rm`): its mounts
    (a read-only bind, a small tmpfs) need no privilege and vanish with it."""
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        required_or_skip("unprivileged user and mount namespaces (unshare -rm) are not allowed")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, text=True,
                          capture_output=True, timeout=300)


def command(recipe: Path, deploy: Path, *args: str) -> str:
    return " ".join([sys.executable, "-m", "sdrecipe", "--recipe", str(recipe), "--deploy-dir",
                     str(deploy), *args])


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("sdrecipe: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_read_only_deployment_is_one_line_naming_deploy_dir_and_verify_out(project, capsys):
    deploy = project["tmp"] / "deploy"
    assert main(["--recipe", str(project["recipe"]), "--deploy-dir", str(deploy), "fetch",
                 "--profile", "cpu"]) == 0
    ro = f"mount --bind {deploy} {deploy} && mount -o remount,bind,ro {deploy}"
    for args in (("fetch", "--profile", "cpu"), ("verify", "--profile", "cpu")):
        run = in_namespace(f"{ro} && {command(project['recipe'], deploy, *args)}")
        assert run.returncode == 2, run.stderr
        line = one_line_error(run.stderr)
        assert str(deploy / ".sdrecipe") in line and "Read-only file system" in line, line
        assert "--deploy-dir" in line and "verify --out" in line, line
    parent = project["tmp"] / "shared"
    parent.mkdir()
    run = in_namespace(f"mount --bind {parent} {parent} && mount -o remount,bind,ro {parent} && "
                       + command(project["recipe"], parent / "new", "fetch", "--profile", "cpu"))
    assert run.returncode == 2 and "--deploy-dir" in one_line_error(run.stderr)


def test_a_full_disk_while_placing_by_copy_is_one_line_and_leaves_no_temp_file(project, capsys):
    deploy = project["tmp"] / "deploy"
    assert main(["--recipe", str(project["recipe"]), "--deploy-dir", str(deploy), "fetch",
                 "--profile", "cpu"]) == 0
    torch_home = deploy / "torch-home"
    # an 8 KiB filesystem over $TORCH_HOME: HardNet (16000 bytes) cannot be hardlinked
    # across filesystems, and a copy does not fit
    run = in_namespace(f"mount -t tmpfs -o size=8k tmpfs {torch_home} && "
                       f"{command(project['recipe'], deploy, 'fetch', '--profile', 'cpu')}; "
                       f"echo rc=$?; find {torch_home} -name '*.sdrecipe-tmp'")
    assert "rc=2" in run.stdout, run.stdout + run.stderr
    line = one_line_error(run.stderr)
    assert "not enough space in" in line and "checkpoint_liberty_with_aug.pth" in line, line
    assert ".sdrecipe-tmp" not in run.stdout


def test_a_truncated_tar_bundle_is_one_line_and_leaves_no_scratch(project, tmp_path, capsys):
    deploy, tar = tmp_path / "online", tmp_path / "bundle.tar"
    base = ["--recipe", str(project["recipe"]), "--deploy-dir", str(deploy)]
    assert main(base + ["fetch", "--profile", "cpu"]) == 0
    assert main(base + ["bundle", "create", str(tar), "--format", "tar"]) == 0
    with tarfile.open(tar) as whole:  # cut in the middle of the largest file's data
        largest = max(whole.getmembers(), key=lambda member: member.size)
    os.truncate(tar, largest.offset_data + largest.size // 2)
    restored = tmp_path / "restored"
    capsys.readouterr()
    assert main(["--recipe", str(project["recipe"]), "--deploy-dir", str(restored), "fetch",
                 "--profile", "cpu", "--from-bundle", str(tar)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(tar) in line and "damaged tar bundle" in line, line
    assert not (restored / ".sdrecipe" / "bundle").exists()
    assert not (restored / "stable-diffusion").exists()


def test_bundle_create_from_a_checkout_lacking_blobs_is_one_line_and_leaves_nothing(
        project, tmp_path, capsys):
    """A blob of a checked-out file is gone: git cannot bundle the commit, and a copy of the
    checkout would fail on the node. (A sparse snapshot lacking only blobs it does not check
    out is carried as a copy: test_bundle_offline.py.)"""
    deploy = tmp_path / "online"
    base = ["--recipe", str(project["recipe"]), "--deploy-dir", str(deploy)]
    assert main(base + ["fetch", "--profile", "cpu"]) == 0
    checkout = deploy / "stable-diffusion"
    objects = checkout / ".git" / "objects"
    for pack in list(objects.glob("pack/*.pack")):  # loose objects, then drop one blob
        moved = tmp_path / pack.name
        pack.rename(moved)
        pack.with_suffix(".idx").unlink()
        subprocess.run(["git", "unpack-objects", "-q"], stdin=moved.open("rb"), cwd=checkout,
                       check=True)
    blob = subprocess.run(["git", "rev-parse", "HEAD:README.md"], cwd=checkout, text=True,
                          capture_output=True, check=True).stdout.strip()
    (objects / blob[:2] / blob[2:]).unlink()
    out = tmp_path / "bundle"
    capsys.readouterr()
    assert main(base + ["bundle", "create", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(checkout) in line and "lacks objects" in line, line
    assert not out.exists() and not (tmp_path / ".bundle.partial").exists()


def test_debug_shows_the_traceback_of_the_same_error(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"name: caf\xe9\n")
    assert main(["--debug", "--recipe", str(recipe), "lint"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("sdrecipe: error:")


# --- finding 1: content addressing where bytes enter the store ---------------------------------

CKPT = "stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt"


@pytest.fixture
def bundled(project, capsys):
    """An online deployment and a folder bundle made from it."""
    deploy, bundle = project["tmp"] / "online", project["tmp"] / "bundle"
    base = ["--recipe", str(project["recipe"]), "--deploy-dir", str(deploy)]
    assert main(base + ["fetch", "--profile", "cpu"]) == 0
    assert main(base + ["bundle", "create", str(bundle)]) == 0
    capsys.readouterr()
    return {**project, "deploy": deploy, "bundle": bundle}


def swap_bytes(bundle: Path, key: str, evil: bytes, case: str) -> str:
    """Put `evil` into the bundle for the artifact `key`, as a crafted bundle would; returns
    the sha256 of the bytes it replaced."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    pinned = manifest["artifacts"][key]["sha256"]
    rel = f"artifacts/sha256/{pinned[:2]}/{pinned}"
    if case == "pin":  # a true content address, but not the recipe's or lock's pin
        evil_sha = sha256(evil)
        new_rel = f"artifacts/sha256/{evil_sha[:2]}/{evil_sha}"
        manifest["artifacts"][key] = {**manifest["artifacts"][key], "sha256": evil_sha,
                                      "size": len(evil)}
        del manifest["files"][rel]
        rel = new_rel
    else:
        (bundle / rel).unlink()  # a hardlink of the online cache: write a new file
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(evil)
    manifest["files"][rel] = {"sha256": sha256(evil) if case != "stale" else pinned,
                              "size": len(evil)}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return pinned


def assert_nothing_cached_but_true_names(cache: Path, evil: bytes) -> None:
    stored = list(cache.glob("sha256/*/*"))
    assert all(sha256(path.read_bytes()) == path.name for path in stored), stored
    assert sha256(evil) not in {path.name for path in stored}
    assert [p for p in cache.glob("incoming/*") if p.suffix != ".lock"] == []


@pytest.mark.parametrize("case,key_of", [
    ("consistent", "tiny/sd"),  # the manifest vouches for the swapped bytes under the pin's name
    ("stale", "tiny/sd"),  # the manifest still lists the pin: the bytes are hashed on the way in
    ("pin", "tiny/clip"),  # a lock-pinned file replaced under its own true hash
])
def test_a_crafted_bundle_is_refused_nothing_placed_nothing_cached(bundled, monkeypatch, capsys,
                                                                    case, key_of):
    manifest = json.loads((bundled["bundle"] / "manifest.json").read_text())
    key = next(k for k in manifest["artifacts"] if key_of in k and k.endswith((".ckpt", ".bin"))
               and "full" not in k)
    evil = b"cos\nsystem\n(S'echo pwned'\ntR." .ljust(manifest["artifacts"][key]["size"], b" ")
    pinned = swap_bytes(bundled["bundle"], key, evil, case)
    node_cache = bundled["tmp"] / "node-cache"
    monkeypatch.setenv("SDRECIPE_CACHE", str(node_cache))
    restored = bundled["tmp"] / "restored"
    code = main(["--recipe", str(bundled["recipe"]), "--deploy-dir", str(restored), "fetch",
                 "--profile", "cpu", "--from-bundle", str(bundled["bundle"])])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and str(bundled["bundle"]) in line, line
    assert (pinned in line) if case == "pin" else ("content address" in line or "hashes to" in line)
    assert not (restored / "stable-diffusion").exists()  # nothing placed
    assert_nothing_cached_but_true_names(node_cache, evil)


def tamper_in_place(path: Path) -> None:
    """Change one byte, keeping size and mtime, as `dd conv=notrunc` + `touch -r` do."""
    keep = path.parent / ".mtime-ref"
    subprocess.run(["touch", "-r", str(path), str(keep)], check=True)
    os.chmod(path, 0o644)
    subprocess.run(["dd", "of=" + str(path), "bs=1", "seek=100", "count=1", "conv=notrunc",
                    "status=none"], input=b"X", check=True)
    os.chmod(path, 0o444)
    subprocess.run(["touch", "-r", str(keep), str(path)], check=True)
    keep.unlink()


def test_a_poisoned_cache_entry_is_rehashed_quarantined_and_fetched_again(project, capsys):
    first, second = project["tmp"] / "first", project["tmp"] / "second"
    assert main(["--recipe", str(project["recipe"]), "--deploy-dir", str(first), "fetch",
                 "--profile", "cpu"]) == 0
    pin = sha256(EXPECTED[CKPT])
    entry = project["cache"] / "sha256" / pin[:2] / pin
    size, mtime = entry.stat().st_size, entry.stat().st_mtime_ns
    tamper_in_place(entry)
    assert (entry.stat().st_size, entry.stat().st_mtime_ns) == (size, mtime)
    assert main(["--recipe", str(project["recipe"]), "--deploy-dir", str(second), "fetch",
                 "--profile", "cpu"]) == 0
    assert sha256((second / CKPT).read_bytes()) == pin  # not the poisoned bytes
    assert sha256(entry.read_bytes()) == pin
    assert len(list((project["cache"] / "quarantine").glob(f"{pin}.*"))) == 1


# --- finding 2: hash before unpickle -----------------------------------------------------------

def fake_env(deploy: Path, marker: Path) -> None:
    """What verify checks before it runs txt2img, and an env `python` that only leaves a mark:
    the tiny world has no real environment, and the test asks only whether anything ran."""
    python = deploy / "envs" / "cpu" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\necho ran >> {marker}\nexit 1\n")
    python.chmod(0o755)
    for rel in ("scripts/txt2img.py", "configs/stable-diffusion/v1-inference.yaml"):
        (deploy / "stable-diffusion" / rel).parent.mkdir(parents=True, exist_ok=True)
        (deploy / "stable-diffusion" / rel).touch()


def test_a_byte_changed_in_place_is_caught_before_anything_loads_it(project, capsys):
    deploy, marker = project["tmp"] / "deploy", project["tmp"] / "txt2img-ran"
    recipe = project["recipe"]
    recipe.write_text(recipe.read_text() + "verify:\n  prompt: a tiny test\n  seed: 42\n")
    base = ["--recipe", str(recipe), "--deploy-dir", str(deploy)]
    assert main(base + ["fetch", "--profile", "cpu"]) == 0
    fake_env(deploy, marker)
    tamper_in_place(deploy / CKPT)
    capsys.readouterr()
    main(base + ["status", "--profile", "cpu", "--format", "json"])
    stages = {s["stage"]: s["state"] for s in json.loads(capsys.readouterr().out)["stages"]}
    assert stages["artifacts"] == "done"  # size, mtime, inode: a status cannot tell
    assert main(base + ["verify", "--profile", "cpu"]) == 2
    line = one_line_error(capsys.readouterr().err)
    pin = sha256(EXPECTED[CKPT])
    found = sha256((deploy / CKPT).read_bytes())
    assert f"{deploy / CKPT}: expected sha256 {pin}, found {found}" in line, line
    assert f"--deploy-dir {deploy} fetch --profile cpu --verify`" in line  # runs as printed
    assert not marker.exists()  # txt2img never started: nothing unpickled the file

    assert main(base + ["fetch", "--verify", "--profile", "cpu"]) == 0
    assert sha256((deploy / CKPT).read_bytes()) == pin
    assert main(base + ["verify", "--profile", "cpu"]) == 1  # the fake python fails the sample
    assert marker.exists()
    report = json.loads((deploy / "reports/cpu/sample/report.json").read_text())
    integrity = report["checks"][0]
    assert integrity["name"] == "integrity" and integrity["ok"], integrity
    assert re.search(r"4 model file\(s\) match .* in \d+\.\d\d s", integrity["message"])
    assert report["timings"]["integrity_s"] >= 0


def test_a_batch_task_refuses_a_changed_model_file_before_importing_torch(project, capsys):
    from sdrecipe.artifacts import prove_pinned
    from sdrecipe.config import Config
    from sdrecipe.layout import Deployment
    from sdrecipe.payload.txt2img_batch import tampered
    from sdrecipe.placement import stat_fields
    from sdrecipe.project import load_recipe
    from sdrecipe.target import Target
    deploy = project["tmp"] / "deploy"
    assert main(["--recipe", str(project["recipe"]), "--deploy-dir", str(deploy), "fetch",
                 "--profile", "cpu"]) == 0
    proven = prove_pinned(Target(load_recipe(project["recipe"]), Deployment(deploy), "cpu",
                                 Config({}, None)))
    pinned = [{"path": str(p.target), "sha256": p.sha256, "stat": stat_fields(p.target)}
              for p in proven]  # as batch.manifest_text writes them at submission
    assert tampered(pinned) is None
    tamper_in_place(deploy / CKPT)
    path, pin, found = tampered(pinned)
    assert (path, pin) == (str(deploy / CKPT), sha256(EXPECTED[CKPT])) and found != pin


# --- finding 6: the cache and its quarantine are bounded ---------------------------------------

def test_cache_gc_removes_what_no_deployment_uses_and_dry_run_only_lists_it(project, capsys):
    gone, kept = project["tmp"] / "gone", project["tmp"] / "kept"
    fetch_into = lambda deploy, *extra: main(  # noqa: E731
        ["--recipe", str(project["recipe"]), "--deploy-dir", str(deploy), "fetch",
         "--profile", "cpu", *extra])
    assert fetch_into(gone, "--with-optional") == 0 and fetch_into(kept) == 0
    shutil.rmtree(gone)  # its optional checkpoint is now used by no deployment
    full = HF_FILES["tiny/sd"]["sd-tiny-full.ckpt"]
    entry = project["cache"] / "sha256" / sha256(full)[:2] / sha256(full)
    capsys.readouterr()
    assert main(["cache", "gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove  {entry}  79.1 KiB  (referenced by no deployment)" in out, out
    assert "1 file(s), 79.1 KiB would be freed" in out and entry.exists()
    assert main(["cache", "gc"]) == 0
    assert f"removed  {entry}" in capsys.readouterr().out
    assert not entry.exists()
    assert sorted(p.name for p in project["cache"].glob("sha256/*/*") if p.suffix != ".lock") \
        == sorted(sha256(data) for data in EXPECTED.values())
    assert fetch_into(kept) == 0 and "4 in place" in capsys.readouterr().out
    assert main(["cache", "gc"]) == 0 and "0 file(s)" in capsys.readouterr().out


def test_quarantine_keeps_only_the_newest_bad_copy_per_file(project, world, capsys):
    mirror = world["mirror"]
    url = f"{mirror.url}/tiny/sd/resolve/{world['hf_commits']['tiny/sd']}/sd-tiny.ckpt"
    quarantine = project["cache"] / "quarantine"
    try:
        mirror.fault(url, corrupt=True, times=None)  # every copy served is wrong
        for attempt in range(3):
            assert main(["--recipe", str(project["recipe"]), "--deploy-dir",
                         str(project["tmp"] / "deploy"), "fetch", "--profile", "cpu",
                         "--only", "tiny-ckpt"]) == 2
        bad = list(quarantine.iterdir())
        assert len(bad) == 1, bad
        assert bad[0].stat().st_size == len(HF_FILES["tiny/sd"]["sd-tiny.ckpt"])
    finally:
        mirror.faults.clear()


@pytest.mark.slow
@pytest.mark.upstream
def test_two_concurrent_smoke_deploys_into_a_new_deployment(upstream, tmp_path):
    """The real pipeline (the pinned upstream, the cpu env as a venv of Python 3.8): the
    second deploy waits, names the first, and then finds every stage done."""
    from env_helpers import PY38
    if not Path(PY38).is_file():
        required_or_skip(f"no Python 3.8 at {PY38} (set SDRECIPE_TEST_PY38)")
    for name in ("recipe", "patches", "lock", "env"):
        shutil.copytree(ROOT / name, tmp_path / "project" / name)
    recipe, deploy = tmp_path / "project" / "recipe" / "stable-diffusion.yaml", tmp_path / "deploy"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDRECIPE_")}
    args = ("deploy", "--profile", "cpu", "--smoke", "--python", PY38, "--source", str(upstream))
    runs = [sdrecipe(recipe, deploy, *args, env=env) for _ in range(2)]
    results = [(run.wait(timeout=900), *run.communicate()) for run in runs]
    for code, out, err in results:
        assert code == 0 and "Traceback" not in err, out[-2000:] + err[-2000:]
    waited = [out for _, out, err in results if "sdrecipe: waiting for pid" in err]
    assert len(waited) == 1, [err for _, _, err in results]
    assert "-> running" not in waited[0]  # the second found every stage done
    assert debris(deploy) == []
