"""Which weights a run of txt2img loads: the deployment's pinned ones, or smoke's tiny stand-ins.

Both are laid out by the recipe's `artifacts: into:` (the checkpoint is the profile's
required `.ckpt` file); smoke mode mirrors the `models` root under `<deploy>/smoke/`,
with its own config and $TORCH_HOME, so real model files are never touched or shadowed.
verify, the preseed stage and batch jobs all take their paths from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import SdrecipeError

UPSTREAM_CONFIG = Path("configs") / "stable-diffusion" / "v1-inference.yaml"
SMOKE_CONFIG = "v1-inference-smoke.yaml"
MODELS_ENV = "SD_MODELS_DIR"  # where the patched upstream looks for its local model folders


@dataclass(frozen=True)
class Models:
    config: Path
    ckpt: Path
    models_dir: Path  # $SD_MODELS_DIR for the patched upstream
    torch_home: Path | None  # overrides the activation's TORCH_HOME when set
    description: str


def checkpoint_place(recipe, profile: str) -> str:
    """The checkpoint's path under the `models` root, from the recipe."""
    from .artifacts import select
    found = [f.dest for f in select(recipe, profile, roots=("models",)) if f.dest.endswith(".ckpt")]
    if len(found) != 1:
        raise SdrecipeError(f"{recipe.path}: artifacts: expected one required .ckpt file for "
                            f"profile {profile} under models/, found {len(found)}")
    return found[0]


def real_models(recipe, deployment, profile: str) -> Models:
    return Models(config=deployment.source / UPSTREAM_CONFIG,
                  ckpt=deployment.models / checkpoint_place(recipe, profile),
                  models_dir=deployment.models, torch_home=None,
                  description="the deployment's pinned weights")


def smoke_models(recipe, deployment, profile: str) -> Models:
    root = deployment.smoke
    return Models(config=root / SMOKE_CONFIG,
                  ckpt=root / "models" / checkpoint_place(recipe, profile),
                  models_dir=root / "models", torch_home=root / "torch-home",
                  description="smoke: tiny randomly initialised models (no real weights)")


def models_for(recipe, deployment, profile: str, smoke: bool) -> Models:
    return (smoke_models if smoke else real_models)(recipe, deployment, profile)
