"""Run upstream's txt2img.py unchanged, as `python txt2img.py ARGS` would, then say what ran it.

    python run_txt2img.py /path/to/scripts/txt2img.py ARGS...

Executes the script as `__main__` with runpy (same sys.argv, same sys.path[0]) and,
whether it succeeds or not, prints one line `SDRECIPE-RUNTIME {json}` with the
versions of torch, transformers and diffusers and the device the sample ran on.
Asking in the same process saves `sdrecipe verify` a second multi-second import
of torch. Runs under the target environment's Python (3.8).
"""

import json
import os
import runpy
import sys


def _version(module):
    try:
        return __import__(module).__version__
    except Exception as exc:  # report what is broken instead of hiding the sample's outcome
        return "unavailable: %s" % exc


def runtime():
    info = {"python": sys.version.split()[0]}
    for module in ("torch", "transformers", "diffusers"):
        info[module] = _version(module)
    try:
        import torch
        if torch.cuda.is_available():  # DCU (HIP) devices also answer through torch.cuda
            info["device"] = torch.cuda.get_device_name(0)
            info["backend"] = "hip %s" % torch.version.hip if getattr(torch.version, "hip", None) \
                else "cuda %s" % torch.version.cuda
        else:
            info["device"] = "cpu"
            info["backend"] = "cpu"
    except Exception as exc:
        info["device"] = "unavailable: %s" % exc
    return info


def main():
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    sys.path[0] = os.path.dirname(script)
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        print("SDRECIPE-RUNTIME " + json.dumps(runtime(), sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
