"""A tiny world for the fetch tests: a real `git daemon` and HF-layout mirror on 127.0.0.1.

    GitDaemon(base)        `git daemon` serving the bare repos under `base`; started
                           and stopped (by PID) by the tests
    build_world(dir, ...)  the patch fixtures' tiny upstream served as upstream.git, an
                           unrelated fork.git that lacks the pinned commit, and a
                           mirror with tiny model files; returns what tests need
    make_project(world, dest, mirrors=..., url=...)
                           a private copy of the project whose recipe points at them
    world                  pytest fixture (module scope): build_world served by a
                           running mirror and git daemon; registered in conftest.py

The artifact files are a few bytes each, standing in for the real 4 GB entries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mirror_server import MirrorServer
from patch_fixtures import build_template, git

# repo -> {path: bytes}; the `tiny/sd` repo is gated like CompVis' checkpoints.
HF_FILES = {
    "tiny/sd": {"sd-tiny.ckpt": b"checkpoint " * 4000, "sd-tiny-full.ckpt": b"full ema " * 9000},
    "tiny/clip": {"config.json": b'{"hidden_size": 8}\n', "pytorch_model.bin": os.urandom(50_000)},
}
HARDNET = b"hardnet weights " * 1000
TOKEN = "hf_test_token"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GitDaemon:
    """A real `git daemon` on 127.0.0.1, exporting every repo under `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def start(self) -> "GitDaemon":
        self.proc = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--informative-errors",
             f"--base-path={self.base}", "--listen=127.0.0.1", f"--port={self.port}",
             str(self.base)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("git daemon did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)


def build_world(root: Path, daemon_base: Path, mirror) -> dict:
    """Template project + bare repos for the daemon + files published on `mirror`."""
    template = build_template(root / "template")
    daemon_base.mkdir(parents=True, exist_ok=True)
    git(root, "clone", "-q", "--bare", str(template["author"]), str(daemon_base / "upstream.git"))
    fork = root / "fork"
    fork.mkdir()
    git(fork, "init", "-q")
    (fork / "README.md").write_text("a fork that never had the pinned commit\n")
    git(fork, "add", "-A")
    git(fork, "commit", "-qm", "unrelated history")
    git(root, "clone", "-q", "--bare", str(fork), str(daemon_base / "fork.git"))
    commits = {}
    for repo, files in HF_FILES.items():
        commits[repo] = hashlib.sha1(repo.encode()).hexdigest()
        for path, data in files.items():
            mirror.add_file(repo, path, data, gated=repo == "tiny/sd", token=None,
                            commit=commits[repo])
    hardnet_url = mirror.add_plain("hardnet/checkpoint_liberty_with_aug.pth", HARDNET)
    return {"template": template, "commit": template["commit"], "hf_commits": commits,
            "hardnet_url": hardnet_url, "mirror": mirror}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fetch-world")
    with MirrorServer() as mirror:
        made = build_world(root, root / "served", mirror)
        made["daemon"] = GitDaemon(root / "served").start()
        try:
            yield made
        finally:
            made["daemon"].stop()


def artifacts_yaml(world: dict) -> str:
    sd, clip = world["hf_commits"]["tiny/sd"], world["hf_commits"]["tiny/clip"]
    ckpt, full = HF_FILES["tiny/sd"]["sd-tiny.ckpt"], HF_FILES["tiny/sd"]["sd-tiny-full.ckpt"]
    return f"""artifacts:
  - name: tiny-ckpt
    hf: {{repo: tiny/sd, revision: {sd}, gated: true}}
    into: models/ldm/stable-diffusion-v1
    files:
      - {{path: sd-tiny.ckpt, as: model.ckpt, size: {len(ckpt)}, sha256: {sha256(ckpt)}}}
  - name: tiny-full-ema
    optional: true
    hf: {{repo: tiny/sd, revision: {sd}, gated: true}}
    into: models/ldm/stable-diffusion-v1
    files:
      - {{path: sd-tiny-full.ckpt, size: {len(full)}, sha256: {sha256(full)}}}
  - name: tiny-clip
    hf: {{repo: tiny/clip, revision: {clip}}}
    into: models/clip-vit-large-patch14
    files:
      - {{path: config.json}}
      - {{path: pytorch_model.bin}}
  - name: hardnet
    into: torch_home/hub/checkpoints
    files:
      - url: {world["hardnet_url"]}
"""


def make_project(world: dict, dest: Path, url: str, mirrors=(), artifacts: str | None = None
                 ) -> Path:
    """A copy of the template project whose recipe clones from `url` after `mirrors`."""
    project = dest / "project"
    shutil.copytree(world["template"]["project"], project)
    recipe = project / "recipe" / "test.yaml"
    text = recipe.read_text()
    text = text.replace("url: https://example.org/tiny", f"url: {url}")
    text = text.replace("mirrors: []", f"mirrors: [{', '.join(mirrors)}]")
    recipe.write_text(text + (artifacts if artifacts is not None else artifacts_yaml(world)))
    return recipe


def isolate(monkeypatch, tmp_path: Path, mirror) -> Path:
    """Point the cache, config, endpoints and token at this test; returns the cache folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDRECIPE_CACHE", str(cache))
    monkeypatch.setenv("SDRECIPE_CONFIG", str(tmp_path / "no-config.yaml"))
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SDRECIPE_CA_BUNDLE",
                 "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "SDRECIPE_DEPLOY_DIR",
                 "SDRECIPE_UPSTREAM"):  # else fetch would copy that checkout, not clone
        monkeypatch.delenv(name, raising=False)
    # a test never reaches the internet: no huggingface.co after the loopback mirror
    monkeypatch.setenv("SDRECIPE_HF_HUB_FALLBACK", "0")
    return cache


def tree_hashes(*roots: Path) -> dict:
    """relative path -> sha256 of every regular file under the roots (the deployment manifest)."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[f"{root.name}/{path.relative_to(root)}"] = sha256(path.read_bytes())
    return out

