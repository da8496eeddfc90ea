"""A 1,000-prompt gallery: how long writing it takes, how big its pages are, and a look at
it in headless Chromium.

    python benchmarks/bench_gallery.py [--prompts 1000] [--size 128] [--work /tmp/gallery-bench]
                                       [--chromium chromium]

Makes the batch's outputs with the batch runner (`payload/txt2img_batch.py`, one
process, as one array task) over the Slurm tests' stand-in for upstream's
txt2img.py (tests/payloads/standin_txt2img.py: small PNGs whose pixels follow the
prompt), so it needs no models and takes seconds. Then writes the gallery twice
(first: every thumbnail made; second: thumbnails already there, as when `submit
generate` rewrites it while tasks finish) and, if Chromium is installed, takes a
screenshot of the first page (`<work>/gallery.png`) and times that render.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sdrecipe import batch, gallery  # noqa: E402
from sdrecipe.payload import txt2img_batch  # noqa: E402


class StandinModels:
    config, ckpt = "stand-in.yaml", "stand-in.ckpt"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gallery-bench"))
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    source, out = args.work / "upstream", args.work / "out"
    (source / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "payloads" / "standin_txt2img.py", source / "scripts" / "txt2img.py")
    prompts = args.work / "prompts.txt"
    prompts.write_text("".join(f"prompt {n}: a lighthouse in a storm, colour study\n"
                               for n in range(args.prompts)))
    settings = dict(batch.DEFAULT_SETTINGS, steps=5, n_samples=3, H=args.size, W=args.size,
                    precision="full", smoke=True)
    entries = batch.plan(prompts, settings)
    manifest = args.work / "manifest.json"
    manifest.write_text(batch.manifest_text(entries, settings, out, source, StandinModels))
    started = time.monotonic()
    subprocess.run([sys.executable, txt2img_batch.__file__, str(manifest), "0", "1"], check=True,
                   capture_output=True)
    made_s = time.monotonic() - started
    timings = []
    for _ in range(2):
        started = time.monotonic()
        first, done = gallery.write_gallery(entries, out, f"{prompts.name}: {len(entries)} prompts")
        timings.append(round(time.monotonic() - started, 2))
    pages = sorted(out.glob("gallery*.html"))
    result = {"prompts": len(entries), "images": 3 * len(entries), "done": done,
              "runner_s": round(made_s, 1), "gallery_first_write_s": timings[0],
              "gallery_rewrite_s": timings[1], "pages": len(pages),
              "largest_page_kb": round(max(p.stat().st_size for p in pages) / 1024, 1),
              "thumbnails_kb": round(sum(p.stat().st_size for p in
                                         (out / gallery.THUMBNAILS).rglob("*.jpg")) / 1024)}
    if shutil.which(args.chromium):
        shot = args.work / "gallery.png"
        renders = []
        for _ in range(3):
            started = time.monotonic()
            subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu",
                            "--hide-scrollbars", "--window-size=1280,1600",
                            f"--screenshot={shot}", first.as_uri()], check=True,
                           capture_output=True)
            renders.append(round(time.monotonic() - started, 2))
        result.update(chromium_screenshot=str(shot), chromium_runs_s=renders)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
