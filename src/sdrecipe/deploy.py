"""The deploy pipeline: the stages in order, each run only when its status is not done,
and provenance.json from their records.

    source -> artifacts -> patches -> env -> preseed -> verify

Each stage (`stages/`) owns its status, its work and its record; this module keeps
no state of its own. A stage that is blocked (someone's edits, a modified patch)
stops the deploy with what the person must do. A re-deploy over a complete
deployment reads the records, hashes the small source tree and exits in about a
second.

`<deploy>/provenance.json` records what was deployed: recipe, upstream commit,
patches, lock, tool version and the sha256 of every deployed file (the source tree
as patched, smoke models; model artifacts by their PINNED hashes, never rehashed),
all taken from the stage records. Keys are sorted and paths relative, so two
deployments from the same recipe and locks give identical manifests except for the
`volatile` block (time, host, user, folder).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from datetime import datetime, timezone

from . import __version__
from .deploy_lock import deployment_lock
from .errors import SdrecipeError
from .files import atomic_write_text, sha256_file
from .stages import State, StageResult, StageStatus
from .stages import artifacts, env, patches, preseed, source, verify

STAGES = (source, artifacts, patches, env, preseed, verify)
STAGE_NAMES = tuple(stage.NAME for stage in STAGES)
MANIFEST_SCHEMA = 1
log = logging.getLogger("sdrecipe.deploy")


def stage_status(stage, target) -> StageStatus:
    """The stage's status; a problem it cannot judge past blocks, with its message."""
    try:
        return stage.status(target)
    except SdrecipeError as exc:
        return StageStatus(stage.NAME, State.BLOCKED, str(exc), "see the reason")


def status(target) -> list[StageStatus]:
    found = [stage_status(stage, target) for stage in STAGES]
    pending = [s.stage for s in found[:-1] if not s.settled]
    if pending and found[-1].state is State.DONE:  # verified, but what it verified is not whole now
        found[-1] = StageStatus(verify.NAME, State.STALE, f"passed, but {', '.join(pending)} "
                                "must be redone first", "verify again once they are")
    return found


def deploy(target, on_stage=None) -> list[tuple[StageStatus, StageResult | None, float]]:
    """Bring every stage to done, in order. `on_stage(status, result, seconds)` hears of
    each stage before it runs (result None) and after. Returns what each stage did."""
    outcomes = []
    with deployment_lock(target.deployment, "sdrecipe deploy"), _bundle_opened(target) as target:
        for stage in STAGES:
            start = time.monotonic()
            found = stage_status(stage, target)
            result = None
            if found.blocking:
                raise SdrecipeError(f"{stage.NAME}: {found.reason}; {found.action}")
            if not found.settled:
                if on_stage:
                    on_stage(found, None, 0.0)
                result = stage.run(target)
            outcome = (found, result, round(time.monotonic() - start, 2))
            outcomes.append(outcome)
            if on_stage:
                on_stage(*outcome)
        write_provenance(target, ran=any(result for _, result, _ in outcomes))
    return outcomes


# --- provenance --------------------------------------------------------------------------------

def read_manifest(deployment) -> dict | None:
    try:
        return json.loads(deployment.provenance.read_text())
    except (OSError, ValueError):
        return None


def stable_part(data: dict) -> dict:
    """A manifest without its volatile fields: what must be equal across deployments."""
    return {k: v for k, v in data.items() if k != "volatile"}


def deployed_files(target) -> dict:
    """Relative path -> sha256 of every deployed file, from the stage records."""
    files = {}
    tree = patches.record(target).complete()
    if tree:
        name = target.deployment.source.name
        files.update({f"{name}/{path}": sha256 for path, sha256 in tree["outputs"]["files"].items()})
    if target.smoke:
        data = preseed.record(target).complete()
        if data:
            base = target.deployment.smoke.relative_to(target.deployment.root).as_posix()
            files.update({f"{base}/{k}": v for k, v in data["outputs"]["files"].items()})
    else:
        for stage in (artifacts, preseed):  # model files by their pinned hashes
            data = stage.record(target).complete()
            if data:
                files.update(data["outputs"]["files"])
    return dict(sorted(files.items()))


def manifest(target, files: dict) -> dict:
    from .lock import lock_path
    from .patches import tree_state
    from .report import deployed_inputs
    recipe, deployment = target.recipe, target.deployment
    has_source = (deployment.source / ".git").exists()
    inputs = deployed_inputs(recipe, deployment, target.profile,
                             tree=tree_state(deployment.source, recipe, target.profile)
                             if has_source else None)
    built = env.record(target).complete() or {"outputs": {}}
    lock = lock_path(recipe, target.profile)
    return {
        "schema": MANIFEST_SCHEMA,
        "tool": {"name": "sdrecipe", "version": __version__},
        "recipe": {"name": recipe.name, "sha256": inputs["recipe_sha256"]},
        "profile": target.profile, "smoke": target.smoke,
        "upstream": {"url": recipe.upstream.url, "commit": inputs["upstream_commit"]},
        "patches": inputs["patches"],
        "lock": {"content_hash": inputs["lock_hash"],
                 "sha256": sha256_file(lock) if lock.is_file() else None},
        "env": {"backend": built["outputs"].get("backend")},
        "files": files,
        "verified": verify.status(target).state is State.DONE,
        "volatile": {"time": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                     "host": platform.node(), "user": os.environ.get("USER", ""),
                     "deployment": str(deployment.root)},
    }


@contextmanager
def _bundle_opened(target):
    """With --from-bundle, and work to do: the bundle checked and its files in the caches,
    so every stage finds what it needs locally (a complete deployment never opens it). A
    tar bundle's extraction is removed afterwards: the caches hold what was needed."""
    if not target.options.bundle or all(s.settled for s in status(target)):
        yield target
        return
    from dataclasses import replace
    from .bundle.restore import discard_extraction, open_for_deploy
    folder = open_for_deploy(target, target.options.bundle)
    try:
        yield replace(target, options=replace(target.options, bundle=folder))
    finally:
        discard_extraction(folder, target.options.bundle)


def write_provenance(target, ran: bool) -> None:
    """Rewritten only when a stage ran or the deployed files differ from the last manifest
    (parsing the lock for its content hash costs a second)."""
    old = read_manifest(target.deployment)
    files = deployed_files(target)
    if not ran and old is not None and old.get("files") == files \
            and (old.get("profile"), old.get("smoke")) == (target.profile, target.smoke):
        return
    data = manifest(target, files)
    if old is None or stable_part(old) != stable_part(data):
        atomic_write_text(target.deployment.provenance,
                          json.dumps(data, indent=2, sort_keys=True) + "\n")
