"""Stage `env`: the profile's environment built from its lock (the work is `environment/`'s).

Record (per profile): what was asked (`--python`, `--prefix`: a rebuild keeps the
backend chosen the first time) and what was built: prefix, backend, the build's
stamp and id, and the sha256 of the lock it came from. It is marked in progress
after every input is downloaded and checked and before the old environment is
removed, so a build interrupted anywhere leaves `missing`, never `done`. The last
import check (`sdrecipe env check`, the preseed stage) is noted beside it.
"""

from __future__ import annotations

from pathlib import Path

from ..files import sha256_file
from . import State, StageResult, StageStatus, incomplete_status, new_build_id

NAME = "env"


def record(target):
    from ..environment.location import env_record
    return env_record(target.deployment, target.profile)


def requested(target) -> dict:
    """--python and --prefix of this run, else those of the build before."""
    before = (record(target).read() or {}).get("inputs", {})
    options = target.options
    prefix = Path(options.prefix).expanduser().absolute() if options.prefix else None
    return {"python": options.python or before.get("python"),
            "prefix": str(prefix) if prefix else before.get("prefix")}


def status(target) -> StageStatus:
    from ..lock import lock_path
    build = f"build the {target.profile} environment"
    rec = record(target)
    unfinished = incomplete_status(NAME, rec, "no environment built yet", "build", build)
    if unfinished:
        return unfinished
    data = rec.complete()
    built = data["outputs"]
    if not (Path(built["prefix"]) / "bin" / "python").exists():
        return StageStatus(NAME, State.MISSING, f"the environment at {built['prefix']} is gone", build)
    lock = lock_path(target.recipe, target.profile)
    if not lock.is_file() or sha256_file(lock) != built.get("lock_sha256"):
        return StageStatus(NAME, State.STALE, "the lock changed since the environment was built",
                           "rebuild the environment from the lock")
    asked, had = requested(target), data["inputs"]
    for option in ("python", "prefix"):
        if asked[option] != had.get(option):
            return StageStatus(NAME, State.STALE, f"--{option} {asked[option]} differs from the "
                               f"build's ({had.get(option)})", build)
    return StageStatus(NAME, State.DONE, f"{built['backend']} environment at {built['prefix']}")


def run(target, force: bool = False) -> StageResult:
    from filelock import FileLock

    from ..environment.build import fetch_inputs, make_env, plan_build
    rec = record(target)
    asked = requested(target)
    plan = plan_build(target.recipe, target.deployment, target.profile, target.config,
                      prefix=asked["prefix"], python=asked["python"])
    plan.prefix.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(plan.prefix.parent / f".{plan.prefix.name}.build.lock")):
        before = rec.complete()
        if not force and before and before["outputs"].get("stamp") == plan.stamp \
                and (plan.prefix / "bin" / "python").exists():
            return StageResult(NAME, f"the {target.profile} environment at {plan.prefix} is up "
                               "to date (lock, wheels and backend unchanged): nothing to do",
                               changed=False)
        inputs = fetch_inputs(plan, target.config)
        asked = {"python": plan.python, "prefix": str(plan.prefix)}  # as found, if not asked
        rec.begin(asked)
        make_env(plan, inputs, target.config)
        rec.finish(asked, {"prefix": str(plan.prefix), "backend": plan.backend,
                           "stamp": plan.stamp, "build_id": new_build_id(),
                           "modules": list(plan.libmpi.modules),
                           "lock_sha256": sha256_file(plan.lock.path)})
    return StageResult(NAME, f"built the {target.profile} environment at {plan.prefix} "
                       f"({plan.backend})")


def check(target):
    """The offline import check in the built environment, noted in the record."""
    from ..environment.runtime import import_check
    result = import_check(target)
    rec = record(target)
    data = rec.complete()
    if data:
        rec.note("check", {"ok": result.ok, "failed": result.failed,
                           "build_id": data["outputs"].get("build_id")})
    return result
