"""Offline bundle benchmark: make a smoke bundle of the cpu profile, deploy a node from it
with the network cut, and make it again after a lock change.

    SDRECIPE_UPSTREAM=/path/to/stable-diffusion \\
    python benchmarks/bench_bundle.py [--workdir benchmarks/out/bundle] [--python /path/to/python3.8]

1. `bundle create --profile cpu --smoke` (warm download cache: the engine's wheels
   from pip's cache, the 66 environment files hardlinked from sdrecipe's): time, size;
2. `B/scripts/deploy.sh --from-bundle B --profile cpu --smoke` under `unshare -n`,
   `env -i`, a fresh HOME (empty caches) and PIP_CONFIG_FILE=/dev/null: the engine
   bootstrap plus the whole deploy, time;
3. a second deploy over the complete deployment (the bundle is not opened), time;
4. `bundle create` again into the same folder after one package left the lock: time,
   files rewritten and kept.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(command, environ=None) -> tuple[float, str]:
    start = time.monotonic()
    done = subprocess.run(command, env=environ, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.monotonic() - start, done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "bundle")
    parser.add_argument("--python", default=os.environ.get(
        "SDRECIPE_TEST_PY38", "/root/.pyenv/versions/3.8.18/bin/python"))
    args = parser.parse_args()
    upstream = os.environ.get("SDRECIPE_UPSTREAM")
    if not upstream:
        parser.error("set SDRECIPE_UPSTREAM to a checkout of the pinned upstream commit")
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    project, bundle, home, bin_dir = work / "project", work / "bundle", work / "home", work / "bin"
    for name in ("recipe", "env", "lock", "patches"):
        shutil.copytree(ROOT / name, project / name)
    home.mkdir()
    bin_dir.mkdir()
    (bin_dir / "python3.8").symlink_to(args.python)
    (bin_dir / f"python{sys.version_info[0]}.{sys.version_info[1]}").symlink_to(sys.executable)
    create = [sys.executable, "-m", "sdrecipe", "--recipe",
              str(project / "recipe" / "stable-diffusion.yaml"), "--deploy-dir",
              str(work / "login"), "bundle", "create", "--profile", "cpu", "--smoke",
              "--source", upstream, str(bundle)]
    environ = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    made_s, report = run(create, environ)
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    node = ["unshare", "-n", "env", "-i", f"HOME={home}", f"PATH={bin_dir}:/usr/bin:/bin",
            "LANG=C.UTF-8", f"PIP_CONFIG_FILE={os.devnull}"]
    deploy = node + [str(bundle / "scripts" / "deploy.sh"), "--deploy-dir", str(work / "node"),
                     "--from-bundle", str(bundle), "--profile", "cpu", "--smoke"]
    first_s, _ = run(deploy)
    again_s, _ = run(deploy)
    shutil.rmtree(bundle / ".engine")  # made by the node's wrapper: not part of the bundle
    lock_file = project / "lock" / "cpu.conda-lock.yml"
    lock = yaml.safe_load(lock_file.read_text())
    lock["package"] = [p for p in lock["package"] if p["name"] != "einops"]
    lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
    remade_s, remade = run(create, environ)
    counts = re.search(r"(\d+) files written, (\d+) unchanged", remade)
    print(json.dumps({
        "bundle_create_s": round(made_s, 1), "bundle_bytes": size,
        "bundle_files": len(json.loads((bundle / "manifest.json").read_text())["files"]),
        "offline_deploy_from_nothing_s": round(first_s, 1),
        "offline_redeploy_s": round(again_s, 2),
        "create_again_after_lock_change_s": round(remade_s, 1),
        "rewritten": int(counts.group(1)), "kept": int(counts.group(2)),
        "report": report.strip().splitlines()[-8:-1]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
