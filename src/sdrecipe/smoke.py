"""Smoke mode: the whole pipeline in seconds, on tiny random models instead of 4 GB of weights.

`payload/make_tiny_models.py` runs under the ENVIRONMENT's Python (the pickles must be
written by the torch/transformers that read them) and writes, into `<deploy>/smoke/`,
models of the same classes as upstream's v1 config with tiny dimensions, a tiny CLIP
text model + byte-level BPE tokenizer and a tiny safety checker in the folder names
the local-model patch expects, and the config to pass as txt2img's `--config`.
The smoke run points `$SD_MODELS_DIR` at `<deploy>/smoke/models`, so real model
files in `<deploy>/stable-diffusion/models` are never touched or shadowed.

kornia 0.6.0 loads HardNet's checkpoint from `$TORCH_HOME` while being imported
(kornia issue 1422; txt2img imports it through ldm's encoders) although txt2img
never uses it. Smoke mode downloads nothing, so when the environment's kornia asks,
the generator writes random HardNet weights into `<deploy>/smoke/torch-home`, which
only the smoke run uses as `$TORCH_HOME`. Real runs use the fetched checkpoint.

A stamp (`<deploy>/smoke/stamp.json`) records the generator, the upstream config and
the environment it was made with, plus each file's sha256: regeneration happens
only when one of those changed or a file drifted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .errors import SdrecipeError
from .files import sha256_file
from .verify import Models, payload_path, tail_lines

GENERATOR = "make_tiny_models.py"
STAMP = "stamp.json"
CONFIG = "v1-inference-smoke.yaml"
CKPT = Path("models") / "ldm" / "stable-diffusion-v1" / "model.ckpt"
UPSTREAM_CONFIG = Path("configs") / "stable-diffusion" / "v1-inference.yaml"


def smoke_root(deployment) -> Path:
    return deployment.smoke


def smoke_models(deployment) -> Models:
    root = smoke_root(deployment)
    return Models(config=root / CONFIG, ckpt=root / CKPT, models_dir=root / "models",
                  torch_home=root / "torch-home",
                  description="smoke: tiny randomly initialised models (no real weights)")


def smoke_inputs(deployment, profile: str) -> dict:
    """What the tiny models depend on; a change to any of them means regenerate."""
    from .env import env_record
    record = env_record(deployment, profile) or {}
    config = deployment.source / UPSTREAM_CONFIG
    return {"generator": sha256_file(payload_path(GENERATOR)),
            "upstream_config": sha256_file(config) if config.is_file() else None,
            "env_stamp": record.get("stamp")}


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != STAMP}


def smoke_state(deployment, profile: str) -> tuple[str, str]:
    """("done" | "stale" | "missing", why)."""
    root = smoke_root(deployment)
    try:
        stamp = json.loads((root / STAMP).read_text())
    except FileNotFoundError:
        return "missing", "no tiny models generated yet"
    except (OSError, ValueError):
        return "stale", f"{root / STAMP} is unreadable"
    inputs = smoke_inputs(deployment, profile)
    changed = sorted(k for k in inputs if stamp.get("inputs", {}).get(k) != inputs[k])
    if changed:
        return "stale", f"changed since generation: {', '.join(changed)}"
    files = _files(root)
    drifted = sorted(k for k in set(files) | set(stamp["files"]) if files.get(k) != stamp["files"].get(k))
    if drifted:
        return "stale", f"files changed or missing: {', '.join(drifted[:5])}"
    return "done", f"{len(files)} files in {root}"


def generator_environment(deployment, profile: str) -> dict:
    from .env import offline_run_env
    env = offline_run_env(deployment, profile)
    env["TORCH_HOME"] = str(smoke_root(deployment) / "torch-home")
    # the generator imports ldm from the checkout to instantiate the upstream classes
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deployment.source), env.get("PYTHONPATH")]))
    return env


def ensure_smoke_models(deployment, profile: str, force: bool = False) -> str:
    """Generate the tiny models unless the stamp says they are current; returns what was done."""
    from .env import env_python, network_isolation
    state, reason = smoke_state(deployment, profile)
    if state == "done" and not force:
        return f"tiny models up to date ({reason})"
    root = smoke_root(deployment)
    staging = root.with_name(".smoke.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    prefix, _ = network_isolation()
    command = prefix + [str(env_python(deployment, profile)), str(payload_path(GENERATOR)),
                        "--source", str(deployment.source), "--out", str(staging)]
    environ = generator_environment(deployment, profile)
    environ["TORCH_HOME"] = str(staging / "torch-home")
    result = subprocess.run(command, env=environ, cwd=staging, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join(tail_lines(result.stdout + result.stderr))
        raise SdrecipeError(f"generating the tiny smoke models failed (exit {result.returncode}) "
                            f"with {command[len(prefix)]}:\n{tail}\n"
                            f"Check the environment: sdrecipe env check --profile {profile}")
    summary = next((json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                    if line.startswith("SMOKE-ASSETS ")), {})
    stamp = {"inputs": smoke_inputs(deployment, profile), "files": _files(staging),
             "summary": summary}
    (staging / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)
    return (f"generated tiny models ({summary.get('parameters', '?')} parameters"
            + (", HardNet stand-in for kornia" if summary.get("hardnet_standin") else "") + ")")


def file_hashes(deployment) -> dict:
    """sha256 of each smoke file, from the stamp (for provenance.json)."""
    try:
        return json.loads((smoke_root(deployment) / STAMP).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}
