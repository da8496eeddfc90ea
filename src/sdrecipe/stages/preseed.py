"""Stage `preseed`: what the environment needs at import time and the models it runs on
in this mode.

- real: the `torch_home` files of the recipe (kornia 0.6.0's HardNet, which it loads
  while being imported) placed in $TORCH_HOME, then the offline import check, which
  only passes once they are there;
- smoke: the tiny models generated inside the environment (`smoke.py`).

Record (per profile and mode): the files with their sha256, built on the env (and,
for smoke, on the patched checkout whose classes the generator instantiates).
"""

from __future__ import annotations

from ..errors import SdrecipeError
from . import State, StageResult, StageStatus, changed_dependencies, incomplete_status
from . import artifacts as artifacts_stage
from . import env as env_stage
from . import patches as patches_stage

NAME = "preseed"
ROOTS = ("torch_home",)


def record(target):
    return target.record(NAME, per_mode=True)


def built_on(target) -> dict:
    found = {"env": env_stage.record(target).digest()}
    if target.smoke:
        found["patches"] = patches_stage.record(target).digest()
    return found


def status(target) -> StageStatus:
    if target.smoke:
        found = _smoke_status(target)
    else:
        found = artifacts_stage.placed_status(target, NAME, ROOTS, "file(s) in $TORCH_HOME",
                                              record(target))
    if found.state is not State.DONE:
        return found
    return changed_dependencies(NAME, record(target).complete(), built_on(target)) or found


def _smoke_status(target) -> StageStatus:
    from ..smoke import file_hashes, generator_sha256
    action = "generate the tiny models in the env"
    rec = record(target)
    unfinished = incomplete_status(NAME, rec, "no tiny models generated yet", "generation",
                                   action)
    if unfinished:
        return unfinished
    data = rec.complete()
    if data["inputs"].get("generator") != generator_sha256():
        return StageStatus(NAME, State.STALE, "the generator changed since generation", action)
    root = target.deployment.smoke
    recorded = data["outputs"].get("files", {})
    current = file_hashes(root) if root.is_dir() else {}
    drifted = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
    if drifted:
        return StageStatus(NAME, State.STALE, f"files changed or missing: {', '.join(drifted[:5])}",
                           action)
    return StageStatus(NAME, State.DONE, f"{len(current)} files in {root}")


def run(target) -> StageResult:
    if target.smoke:
        return _run_smoke(target)
    placed = artifacts_stage.place(target, NAME, ROOTS, record(target), built_on=built_on(target),
                                   then=_import_check)
    return StageResult(NAME, f"{placed.summary}; the import check passed")


def _import_check(target) -> None:
    result = env_stage.check(target)
    if not result.ok:
        raise SdrecipeError(f"the {target.profile} environment's import check failed for: "
                            f"{result.failed}; run: {target.command('doctor')}")


def _run_smoke(target) -> StageResult:
    from ..smoke import file_hashes, generate, generator_sha256
    rec = record(target)
    inputs = {"generator": generator_sha256()}
    rec.begin(inputs)
    summary = generate(target)
    rec.finish(inputs, {"files": file_hashes(target.deployment.smoke)}, built_on=built_on(target))
    return StageResult(NAME, f"generated tiny models ({summary.get('parameters', '?')} parameters"
                       + (", HardNet stand-in for kornia" if summary.get("hardnet_standin") else "")
                       + ")")
