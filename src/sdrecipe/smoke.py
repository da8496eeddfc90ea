"""Smoke mode's tiny models: the whole pipeline in seconds, without 4 GB of weights.

`payload/make_tiny_models.py` runs under the ENVIRONMENT's Python (the pickles must be
written by the torch/transformers that read them) and writes, into `<deploy>/smoke/`,
models of the same classes as upstream's v1 config with tiny dimensions, a tiny CLIP
text model + byte-level BPE tokenizer and a tiny safety checker in the folder names
the local-model patch expects, and the config to pass as txt2img's `--config`
(`models.smoke_models` names them for verify).

kornia 0.6.0 loads HardNet's checkpoint from `$TORCH_HOME` while being imported
(kornia issue 1422; txt2img imports it through ldm's encoders) although txt2img
never uses it. Smoke mode downloads nothing, so when the environment's kornia asks,
the generator writes random HardNet weights into `<deploy>/smoke/torch-home`, which
only the smoke run uses as `$TORCH_HOME`. Real runs use the fetched checkpoint.

The models are made in a staging folder and renamed into place whole; what they
were made from and each file's sha256 is the preseed stage's record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from .environment.location import env_python
from .environment.runtime import network_isolation, offline_run_env, payload_path, tail_lines
from .errors import SdrecipeError
from .files import sha256_file

GENERATOR = "make_tiny_models.py"


def generator_sha256() -> str:
    return sha256_file(payload_path(GENERATOR))


def file_hashes(root: Path) -> dict:
    """Relative path -> sha256 of every file under `root`."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def generate(target) -> dict:
    """Run the generator in the env into a staging folder, then rename it into place;
    returns the generator's summary (parameters, whether a HardNet stand-in was needed)."""
    deployment, profile = target.deployment, target.profile
    root = deployment.smoke
    staging = root.with_name(".smoke.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    prefix, _ = network_isolation()
    command = prefix + [str(env_python(deployment, profile)), str(payload_path(GENERATOR)),
                        "--source", str(deployment.source), "--out", str(staging)]
    environ = offline_run_env(deployment, profile)
    environ["TORCH_HOME"] = str(staging / "torch-home")
    # the generator imports ldm from the checkout to instantiate the upstream classes
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deployment.source),
                                                          environ.get("PYTHONPATH")]))
    result = subprocess.run(command, env=environ, cwd=staging, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = "\n".join(tail_lines(result.stdout + result.stderr))
        raise SdrecipeError(f"generating the tiny smoke models failed (exit {result.returncode}) "
                            f"with {command[len(prefix)]}:\n{tail}\n"
                            f"Check the environment: {target.command('env check')}")
    summary = next((json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
                    if line.startswith("SMOKE-ASSETS ")), {})
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)
    return summary
