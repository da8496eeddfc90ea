"""Stage `verify`: one short txt2img sample, judged, with a report (the work is `verify.py`'s).

Record (per profile and mode): the report's verdict, what it was verified against
(the recipe's, the patches' and the lock's sha256) and the records of every earlier
stage it ran on, so any change to the deployment makes the last verify stale. A
failed sample writes its report but no record.
"""

from __future__ import annotations

import re
import time

from ..errors import SdrecipeError
from ..files import sha256_file
from ..progress import Task
from . import State, StageResult, StageStatus, changed_dependencies
from . import artifacts, env, patches, preseed, source

NAME = "verify"
_EARLIER = (source, artifacts, patches, env, preseed)


# tqdm's line for the denoising loop, as txt2img prints it: "PLMS Sampler:  40%|####  | 2/5 [..."
SAMPLER_PROGRESS = re.compile(r"(\w+ Sampler):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


class VerifyFailed(SdrecipeError):
    exit_code = 1


class SamplingProgress:
    """txt2img's sampling progress, live, as a progress task (fed each console line)."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, line: str) -> None:
        found = SAMPLER_PROGRESS.search(line)
        if found:
            self.task.update(description=found[1], completed=int(found[2]), total=int(found[3]))


def record(target):
    return target.record(NAME, per_mode=True)


def report_folder(target):
    from ..verify import report_dir
    return report_dir(target.deployment, target.profile, target.smoke)


def verified_against(target) -> dict:
    """The inputs a verify result depends on, beyond the records of the earlier stages."""
    from ..lock import lock_path
    from ..report import input_hashes
    hashes = input_hashes(target.recipe, target.profile)
    lock = lock_path(target.recipe, target.profile)
    return {"recipe": hashes["recipe_sha256"], "patches": hashes["patches"],
            "lock": sha256_file(lock) if lock.is_file() else None}


def built_on(target) -> dict:
    return {stage.NAME: stage.record(target).digest() for stage in _EARLIER}


def status(target) -> StageStatus:
    from ..report import read
    out = report_folder(target)
    again = "run the verification sample again"
    data = record(target).read()
    report = read(out)
    if not data or not data.get("complete"):
        if report is not None and not report.get("ok"):
            failed = ", ".join(c["name"] for c in report.get("checks", []) if not c.get("ok"))
            return StageStatus(NAME, State.STALE, f"last verify failed ({failed}); "
                               f"{out / 'report.html'}", again)
        if data:
            return StageStatus(NAME, State.MISSING, "the last verify did not finish "
                               f"(started {data.get('started', '?')})", again)
        return StageStatus(NAME, State.MISSING, "no report yet", "run the verification sample")
    if report is None:
        return StageStatus(NAME, State.MISSING, f"the report in {out} is gone", again)
    if data["inputs"] != verified_against(target):
        return StageStatus(NAME, State.STALE, "the recipe, a patch or the lock changed since "
                           "it was verified", again)
    redone = changed_dependencies(NAME, data, built_on(target))
    if redone:
        return StageStatus(NAME, State.STALE, f"the deployment changed since it was verified "
                           f"({redone.reason})", again)
    return StageStatus(NAME, State.DONE, f"passed: {out / 'report.html'}")


def prove_models(target):
    """Hash before unpickle: every file txt2img will torch.load is proven to be the bytes
    it was placed (real: the pins, `artifacts.prove_pinned`) or generated (smoke: the
    preseed record) as, before the process starts; the check, with its time, for the report."""
    from ..verify import CheckResult
    start = time.monotonic()
    if target.smoke:
        count, hashed = _prove_smoke(target), "all hashed"
    else:
        from ..artifacts import prove_pinned
        proven = prove_pinned(target)
        count = len(proven)
        hashed = f"{sum(p.hashed for p in proven)} hashed, the rest by an unchanged stamp"
    seconds = time.monotonic() - start
    return CheckResult("integrity", True, f"{count} model file(s) match their sha256 before "
                       f"loading ({hashed}) in {seconds:.2f} s"), round(seconds, 2)


def _prove_smoke(target) -> int:
    from ..placement import ContentMismatch
    from ..smoke import file_hashes
    data = preseed.record(target).complete() or {}
    recorded = data.get("outputs", {}).get("files", {})
    root = target.deployment.smoke
    current = file_hashes(root) if root.is_dir() else {}
    for rel, sha256 in sorted(recorded.items()):
        if current.get(rel) != sha256:
            raise ContentMismatch(f"{root / rel}: expected sha256 {sha256}, found "
                                  f"{current.get(rel, 'no file')}: changed since generated; "
                                  f"nothing loaded it. Run {target.command('deploy')} to regenerate it")
    return len(recorded)


def run(target, out=None) -> StageResult:
    """`out`: another report folder (`sdrecipe verify --out`): no record then, the
    deployment's own verify stays what it was."""
    from ..verify import verify
    rec = record(target) if out is None else None
    inputs = verified_against(target)
    if rec:
        rec.begin(inputs)
    folder = out or report_folder(target)
    integrity = prove_models(target)
    with Task("txt2img: loading the model") as task:
        data = verify(target, out=folder, on_line=SamplingProgress(task), integrity=integrity)
    if not data["ok"]:
        raise VerifyFailed(f"verification failed; report: {folder / 'report.html'}")
    if rec:
        rec.finish(inputs, {"ok": True, "images": data["images"]}, built_on(target))
    return StageResult(NAME, f"passed; report: {folder / 'report.html'}")
