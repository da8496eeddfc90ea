"""Import check, run by the environment's own Python (3.8 on the target): one process, JSON out.

sdrecipe runs this file with the built environment's interpreter after activation
(`sdrecipe env build`, `sdrecipe env check`, `sdrecipe doctor`). Every import that
upstream's txt2img needs is tried in turn; a failure becomes a row with the error,
never a traceback, so one broken package does not hide the others. The network is
cut first: kornia 0.6 loads its HardNet checkpoint from $TORCH_HOME at import,
and a download attempt there means the preseed is missing.

Prints one JSON object: {"python": ..., "rows": [{"name", "ok", "version", "detail"}]}.
Runs on Python 3.6+ with the standard library only.
"""

import json
import os
import socket
import sys
import traceback


class NetworkBlocked(OSError):
    """Raised instead of any network connection made during the check."""


def block_network():
    """Refuse every outgoing connection in this process (the check must work offline)."""
    def refuse(*args, **kwargs):
        raise NetworkBlocked("network access attempted during the offline import check")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse


def version_of(module):
    return str(getattr(module, "__version__", "") or "")


def check_torch_libraries():
    """ldd of torch's extension modules (torch/*.so), before importing torch: every library
    they need, transitively, resolves (the DTK torch's libtorch needs libmpi.so.40), and
    from where. torch/lib/ alone also holds libraries loaded only on demand (nvrtc needs
    the driver's libcuda), so it is not checked file by file."""
    import glob
    import importlib.util
    import subprocess
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("no torch package in this environment")
    folder = list(spec.submodule_search_locations)[0]
    libraries = sorted(glob.glob(os.path.join(folder, "*.so")))
    missing, resolved = {}, {}
    for library in libraries:
        out = subprocess.run(["ldd", library], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True).stdout
        for line in out.splitlines():
            name, _, where = line.strip().partition(" => ")
            if where.strip() == "not found":
                missing.setdefault(name, []).append(os.path.basename(library))
            elif where:
                resolved[name] = where.split(" (")[0].strip()
    if missing:
        raise ImportError("; ".join("%s not found (needed by %s)" % (name, ", ".join(users))
                                    for name, users in sorted(missing.items())))
    mpi = resolved.get("libmpi.so.40")
    return "", "%d extension modules resolve%s" % (len(libraries), "; libmpi.so.40 => " + mpi
                                                    if mpi else "")


def check_torch():
    import torch
    if torch.cuda.is_available():
        backend = "hip " + torch.version.hip if getattr(torch.version, "hip", None) else "cuda"
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device = "%s: %s" % (backend, ", ".join(names))
    else:
        built = "hip" if getattr(torch.version, "hip", None) else (
            "cuda " + torch.version.cuda if torch.version.cuda else "cpu")
        device = "cpu (no accelerator visible; torch built for %s)" % built
    return torch.__version__, device


def check_torchvision():
    import torchvision
    return torchvision.__version__, ""


def check_pytorch_lightning():
    import pytorch_lightning
    from pytorch_lightning import seed_everything  # noqa: F401  (txt2img uses it)
    return pytorch_lightning.__version__, ""


def check_transformers():
    import transformers
    from transformers import AutoFeatureExtractor, CLIPTextModel, CLIPTokenizer  # noqa: F401
    return transformers.__version__, "CLIPTextModel, CLIPTokenizer, AutoFeatureExtractor"


def check_safety_checker():
    import diffusers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    return diffusers.__version__, StableDiffusionSafetyChecker.__name__


def check_taming():
    from taming.modules.vqvae.quantize import VectorQuantizer  # noqa: F401
    import taming
    return version_of(taming), "taming.modules.vqvae.quantize.VectorQuantizer"


def check_clip():
    import clip
    if not hasattr(clip, "load"):
        raise ImportError("the module named 'clip' at %s has no clip.load: it is PyPI's "
                          "unrelated 'clip' package; install clip-anytorch instead"
                          % getattr(clip, "__file__", "?"))
    return version_of(clip), clip.__file__


def check_kornia():
    torch_home = os.environ.get("TORCH_HOME", "")
    import kornia
    return kornia.__version__, "imported offline; TORCH_HOME=" + torch_home


def check_imwatermark():
    import imwatermark
    from imwatermark import WatermarkEncoder  # noqa: F401
    return version_of(imwatermark), "WatermarkEncoder"


def check_cv2():
    import cv2
    return cv2.__version__, ""


def check_omegaconf():
    import omegaconf
    return omegaconf.__version__, ""


def check_einops():
    import einops
    return einops.__version__, ""


# (row name, check) in the order txt2img meets them; kornia runs after the network is cut.
CHECKS = [
    ("torch libraries (ldd)", check_torch_libraries),
    ("torch", check_torch),
    ("torchvision", check_torchvision),
    ("pytorch_lightning", check_pytorch_lightning),
    ("transformers", check_transformers),
    ("diffusers safety checker", check_safety_checker),
    ("taming", check_taming),
    ("clip", check_clip),
    ("kornia", check_kornia),
    ("imwatermark", check_imwatermark),
    ("cv2", check_cv2),
    ("omegaconf", check_omegaconf),
    ("einops", check_einops),
]


def reached_network(exc):
    """Whether `exc` (or what it wraps, e.g. urllib's URLError.reason) is our network block."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, NetworkBlocked):
            return True
        exc = getattr(exc, "reason", None) if isinstance(getattr(exc, "reason", None),
                                                          BaseException) else (
            exc.__cause__ or exc.__context__)
        seen += 1
    return False


def run(name, check):
    try:
        version, detail = check()
        return {"name": name, "ok": True, "version": version, "detail": detail}
    except BaseException as exc:  # a broken package may raise anything, even SystemExit
        last = traceback.extract_tb(exc.__traceback__)[-1:] or [None]
        where = " (at %s:%s)" % (last[0].filename, last[0].lineno) if last[0] else ""
        message = "%s: %s%s" % (type(exc).__name__, exc, where)
        if reached_network(exc):
            message = "tried to download during import: " + message
        return {"name": name, "ok": False, "version": "", "detail": message}


def main():
    block_network()
    rows = [run(name, check) for name, check in CHECKS]
    json.dump({"python": sys.version.split()[0], "executable": sys.executable, "rows": rows},
              sys.stdout)
    sys.stdout.write("\n")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
