"""No-op re-fetch benchmark: `sdrecipe fetch` when several GB of artifacts are in place.

    python benchmarks/bench_refetch.py [--rounds 5] [--workdir benchmarks/out/refetch]

Builds a project whose recipe lists files the sizes of the real default set
(4.27 GB checkpoint, ~1.7 GB CLIP and ~1.2 GB safety-checker weights, small
configs), seeds the content-addressed cache with them as SPARSE files (so GBs
cost no disk or time to make; their sha256 is computed once and remembered in
the workdir), fetches once (placement by hardlink), then times:

1. `sdrecipe fetch` with everything in place, as a fresh process (Python start,
   imports, recipe load, source check, stamp checks): median of `rounds`;
2. the same in-process (`fetch_artifacts` alone);
3. `fetch --verify` for comparison: a full rehash of every placed byte (of
   sparse zeros, so this is a lower bound: real weights come from disk).
The source is a one-commit local git repo (a path URL), reused after the first run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

FILES = [  # (artifact, into, name, size): the default set's sizes, approximately
    ("sd-v1-4", "models/ldm/stable-diffusion-v1", "model.ckpt", 4_265_380_512),
    ("clip", "models/clip-vit-large-patch14", "pytorch_model.bin", 1_710_000_000),
    ("clip", "models/clip-vit-large-patch14", "config.json", 4_519),
    ("clip", "models/clip-vit-large-patch14", "vocab.json", 961_143),
    ("safety", "models/stable-diffusion-safety-checker", "pytorch_model.bin", 1_216_067_303),
    ("safety", "models/stable-diffusion-safety-checker", "config.json", 4_549),
    ("hardnet", "torch_home/hub/checkpoints", "checkpoint_liberty_with_aug.pth", 5_300_000),
]
GIT_ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.org",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.org"}


def sparse_sha256(size: int, memo: dict) -> str:
    """sha256 of `size` zero bytes (a sparse file's content), remembered across runs."""
    key = str(size)
    if key not in memo:
        digest, block = hashlib.sha256(), bytes(8 << 20)
        left = size
        while left:
            step = min(left, len(block))
            digest.update(block[:step])
            left -= step
        memo[key] = digest.hexdigest()
    return memo[key]


def git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=dict(os.environ, **GIT_ENV)).stdout.strip()


def build(work: Path) -> tuple[Path, Path, int]:
    """Project + upstream + seeded sparse cache; returns (recipe, cache, total bytes)."""
    work.mkdir(parents=True, exist_ok=True)
    memo_file = work / "sparse-sha256.json"
    memo = json.loads(memo_file.read_text()) if memo_file.exists() else {}
    upstream = work / "upstream"
    if not upstream.exists():
        upstream.mkdir()
        git(upstream, "init", "-q")
        (upstream / "README.md").write_text("benchmark upstream\n")
        git(upstream, "add", "-A")
        git(upstream, "commit", "-qm", "pinned")
    commit = git(upstream, "rev-parse", "HEAD")
    cache = work / "cache"
    entries = []
    for artifact, into, name, size in FILES:
        digest = sparse_sha256(size, memo)
        stored = cache / "sha256" / digest[:2] / digest
        if not stored.exists():
            stored.parent.mkdir(parents=True, exist_ok=True)
            with open(stored, "wb") as handle:
                handle.truncate(size)
            os.chmod(stored, 0o444)
        entries.append(f"  - name: {artifact}-{name}\n    into: {into}\n    files:\n"
                       f"      - {{url: https://example.invalid/{name}, size: {size}, "
                       f"sha256: {digest}}}\n")
    memo_file.write_text(json.dumps(memo))
    recipe = work / "project" / "recipe" / "bench.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(f"""schema: 1
name: bench
upstream: {{url: {upstream}, commit: {commit}, mirrors: []}}
patches: {{dir: patches, series: []}}
profiles:
  cpu: {{description: CPU, accelerator: none}}
artifacts:
{''.join(entries)}""")
    return recipe, cache, sum(f[3] for f in FILES)


def timed_process(argv, env) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "refetch")
    args = parser.parse_args()
    recipe, cache, total = build(args.workdir)
    deploy = args.workdir / "deploy"
    shutil.rmtree(deploy, ignore_errors=True)  # the first fetch clones and places afresh
    env = dict(os.environ, SDRECIPE_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"),
               SDRECIPE_CONFIG=str(args.workdir / "no-config.yaml"))
    os.environ.update(SDRECIPE_CACHE=str(cache), SDRECIPE_CONFIG=env["SDRECIPE_CONFIG"])
    command = [sys.executable, "-m", "sdrecipe", "--recipe", str(recipe), "--deploy-dir",
               str(deploy), "fetch", "--profile", "cpu"]
    first = timed_process(command, env)  # clone + hardlink placement

    process = statistics.median(timed_process(command, env) for _ in range(args.rounds))

    from sdrecipe.artifacts import fetch_artifacts
    from sdrecipe.layout import Deployment
    from sdrecipe.project import load_recipe
    loaded, deployment = load_recipe(recipe), Deployment(deploy.resolve())
    in_process = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        placed = fetch_artifacts(loaded, deployment, "cpu")
        in_process.append(time.perf_counter() - started)
        assert all(p.action == "in place" for p in placed)

    verify = timed_process(command + ["--verify"], env)
    print(f"placed artifacts: {len(FILES)} files, {total / 1e9:.2f} GB (sparse files)")
    print(f"first fetch (clone + hardlinks): {first:.2f} s")
    print(f"no-op re-fetch, fresh process, median of {args.rounds}: {process:.3f} s "
          f"(target <= 1 s)")
    print(f"no-op fetch_artifacts in-process, median of {args.rounds}: "
          f"{statistics.median(in_process) * 1000:.1f} ms")
    print(f"fetch --verify (full rehash of sparse zeros; a lower bound): {verify:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
