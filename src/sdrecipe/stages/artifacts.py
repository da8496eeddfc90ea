"""Stage `artifacts`: the model files under the checkout's `models/` (the work is
`artifacts.py`'s: cache fill through `transfer`, placement, stamps).

Smoke mode skips it: nothing is downloaded, above all not the gated 4 GB checkpoint.
The real preseed stage places the `torch_home` files the same way (`placed_status`,
`place`), so both share this code.

Record (per profile): each placed file's pinned sha256, by its place.
"""

from __future__ import annotations

from . import State, StageResult, StageStatus, incomplete_status

NAME = "artifacts"
ROOTS = ("models",)


def record(target):
    return target.record(NAME)


def placed_status(target, stage: str, roots: tuple[str, ...], what: str, rec) -> StageStatus:
    """done when the record lists every file the profile needs under `roots`, with the pinned
    hash, and each file's placement stamp still matches (one lstat per file)."""
    from ..artifacts import artifact_status
    files = artifact_status(target.recipe, target.deployment, target.profile, roots=roots)
    bad = [f for f in files if f.state != "done"]
    if bad:
        word = State.MISSING if all(f.state == "missing" for f in bad) else State.STALE
        listing = "; ".join(f"{f.file.place}: {f.reason}" for f in bad[:4])
        return StageStatus(stage, word, f"{len(bad)} of {len(files)} {what}: {listing}",
                           f"fetch and place {len(bad)} file(s)")
    unfinished = incomplete_status(stage, rec, f"the placed {what} are not recorded yet",
                                   "placement", f"check and record {len(files)} file(s)")
    if unfinished:
        return unfinished
    recorded = rec.complete()["outputs"].get("files", {})
    if any(recorded.get(path) != sha256 for path, sha256 in pinned(target, roots).items()):
        return StageStatus(stage, State.STALE, "placed, but not all recorded with the recipe's "
                           "pins", f"check and record {len(files)} file(s)")
    return StageStatus(stage, State.DONE, f"{len(files)} {what} placed and stamped")


def pinned(target, roots: tuple[str, ...]) -> dict:
    """Path in the deployment -> pinned sha256 of the profile's files under `roots` (model
    files are never rehashed for this: their bytes were checked against the pin on arrival)."""
    from ..artifacts import ArtifactLock, expected, select
    lock = ArtifactLock.for_recipe(target.recipe)
    root = target.deployment.root
    return {f.target(target.deployment).relative_to(root).as_posix(): expected(f, lock)[0]
            for f in select(target.recipe, target.profile, roots=roots)}


def place(target, stage: str, roots: tuple[str, ...], rec, built_on=None, then=None,
          **fetch_options) -> StageResult:
    """Fetch what the cache lacks and place the files, run `then(target)` (a check of what
    was placed); then, only then, the record."""
    from ..artifacts import fetch_artifacts
    inputs = {"roots": list(roots)}
    rec.begin(inputs)
    if target.options.bundle:  # its files are in the cache already: never download
        from ..bundle.restore import pins
        fetch_options.update(offline=True, extra_pins=pins(target.options.bundle))
    placed = fetch_artifacts(target.recipe, target.deployment, target.profile, roots=roots,
                             config=target.config, **fetch_options)
    if target.options.bundle:
        from ..bundle.restore import record_bundle_pins
        record_bundle_pins(target.recipe, placed, fetch_options["extra_pins"])
    if then:
        then(target)
    root = target.deployment.root
    placed_paths = {p.target.relative_to(root).as_posix() for p in placed}
    rec.finish(inputs, {"files": {path: sha256 for path, sha256 in pinned(target, roots).items()
                                  if path in placed_paths}}, built_on)
    moved = [p for p in placed if p.action != "in place"]
    return StageResult(stage, f"{len(placed)} files in place ({len(moved)} placed or repaired)",
                       changed=bool(moved), details=tuple(placed))


def status(target) -> StageStatus:
    if target.smoke:
        return StageStatus(NAME, State.SKIPPED, "smoke mode downloads no model files (tiny "
                           "models are generated)")
    return placed_status(target, NAME, ROOTS, "model files", record(target))


def run(target, **fetch_options) -> StageResult:
    """`fetch_options` (verify, with_optional, only): `sdrecipe fetch`'s choices."""
    return place(target, NAME, ROOTS, record(target), **fetch_options)
