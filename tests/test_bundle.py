"""Offline bundles: create from a real online fetch, restore with the network cut off.

The restore runs as a separate process under `unshare -n` (a new, empty network
namespace: not even loopback is up). Where unprivileged namespaces are not
allowed, it runs with a `sitecustomize` guard that makes every socket connect
fail instead; either way the test first proves that the process cannot reach
the still-running mirror.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fetch_fixtures import isolate, make_project, sha256
from patch_fixtures import git
from sdrecipe.bundle.manifest import MANIFEST, open_bundle, verify_bundle
from sdrecipe.cli import main
from sdrecipe.errors import SdrecipeError

ROOT = Path(__file__).resolve().parents[1]
GUARD = """import socket
def _refuse(self, *args, **kwargs):
    raise OSError(101, "network disabled by the test guard")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


@pytest.fixture
def fetched(world, tmp_path, monkeypatch, capsys):
    """An online deployment (profile cpu) and a folder bundle made from it."""
    isolate(monkeypatch, tmp_path, world["mirror"])
    recipe = make_project(world, tmp_path, world["daemon"].url("upstream.git"))
    deploy, out = tmp_path / "online", tmp_path / "bundle"
    base = ["--recipe", str(recipe), "--deploy-dir", str(deploy)]
    assert main(base + ["fetch", "--profile", "cpu"]) == 0
    assert main(base + ["bundle", "create", str(out)]) == 0
    capsys.readouterr()
    return {"recipe": recipe, "deploy": deploy, "bundle": out, "tmp": tmp_path}


def deployment_manifest(deploy: Path) -> dict:
    """sha256 of every file of the deployment a user relies on (not git's internals)."""
    out = {}
    for part in ("stable-diffusion", "torch-home"):
        for path in sorted((deploy / part).rglob("*")):
            rel = path.relative_to(deploy)
            if path.is_file() and ".git" not in rel.parts:
                out[rel.as_posix()] = sha256(path.read_bytes())
    return out


def offline(tmp_path: Path) -> tuple[list, dict]:
    """Command prefix and environment for a process without network."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"], env
    guard = tmp_path / "guard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(GUARD)
    env["PYTHONPATH"] = f"{guard}:{env['PYTHONPATH']}"
    return [], env


def test_round_trip_restores_the_same_deployment_with_no_network(fetched, world, tmp_path):
    bundle = fetched["bundle"]
    manifest = json.loads((bundle / MANIFEST).read_text())
    for rel in ("source.bundle", "recipe/test.yaml", "lock/artifacts.lock",
                "lock/upstream.lock"):
        assert rel in manifest["files"], rel
    assert any(rel.startswith("patches/tiny/") for rel in manifest["files"])
    assert len(manifest["artifacts"]) == 4

    prefix, env = offline(tmp_path)
    probe = subprocess.run(prefix + [sys.executable, "-c",
                                     "import socket; socket.create_connection"
                                     f"(('127.0.0.1', {world['mirror'].port}), timeout=2)"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the mirror is up, yet this process cannot reach it

    env.update(SDRECIPE_CACHE=str(tmp_path / "compute-node-cache"),
               HF_TOKEN="", SDRECIPE_CONFIG=str(tmp_path / "none.yaml"))
    restored = tmp_path / "compute-node"
    command = prefix + [sys.executable, "-m", "sdrecipe", "--recipe",
                        str(bundle / "recipe" / "test.yaml"), "--deploy-dir", str(restored),
                        "fetch", "--profile", "cpu", "--from-bundle", bundle.name]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                         cwd=bundle.parent)  # a relative bundle path, as users type it
    assert run.returncode == 0, run.stderr
    assert "4 placed" in run.stdout
    assert git(restored / "stable-diffusion", "rev-parse", "HEAD").strip() == world["commit"]
    assert deployment_manifest(restored) == deployment_manifest(fetched["deploy"])

    shutil.rmtree(bundle / "artifacts")  # a complete deployment does not read the bundle again
    (bundle / "source.bundle").unlink()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120,
                           cwd=bundle.parent)
    assert again.returncode == 0 and "4 in place" in again.stdout, again.stderr


def test_tar_bundle_round_trip(fetched, world, tmp_path, monkeypatch, capsys):
    tar = tmp_path / "bundle.tar"
    assert main(["--recipe", str(fetched["recipe"]), "--deploy-dir", str(fetched["deploy"]),
                 "bundle", "create", str(tar), "--format", "tar"]) == 0
    monkeypatch.setenv("SDRECIPE_CACHE", str(tmp_path / "other-cache"))
    restored = tmp_path / "restored"
    assert main(["--recipe", str(fetched["recipe"]), "--deploy-dir", str(restored),
                 "fetch", "--profile", "cpu", "--from-bundle", str(tar)]) == 0
    assert deployment_manifest(restored) == deployment_manifest(fetched["deploy"])
    assert not (restored / ".sdrecipe" / "bundle").exists()  # the extraction, once used


def test_bundle_for_another_commit_is_refused_naming_its_recipe(fetched, tmp_path, capsys):
    recipe = fetched["recipe"]
    text = recipe.read_text()
    commit = next(line.split()[-1] for line in text.splitlines() if "commit:" in line)
    recipe.write_text(text.replace(commit, "a" * 40))
    code = main(["--recipe", str(recipe), "--deploy-dir", str(tmp_path / "x"), "fetch",
                 "--profile", "cpu", "--from-bundle", str(fetched["bundle"])])
    err = capsys.readouterr().err
    assert code == 2 and commit in err and "--recipe" in err


def _tar_with(path: Path, member: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        ok = tarfile.TarInfo("manifest.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("member", [
    _member("../escaped.txt"),
    _member("/tmp/sdrecipe-absolute-escape.txt"),
    _member("artifacts/evil", tarfile.SYMTYPE, "/etc"),
    _member("artifacts/passwd", tarfile.LNKTYPE, "/etc/passwd"),
    _member("artifacts/../../escaped.txt"),
], ids=["dotdot", "absolute", "symlink", "hardlink", "nested-dotdot"])
def test_malicious_tar_is_refused_before_anything_is_written(member, tmp_path):
    tar = _tar_with(tmp_path / "evil.tar", member)
    scratch = tmp_path / "deploy" / ".sdrecipe" / "bundle"
    with pytest.raises(SdrecipeError, match="refusing"):
        open_bundle(tar, scratch)
    assert not scratch.exists()  # nothing extracted, and no scratch folder left either
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/sdrecipe-absolute-escape.txt").exists()


def test_folder_manifest_entry_leaving_the_bundle_is_refused(fetched, tmp_path):
    bundle = fetched["bundle"]
    (tmp_path / "secret.txt").write_text("outside")
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["../secret.txt"] = {"sha256": sha256(b"outside"), "size": 7}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SdrecipeError, match="leaves the bundle"):
        verify_bundle(bundle)


def test_artifact_hash_that_is_a_path_is_refused(fetched):
    bundle = fetched["bundle"]
    manifest = json.loads((bundle / MANIFEST).read_text())
    key = next(iter(manifest["artifacts"]))
    manifest["artifacts"][key]["sha256"] = "../../../../../tmp/sdrecipe-escape"
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SdrecipeError, match="malformed manifest"):
        verify_bundle(bundle)


def test_folder_symlink_leading_out_is_refused(fetched, tmp_path):
    bundle = fetched["bundle"]
    manifest = json.loads((bundle / MANIFEST).read_text())
    rel = next(r for r in manifest["files"] if r.startswith("artifacts/"))
    outside = tmp_path / "elsewhere"
    outside.write_bytes((bundle / rel).read_bytes())  # even with the right bytes
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(outside)
    with pytest.raises(SdrecipeError, match="leaves the bundle"):
        verify_bundle(bundle)


def test_damaged_file_is_caught_before_use(fetched, tmp_path, monkeypatch, capsys):
    # a compute node's own cache: the bundle's bytes are needed (a cache that already holds
    # a verified copy never reads them)
    monkeypatch.setenv("SDRECIPE_CACHE", str(tmp_path / "node-cache"))
    bundle = fetched["bundle"]
    manifest = json.loads((bundle / MANIFEST).read_text())
    rel = next(r for r in manifest["files"] if r.startswith("artifacts/"))
    os.chmod(bundle / rel, 0o644)
    data = bytearray((bundle / rel).read_bytes())
    data[0] ^= 0xFF
    (bundle / rel).unlink()  # it may be a hardlink of the cache: write a new file
    (bundle / rel).write_bytes(bytes(data))
    restored = tmp_path / "restored"
    code = main(["--recipe", str(fetched["recipe"]), "--deploy-dir", str(restored), "fetch",
                 "--profile", "cpu", "--from-bundle", str(bundle)])
    assert code == 2 and rel in capsys.readouterr().err
    assert not (restored / "stable-diffusion").exists()
