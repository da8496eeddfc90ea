"""Environment build benchmark: the env stage against a bare `uv pip install` of the same files.

    python benchmarks/bench_env_build.py [--python /path/to/python3.8] \\
        [--workdir benchmarks/out/env-build] [--rounds 3] [--pip]

The cpu profile's venv from the committed lock (66 pip-layer files, PyPI's torch 1.11.0
among them), the download cache and uv's cache warm (a first build fills them; that run
is not counted). Each round, in fresh folders of the workdir, alternating who goes first:

1. **env build**: the env stage's `run` (plan: lock read, wheels and files located and
   checked; the venv; uv over the local files; activation files), in-process, timed
   from the call to its return; the import check `sdrecipe env build` runs after it is
   not included (it is timed once, apart);
2. **bare uv**: `python -m venv --without-pip` + the same two `uv pip install` calls
   (wheels, then the sdist) of the same files in the same mode (`--link-mode hardlink
   --compile-bytecode --offline --no-index --require-hashes --no-deps`), same uv cache;
3. with `--pip`, once: the env build with uv hidden, i.e. the pip fallback.
Reported: medians, and env build / bare uv (target <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def target_for(deploy: Path, python: str):
    from sdrecipe.config import load_config
    from sdrecipe.layout import Deployment
    from sdrecipe.project import load_recipe
    from sdrecipe.target import Options, Target
    recipe = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")
    return Target(recipe, Deployment(deploy), "cpu", load_config(),
                  options=Options(python=python))


def env_build(deploy: Path, python: str) -> float:
    from sdrecipe.stages import env
    shutil.rmtree(deploy, ignore_errors=True)
    target = target_for(deploy, python)
    start = time.monotonic()
    env.run(target, force=True)
    return time.monotonic() - start


def bare_uv(folder: Path, python: str, requirements: list[Path], uv_cache: Path) -> float:
    from sdrecipe.environment.backends import UV_INSTALL, uv_binary
    shutil.rmtree(folder, ignore_errors=True)
    environ = dict(os.environ, UV_CACHE_DIR=str(uv_cache), UV_PYTHON_DOWNLOADS="never")
    start = time.monotonic()
    subprocess.run([python, "-m", "venv", "--without-pip", str(folder)], check=True)
    for listing in requirements:
        subprocess.run([uv_binary(), *UV_INSTALL, "--python", str(folder / "bin" / "python"),
                        "-r", str(listing)], check=True, capture_output=True, env=environ)
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=os.environ.get(
        "SDRECIPE_TEST_PY38", "/root/.pyenv/versions/3.8.18/bin/python"))
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks/out/env-build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pip", action="store_true", help="also time the pip fallback once")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    from sdrecipe.config import load_config
    uv_cache = Path(load_config().get("cache_dir")).expanduser() / "uv"

    warm = env_build(work / "warm", args.python)  # fills the caches; not counted
    listings = work / "requirements"
    listings.mkdir(exist_ok=True)
    requirements = []
    for name in ("requirements.txt", "requirements-sdist.txt"):
        made = work / "warm" / "envs" / "cpu" / "etc" / "sdrecipe" / name
        if made.is_file():
            requirements.append(Path(shutil.copy(made, listings / name)))
    files = sum(1 for r in requirements for line in r.read_text().splitlines()
                if line and not line.startswith("#"))

    ours, bare = [], []
    for index in range(args.rounds):
        pair = [lambda: ours.append(env_build(work / "deploy", args.python)),
                lambda: bare.append(bare_uv(work / "bare", args.python, requirements, uv_cache))]
        for run in (pair if index % 2 == 0 else pair[::-1]):
            run()
    check_start = time.monotonic()
    from sdrecipe.environment.runtime import import_check
    import_check(target_for(work / "deploy", args.python).deployment, "cpu")
    check = time.monotonic() - check_start

    load = os.getloadavg()[0]
    print(f"{files} files, median of {args.rounds} (load average {load:.1f}, "
          f"{os.cpu_count()} cores); warm-up build {warm:.1f} s")
    print(f"  env build (env stage run):   {statistics.median(ours):6.2f} s  "
          f"(all: {', '.join(f'{t:.2f}' for t in ours)})")
    print(f"  bare uv, same files and mode: {statistics.median(bare):6.2f} s  "
          f"(all: {', '.join(f'{t:.2f}' for t in bare)})")
    print(f"  ratio env build / bare uv:   {statistics.median(ours) / statistics.median(bare):6.2f}"
          "   (target <= 1.5)")
    print(f"  import check (apart):        {check:6.2f} s")
    if args.pip:
        from sdrecipe.environment import backends
        backends.uv_binary = lambda: None  # the fallback path, as on a machine without uv
        pip = env_build(work / "pip", args.python)
        print(f"  env build with pip:          {pip:6.2f} s  "
              f"({pip / statistics.median(bare):.1f}x bare uv)")


if __name__ == "__main__":
    main()
