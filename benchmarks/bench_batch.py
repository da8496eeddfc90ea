"""Prompt batches: one process per array task (model loaded once) vs one txt2img process per prompt.

    python benchmarks/bench_batch.py --deploy DIR [--prompts 4] [--size 256] [--steps 5] [--rounds 3]
    python benchmarks/bench_batch.py --deploy DIR --prompts 200 --rounds 1   # at scale

DIR is a deployment made by `sdrecipe deploy --profile cpu --smoke` (the real
upstream txt2img.py on tiny models). Both contenders run the same prompts with
the same settings under the environment's Python, on this machine, without
Slurm (the scheduler is not what is measured):

- runner: `payload/txt2img_batch.py` once, as one array task does;
- per prompt: `python scripts/txt2img.py --prompt P ...` once per prompt.

Rounds alternate which contender goes first (the machine is shared); reports
each round, the medians and prompts per minute, and checks the images are
byte-identical (the runner's claim). More prompts than the eight below are
numbered variations of them ("..., variation 9"), all distinct. On tiny models the saving is imports + the safety checker +
model construction per prompt; on the real 4 GB checkpoint the load itself adds
tens of seconds per prompt on top.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sdrecipe import batch  # noqa: E402
from sdrecipe.environment.location import env_python  # noqa: E402
from sdrecipe.environment.runtime import activation_env  # noqa: E402
from sdrecipe.layout import Deployment  # noqa: E402
from sdrecipe.payload import txt2img_batch  # noqa: E402
from sdrecipe.models import smoke_models  # noqa: E402
from sdrecipe.project import load_recipe  # noqa: E402
from sdrecipe.recipe import find_recipe  # noqa: E402

PROMPTS = ["a red apple on a table", "a castle on a hill", "a small boat at sea",
           "a lighthouse in a storm", "a bowl of ramen", "an astronaut riding a horse",
           "a fox in the snow", "a city at night"]


def prompt_list(count: int) -> list[str]:
    return [PROMPTS[n] if n < len(PROMPTS) else f"{PROMPTS[n % len(PROMPTS)]}, variation {n}"
            for n in range(count)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--deploy", required=True, type=Path)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    deployment = Deployment(args.deploy.resolve())
    models = smoke_models(load_recipe(find_recipe()), deployment, "cpu")
    python = env_python(deployment, "cpu")
    env = {**os.environ, **activation_env(deployment, "cpu"),
           "SD_MODELS_DIR": str(models.models_dir), "TORCH_HOME": str(models.torch_home)}
    settings = dict(batch.DEFAULT_SETTINGS, steps=args.steps, n_samples=1, H=args.size,
                    W=args.size, precision="full", smoke=True)
    orders = ("runner-first", "processes-first")
    rounds = [one_round(deployment, models, python, env, settings, args.prompts, orders[n % 2])
              for n in range(args.rounds)]
    runner = statistics.median(r["runner_s"] for r in rounds)
    alone = statistics.median(r["per_prompt_processes_s"] for r in rounds)
    print(json.dumps({
        "prompts": args.prompts, "size": args.size, "steps": args.steps, "rounds": rounds,
        "median_runner_s": round(runner, 1), "median_per_prompt_processes_s": round(alone, 1),
        "runner_prompts_per_min": round(args.prompts / runner * 60, 1),
        "per_prompt_processes_prompts_per_min": round(args.prompts / alone * 60, 1),
        "speedup": round(alone / runner, 2)}, indent=2))


def one_round(deployment, models, python, env, settings, count, order):
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    prompt_file = work / "prompts.txt"
    prompt_file.write_text("\n".join(prompt_list(count)) + "\n")
    entries = batch.plan(prompt_file, settings)
    out = work / "runner"
    manifest = work / "manifest.json"
    manifest.write_text(batch.manifest_text(entries, settings, out, deployment.source, models))

    def runner():
        subprocess.run([str(python), txt2img_batch.__file__, str(manifest), "0", "1"],
                       cwd=deployment.source, env=env, check=True, capture_output=True)

    def processes():
        for entry in entries:
            subprocess.run([str(python), "scripts/txt2img.py", "--prompt", entry.prompt,
                            "--outdir", str(work / "alone" / entry.folder)]
                           + txt2img_batch.txt2img_args(settings, {"config": str(models.config),
                                                                   "ckpt": str(models.ckpt)}),
                           cwd=deployment.source, env=env, check=True, capture_output=True)

    seconds = {}
    for name, run in ((("runner", runner), ("processes", processes)) if order == "runner-first"
                      else (("processes", processes), ("runner", runner))):
        started = time.monotonic()
        run()
        seconds[name] = time.monotonic() - started
    identical = sum((work / "alone" / e.folder / "samples" / "00000.png").read_bytes()
                    == (out / e.folder / "00000.png").read_bytes() for e in entries)
    sidecars = [json.loads((out / e.folder / "prompt.json").read_text()) for e in entries]
    shutil.rmtree(work)
    per_prompt = [s["timing"]["total_s"] for s in sidecars]
    return {"order": order, "runner_s": round(seconds["runner"], 1),
            "per_prompt_processes_s": round(seconds["processes"], 1),
            "runner_first_prompt_s": per_prompt[0],
            "runner_later_prompts_median_s": statistics.median(per_prompt[1:] or per_prompt),
            "identical_images": f"{identical}/{len(entries)}"}


if __name__ == "__main__":
    main()
