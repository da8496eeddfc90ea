"""Stand-in for upstream's scripts/txt2img.py in the Slurm tests (CI has no upstream checkout).

It keeps the parts of upstream's interface the batch runner relies on: the
module-level `load_model_from_config(config, ckpt)` and a `main()` that parses the
same options from sys.argv, writes `<outdir>/samples/NNNNN.png` and prints
"Enjoy.". Images are small PNGs whose pixels depend on the prompt and seed,
written with the standard library only (it runs under Python 3.8).
If $STANDIN_TXT2IMG_FAIL is set, a prompt containing that text raises, to play
a prompt that crashes halfway through a batch; $STANDIN_TXT2IMG_SLEEP makes each
prompt take that many seconds, to play a batch that is still running.
"""

import argparse
import hashlib
import os
import struct
import time
import zlib


def load_model_from_config(config, ckpt, verbose=False):
    print("Loading model from %s" % ckpt, flush=True)
    time.sleep(0.2)
    return {"config": config, "ckpt": ckpt}


def _png(path, width, height, seed_bytes):
    rows = []
    for y in range(height):
        row = bytearray([0])
        for x in range(width):
            row += bytes(((seed_bytes[c] + x * (c + 1) + y * (3 - c)) % 256) for c in range(3))
        rows.append(bytes(row))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", default="a painting of a virus monster playing guitar")
    parser.add_argument("--outdir", default="outputs/txt2img-samples")
    parser.add_argument("--skip_grid", action="store_true")
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--plms", action="store_true")
    parser.add_argument("--dpm_solver", action="store_true")
    parser.add_argument("--n_iter", type=int, default=2)
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--W", type=int, default=512)
    parser.add_argument("--n_samples", type=int, default=3)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ckpt", default="models/ldm/stable-diffusion-v1/model.ckpt")
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--precision", choices=["full", "autocast"], default="autocast")
    opt = parser.parse_args()
    load_model_from_config({"model": "stand-in"}, opt.ckpt)
    fail = os.environ.get("STANDIN_TXT2IMG_FAIL")
    if fail and fail in opt.prompt:
        raise RuntimeError("stand-in failure for prompt %r" % opt.prompt)
    time.sleep(float(os.environ.get("STANDIN_TXT2IMG_SLEEP", "0")))
    samples = os.path.join(opt.outdir, "samples")
    os.makedirs(samples, exist_ok=True)
    for n in range(opt.n_iter * opt.n_samples):
        digest = hashlib.sha256(("%s|%d|%d" % (opt.prompt, opt.seed, n)).encode()).digest()
        _png(os.path.join(samples, "%05d.png" % n), opt.W, opt.H, digest)
    print("Your samples are ready and waiting for you here: \n%s \n \nEnjoy." % opt.outdir)
