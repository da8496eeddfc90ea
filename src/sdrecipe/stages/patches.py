"""Stage `patches`: the recipe's series applied to the checkout (the work is `patches.py`'s:
all or nothing, journaled).

Record (per profile): the series applied, by sha256, and the sha256 of every file
of the checkout as deployed, so a later edit anywhere in the tree is seen, and never
overwritten: a person's edits block the deploy until they decide.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from ..files import sha256_file
from ..target import recipe_command
from . import State, StageResult, StageStatus, changed_dependencies, incomplete_status
from . import source as source_stage

NAME = "patches"


def record(target):
    return target.record(NAME)


def source_files(source: Path, skip: set) -> list[str]:
    """The checkout's files as deployed: tracked ones (minus sparse-excluded) and untracked
    ones a patch may add; not caches (__pycache__) and not placed model files (`skip`,
    paths relative to the checkout)."""
    listing = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "-t",
                              "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
    files = set()
    for entry in filter(None, listing.split("\0")):
        tag, path = entry.split(" ", 1)
        if tag == "S" or "__pycache__" in path.split("/") or path.endswith(".pyc"):
            continue  # S: skip-worktree, left out of a sparse checkout on purpose
        if path not in skip:
            files.add(path)
    return sorted(files)


def tree_hashes(target) -> dict:
    """Path in the checkout -> sha256 of every deployed source file (model files excluded,
    for any profile: they are the artifacts stage's)."""
    from ..artifacts import artifact_files
    source = target.deployment.source
    models = {f.target(target.deployment).relative_to(source).as_posix()
              for f in artifact_files(target.recipe) if f.root == "models"}
    return {path: sha256_file(source / path) if (source / path).is_file() else None
            for path in source_files(source, models)}


def series_hashes(target) -> dict:
    return {e.file: e.sha256 for e in target.recipe.series(target.profile)}


def status(target) -> StageStatus:
    from ..patches import patch_sha256_problems, tree_state
    series = target.recipe.series(target.profile)
    for entry, _ in patch_sha256_problems(target.recipe, series):
        return StageStatus(NAME, State.BLOCKED, f"patch {entry.file} does not match its sha256 "
                           f"in {target.recipe.path.name} (modified patch)",
                           "restore the patch, or re-pin it in the recipe "
                           f"({recipe_command(target.recipe, 'lint')} names the sha256)")
    source = target.deployment.source
    if not (source / ".git").exists():
        return StageStatus(NAME, State.MISSING, "no checkout yet", f"apply {len(series)} patches")
    tree = tree_state(source, target.recipe, target.profile)
    if tree.drifted:
        return StageStatus(NAME, State.BLOCKED, f"edited by hand: {', '.join(tree.drifted)}",
                           f"save your edits (git -C {shlex.quote(str(source))} diff > my.patch), "
                           f"then: {target.command('patch apply', '--source', source, '--force')}")
    if series and tree.state == "pristine":
        return StageStatus(NAME, State.MISSING, "series not applied", f"apply {len(series)} patches")
    if series and tree.state != "applied":
        detail = tree.conflict or ", ".join(f"{p.entry.file} {p.state}" for p in tree.patches)
        return StageStatus(NAME, State.STALE, f"series {tree.state}: {detail}", "complete the series")
    rec = record(target)
    unfinished = incomplete_status(NAME, rec, "the applied series is not recorded yet",
                                   "apply", f"apply {len(series)} patches")
    if unfinished:
        return unfinished
    data = rec.complete()
    changed = sorted(f for f in set(series_hashes(target)) | set(data["inputs"].get("series", {}))
                     if series_hashes(target).get(f) != data["inputs"]["series"].get(f))
    if changed:
        return StageStatus(NAME, State.STALE, f"the recipe's series changed since it was applied: "
                           f"{', '.join(changed)}", "re-apply the series")
    redone = changed_dependencies(NAME, data, {"source": source_stage.record(target).digest()})
    if redone:
        return redone
    recorded, current = data["outputs"].get("files", {}), tree_hashes(target)
    edited = sorted(p for p in set(recorded) | set(current) if recorded.get(p) != current.get(p))
    if edited:
        return StageStatus(NAME, State.BLOCKED, "deployed files differ from what deploy "
                           f"recorded: {', '.join(edited[:5])}",
                           f"save your edits (git -C {shlex.quote(str(source))} diff > my.patch), "
                           f"restore with: git -C {shlex.quote(str(source))} checkout -- "
                           f"{' '.join(shlex.quote(p) for p in edited[:5])}; or deploy into a new "
                           "--deploy-dir")
    if not series:
        return StageStatus(NAME, State.DONE, f"the recipe has no patches for {target.profile}")
    return StageStatus(NAME, State.DONE, f"{len(series)} patches applied")


def run(target) -> StageResult:
    from ..patches import apply_series
    rec = record(target)
    inputs = {"series": series_hashes(target)}
    rec.begin(inputs)
    what = apply_series(target.deployment.source, target.recipe, target.profile)
    rec.finish(inputs, {"files": tree_hashes(target)},
               built_on={"source": source_stage.record(target).digest()})
    return StageResult(NAME, what)
