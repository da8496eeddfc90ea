"""A whole node deployed from one bundle with the network cut: the real recipe, profile cpu,
smoke mode (issue 11).

`bundle create --profile cpu --smoke` runs here, where the package index is reachable
(the engine's wheels come from it; the environment's 66 files from the download cache
the other tests fill, else from PyPI). The deploy then runs under `unshare -n` (a new
network namespace: not even loopback is up), with `env -i`: a fresh HOME, so empty
caches; no PIP_*/UV_* variables and PIP_CONFIG_FILE=/dev/null, since this machine's pip
configuration names local wheel folders that would hide a file missing from the bundle;
and a PATH that holds only a Python 3.8 (the lock's) and one for the engine. No conda.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import required_or_skip
from env_helpers import PY38

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.upstream, pytest.mark.slow]


def create(out: Path, tmp: Path, upstream: Path, recipe: Path | None = None, extra=()):
    return subprocess.run(
        [sys.executable, "-m", "sdrecipe", *(["--recipe", str(recipe)] if recipe else []),
         "--deploy-dir", str(tmp / "login-deploy"), "bundle", "create", "--profile", "cpu",
         "--smoke", "--source", str(upstream), *extra, str(out)],
        capture_output=True, text=True, timeout=1800, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, upstream) -> Path:
    tmp = tmp_path_factory.mktemp("bundle")
    made = create(tmp / "bundle", tmp, upstream)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "for cpu (smoke)" in made.stdout and "environment files" in made.stdout
    return tmp / "bundle"


def node(tmp: Path) -> tuple[list[str], Path]:
    """The command prefix of a node without network, conda or caches, and its HOME."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        required_or_skip("unshare -n (a network namespace) is not allowed here; run as root")
    home, bin_dir = tmp / "home", tmp / "bin"
    home.mkdir()
    bin_dir.mkdir()
    engine_python = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (bin_dir / "python3.8").symlink_to(PY38)
    (bin_dir / engine_python).symlink_to(sys.executable)
    environ = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8",
               "PIP_CONFIG_FILE": os.devnull}
    return ["unshare", "-n", "env", "-i", *(f"{k}={v}" for k, v in environ.items())], home


def deploy_from(prefix: list[str], checkout: Path, bundle: Path, deploy: Path):
    """`checkout/scripts/deploy.sh --from-bundle bundle`, smoke cpu, on the node."""
    return subprocess.run(prefix + [str(checkout / "scripts" / "deploy.sh"), "--deploy-dir",
                                    str(deploy), "--from-bundle", str(bundle), "--profile", "cpu",
                                    "--smoke"], capture_output=True, text=True, timeout=1800)


def test_the_node_has_no_network(tmp_path):
    prefix, _ = node(tmp_path)
    probe = subprocess.run(prefix + [sys.executable, "-c", "import socket; socket.create_connection"
                                     "(('pypi.org', 443), timeout=5)"], capture_output=True, text=True)
    assert probe.returncode != 0 and ("gaierror" in probe.stderr or "Errno" in probe.stderr)


def test_a_smoke_bundle_deploys_and_verifies_a_node_without_network(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["contents"]["packages"]["files"] == 66  # the cpu lock's every file
    assert manifest["artifacts"] == {} and manifest["smoke"]
    prefix, home = node(tmp_path)
    deploy = tmp_path / "deploy"
    done = deploy_from(prefix, bundle, bundle, deploy)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "first run: making the engine environment" in done.stderr  # bootstrapped offline
    assert "source     from the bundle" in done.stdout
    assert "downloading" not in done.stdout + done.stderr
    report = json.loads((deploy / "reports" / "cpu" / "smoke" / "report.json").read_text())
    assert report["ok"] and report["smoke"] and len(report["images"]) == 1
    cached = home / ".cache" / "sdrecipe" / "pip"
    assert len(list(cached.glob("*/*"))) == 66  # adopted from the bundle, each hashed
    for verb in ("status", "doctor"):  # the deployment knows its profile and mode
        plain = subprocess.run(prefix + [str(bundle / "scripts" / "sdrecipe"), "--deploy-dir",
                                         str(deploy), verb], capture_output=True, text=True)
        assert plain.returncode == 0, plain.stdout + plain.stderr


def test_a_bundle_file_that_does_not_hash_to_the_lock_is_refused_before_the_cache(bundle,
                                                                                  tmp_path):
    """Same size, other bytes: the manifest's size check passes, the hash on the way into
    the cache does not; nothing is adopted and nothing is built."""
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-al", str(bundle), str(copy)], check=True)
    shutil.rmtree(copy / ".engine", ignore_errors=True)
    victim = min((copy / "packages" / "pip").glob("*/*"), key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    victim.unlink()  # a new inode: the bundle's own file stays whole
    victim.write_bytes(b"\0" * size)
    prefix, home = node(tmp_path)
    done = deploy_from(prefix, copy, copy, tmp_path / "deploy")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert victim.name in error and "copy the bundle again" in error
    assert not list((home / ".cache" / "sdrecipe" / "pip").glob(f"*/{victim.name}"))
    assert not (tmp_path / "deploy" / "envs" / "cpu").exists()


def test_making_the_bundle_again_after_a_lock_change_rewrites_only_what_changed(
        bundle, tmp_path, upstream):
    """rsync's quick check compares size and mtime: every file kept must be the same
    inode, the lock and the manifest new, and the package the lock dropped gone."""
    project = tmp_path / "project"
    for name in ("recipe", "env", "lock", "patches"):
        shutil.copytree(ROOT / name, project / name)
    lock_file = project / "lock" / "cpu.conda-lock.yml"
    lock = yaml.safe_load(lock_file.read_text())
    dropped = next(p for p in lock["package"] if p["manager"] == "pip" and p["name"] == "einops")
    lock["package"].remove(dropped)
    out = tmp_path / "bundle"
    recipe = project / "recipe" / "stable-diffusion.yaml"
    first = create(out, tmp_path, upstream, recipe)
    assert first.returncode == 0, first.stdout + first.stderr
    before = {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
              for p in out.rglob("*") if p.is_file()}
    lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
    again = create(out, tmp_path, upstream, recipe)
    assert again.returncode == 0, again.stdout + again.stderr
    after = {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
             for p in out.rglob("*") if p.is_file()}
    gone = set(before) - set(after)
    assert len(gone) == 1 and next(iter(gone)).endswith(dropped["url"].rsplit("/", 1)[-1])
    changed = {rel for rel in after if before.get(rel) != after[rel]}
    assert changed == {"lock/cpu.conda-lock.yml", "manifest.json"}
    assert "1 files written" in again.stdout


def test_a_tar_bundle_deploys_through_another_checkouts_wrapper(bundle, tmp_path, upstream):
    """One tar file and a checkout of sdrecipe without its engine: the wrapper takes the
    engine's wheels out of the tar, the deploy extracts the rest and removes it after.
    (`bundle` first: the caches the tar is made from are warm.)"""
    tar = tmp_path / "bundle.tar"
    made = create(tar, tmp_path, upstream, extra=("--format", "tar"))
    assert made.returncode == 0, made.stdout + made.stderr
    checkout = tmp_path / "sdrecipe"
    for name in ("src", "scripts", "recipe", "env", "lock", "patches"):
        shutil.copytree(ROOT / name, checkout / name,
                        ignore=shutil.ignore_patterns("__pycache__", ".engine*"))
    shutil.copy2(ROOT / "pyproject.toml", checkout)
    prefix, _ = node(tmp_path)
    deploy = tmp_path / "deploy"
    done = deploy_from(prefix, checkout, tar, deploy)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "verify: passed" in done.stdout
    assert not (deploy / ".sdrecipe" / "bundle").exists()
    assert not (checkout / ".engine-wheels").exists() and (checkout / ".engine").is_dir()
