"""No-op re-deploy benchmark: `sdrecipe deploy --smoke` over a complete deployment.

    SDRECIPE_UPSTREAM=/path/to/stable-diffusion \\
    python benchmarks/bench_redeploy.py [--rounds 5] [--workdir benchmarks/out/redeploy] \\
        [--python /path/to/python3.8]

The first run deploys the cpu profile in smoke mode from nothing into the workdir
(copy of the upstream checkout, patches, a venv of the locked environment, tiny
models, the verification sample) and prints how long that took and the sample's
stage timings (`--fresh` removes the workdir's deployment first; the download and uv
caches stay warm: target <= 10 s). Then, with everything done, it times (median of
`rounds`):

1. `./scripts/deploy.sh --profile cpu --smoke` (the wrapper checks the engine's
   dependencies in a first interpreter, then runs it);
2. `python -m sdrecipe deploy --profile cpu --smoke` as a fresh process;
3. `deploy()` in-process (the stage checks alone);
4. `python -m sdrecipe status --profile cpu --smoke`.
Target: about a second for (1)/(2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def timed(command, environ) -> float:
    start = time.monotonic()
    subprocess.run(command, env=environ, check=True, capture_output=True)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "redeploy")
    parser.add_argument("--python", default=os.environ.get(
        "SDRECIPE_TEST_PY38", "/root/.pyenv/versions/3.8.18/bin/python"))
    parser.add_argument("--fresh", action="store_true",
                        help="remove the deployment first: time the smoke deploy from nothing")
    args = parser.parse_args()
    if not os.environ.get("SDRECIPE_UPSTREAM"):
        parser.error("set SDRECIPE_UPSTREAM to a checkout of the pinned upstream commit")
    deploy_dir = args.workdir.resolve() / "deploy"
    environ = dict(os.environ, SDRECIPE_DEPLOY_DIR=str(deploy_dir),
                   PYTHONPATH=str(ROOT / "src"))
    cli = [sys.executable, "-m", "sdrecipe"]
    if args.fresh:
        import shutil
        shutil.rmtree(deploy_dir, ignore_errors=True)
    if not (deploy_dir / "provenance.json").is_file():
        first = timed(cli + ["deploy", "--profile", "cpu", "--smoke", "--python", args.python],
                      environ)
        print(f"smoke deploy from nothing (warm caches): {first:.1f} s   (target <= 10 s; "
              f"load average {os.getloadavg()[0]:.1f})")
    report = json.loads((deploy_dir / "reports" / "cpu" / "smoke" / "report.json").read_text())
    print("smoke sample timings: " + ", ".join(f"{k} {v}" for k, v in report["timings"].items()))

    from sdrecipe.config import load_config
    from sdrecipe.deploy import deploy
    from sdrecipe.layout import Deployment
    from sdrecipe.project import load_recipe
    from sdrecipe.recipe import find_recipe
    from sdrecipe.target import Target
    target = Target(load_recipe(find_recipe()), Deployment(deploy_dir), "cpu", load_config(),
                    smoke=True)
    results = {
        "./scripts/deploy.sh": [timed([str(ROOT / "scripts" / "deploy.sh"), "--profile", "cpu",
                                       "--smoke"], environ) for _ in range(args.rounds)],
        "python -m sdrecipe deploy": [timed(cli + ["deploy", "--profile", "cpu", "--smoke"], environ)
                                      for _ in range(args.rounds)],
        "deploy() in-process": [],
        "python -m sdrecipe status": [],
    }
    for _ in range(args.rounds):
        start = time.monotonic()
        deploy(target)
        results["deploy() in-process"].append(time.monotonic() - start)
        try:
            results["python -m sdrecipe status"].append(
                timed(cli + ["status", "--profile", "cpu", "--smoke"], environ))
        except subprocess.CalledProcessError:
            raise SystemExit("status is not all done: the deployment is incomplete") from None
    load = os.getloadavg()[0]
    print(f"no-op re-deploy, median of {args.rounds} (load average {load:.1f} on {os.cpu_count()} cores):")
    for name, times in results.items():
        print(f"  {name:<28} {statistics.median(times):6.2f} s   (min {min(times):.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
