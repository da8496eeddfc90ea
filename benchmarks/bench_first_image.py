"""Submit-to-first-image latency of `sdrecipe submit generate`, on the local Slurm test cluster.

    python benchmarks/bench_first_image.py --deploy DIR [--rounds 3] [--size 256] [--steps 5]

DIR is a deployment made by `sdrecipe deploy --profile cpu --smoke` (the real
upstream txt2img.py on tiny models). Starts the single-node cluster of
tests/slurm_cluster.py (needs root, slurm-wlm, munge, lmod), then per round
submits a 4-prompt batch over 2 array tasks and measures, from the moment the
`sdrecipe submit generate` process starts: the first prompt folder renamed into
place (the first finished image) and the command's end (every prompt done,
gallery written); and, from the sidecar, how much of the first image was the
task's own imports, model load and sampling. Rounds use fresh output
folders; the cluster is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from slurm_cluster import SlurmCluster  # noqa: E402

PROMPTS = ["a red apple on a table", "a castle on a hill", "a small boat at sea",
           "a lighthouse in a storm"]


def one_round(deploy: Path, env: dict, work: Path, size: int, steps: int) -> dict:
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = work / "out"
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "sdrecipe", "--deploy-dir", str(deploy),
                             "submit", "generate", "--profile", "cpu", "--smoke", "--prompts",
                             str(prompts), "--out", str(out), "--array-tasks", "2", "--height",
                             str(size), "--width", str(size), "--steps", str(steps),
                             "--n-samples", "1", "--cpus-per-task", "1", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and list(out.glob("*/prompt.json")):
            first = time.monotonic() - started
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    ended = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"submit generate failed ({proc.returncode}):\n{stdout}\n{stderr}")
    job = re.search(r"submitted job (\d+)", stdout).group(1)
    sidecars = [json.loads(p.read_text()) for p in out.glob("*/prompt.json")]
    first_load = max(s["timing"]["total_s"] for s in sidecars if s["timing"]["model_load_s"])
    return {"job": job, "first_image_s": round(first or ended, 2), "all_done_s": round(ended, 2),
            "first_prompt_inside_the_job_s": first_load}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deploy", required=True, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cluster = SlurmCluster()
    started = time.monotonic()
    cluster.start()
    cluster_s = time.monotonic() - started
    try:
        work = Path(tempfile.mkdtemp(prefix="bench-first-image-"))
        config = work / "config.yaml"
        config.write_text(f"partition: {cluster.partition}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SDRECIPE_", "SLURM_"))}
        env.update(cluster.env, SDRECIPE_CONFIG=str(config), PYTHONPATH=str(ROOT / "src"))
        rounds = []
        for n in range(args.rounds):
            folder = work / f"round-{n}"
            folder.mkdir()
            rounds.append(one_round(args.deploy.resolve(), env, folder, args.size, args.steps))
    finally:
        cluster.stop()
        cluster.remove()
    print(json.dumps({"cluster_start_s": round(cluster_s, 1), "rounds": rounds,
                      "median_first_image_s": statistics.median(r["first_image_s"] for r in rounds),
                      "median_all_done_s": statistics.median(r["all_done_s"] for r in rounds)},
                     indent=2))


if __name__ == "__main__":
    main()
