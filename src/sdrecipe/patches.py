"""The patch series on an upstream checkout (`sdrecipe patch apply|revert|status`).

Why this mechanism (details in ARCHITECTURE.md, "Applying the series"):
- All or nothing: the whole series is applied with `git apply --cached` into a
  scratch index (and a scratch object store that borrows the checkout's objects),
  so a patch that does not apply fails before one byte of the work tree changes.
- Exact states: the scratch trees T0..Tn after each prefix of the series give the
  blob id of every touched file at every step, so `status` can tell pristine,
  applied-through-patch-k and hand-edited (drift) apart by `git hash-object`.
- Crash safety: the files to change are staged by `git checkout-index` into the
  git dir, a journal is written (atomically), then each file is renamed into
  place. A run killed half-way leaves the journal; the next apply or revert
  takes those files over (they are ours, not drift) and finishes the job.
- The checkout's own index, refs and object store are never written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from unidiff import PatchSet

from .checkout import Checkout, check_pinned_head
from .errors import SdrecipeError
from .files import atomic_write_text, sha256_file
from .patchfile import locate_apply_error
from .recipe import PatchEntry, Recipe

log = logging.getLogger("sdrecipe.patches")

NULL_BLOB = "0" * 40
# Test-only hook: after writing this many files, announce it (a log line on stderr) and
# sleep, so a test can SIGKILL the process at a journaled point (tests/test_patches.py).
HOLD_ENV = "SDRECIPE_TEST_HOLD_AFTER"

APPLIED, NOT_APPLIED, CONFLICTING = "applied", "not applied", "conflicting"
LOCK_TIMEOUT_S = 10  # how long a second apply on the same checkout waits for the first


# --- the checkout -----------------------------------------------------------------

def series_paths(recipe: Recipe) -> set:
    """Every file any patch of the recipe touches (in any profile's series)."""
    paths = set()
    for entry in recipe.patches:
        for patched in PatchSet.from_filename(str(recipe.patch_dir / entry.file), encoding="utf-8"):
            paths.update(p[2:] for p in (patched.source_file, patched.target_file)
                         if p.startswith(("a/", "b/")))
    return paths


class Scratch:
    """A temporary index and object store over a checkout: git runs here write nothing to it."""

    def __init__(self, checkout: Checkout):
        self.checkout = checkout
        self._dir = tempfile.TemporaryDirectory(prefix="sdrecipe-scratch-")
        objects = Path(self._dir.name) / "objects"
        objects.mkdir()
        own_objects = Path(checkout.repo.git_dir) / "objects"
        self.env = {"GIT_INDEX_FILE": str(Path(self._dir.name) / "index"),
                    "GIT_OBJECT_DIRECTORY": str(objects),
                    "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(own_objects)}

    def git(self, *args, check=True) -> tuple[int, str, str]:
        status, out, err = self.checkout.repo.git.execute(
            ["git", *args], env=self.env, with_extended_output=True, with_exceptions=False,
            strip_newline_in_stdout=False)
        if check and status:
            raise SdrecipeError(f"git {' '.join(args)} failed in {self.checkout.path}: {err.strip()}")
        return status, out, err

    def close(self):
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the plan: the series applied in a scratch index ---------------------------------

@dataclass
class Step:
    """One patch of a plan: the blob of each file it touches before and after it."""
    entry: PatchEntry
    path: Path  # the patch file
    files: dict = field(default_factory=dict)  # upstream path -> (pre blob, post blob); None = absent
    error: str | None = None  # git's message when the patch does not apply


@dataclass
class Plan:
    """The series for one profile applied to the pinned tree, patch by patch."""
    profile: str
    trees: list  # T0 (HEAD's tree) .. Tk, one per applied prefix
    steps: list  # Step per patch of the series, in order (possibly stopped at a failure)

    @property
    def failed(self) -> Step | None:
        return next((s for s in self.steps if s.error), None)

    @property
    def final_tree(self) -> str:
        return self.trees[-1]

    def paths(self) -> list[str]:
        return sorted({p for step in self.steps for p in step.files})

    def states(self, path: str) -> list:
        """The blob of a touched `path` after 0, 1, .., k patches (None = no such file)."""
        applied = [s for s in self.steps if not s.error]
        out = [next(s.files[path][0] for s in applied if path in s.files)]
        for step in applied:
            out.append(step.files[path][1] if path in step.files else out[-1])
        return out


def _diff_trees(scratch: Scratch, old: str, new: str) -> dict:
    """path -> (old blob, new blob) for every file that differs between two trees."""
    _, out, _ = scratch.git("diff-tree", "-r", "--no-renames", "-z", old, new)
    fields = out.split("\0")
    changes = {}
    for meta, path in zip(fields[0::2], fields[1::2]):
        if not meta:
            continue
        _, _, old_blob, new_blob, _ = meta.lstrip(":").split(" ")
        changes[path] = (None if old_blob == NULL_BLOB else old_blob,
                         None if new_blob == NULL_BLOB else new_blob)
    return changes


def _git_message(stderr: str, status: int) -> str:
    """git's error lines as one line, without the `error: ` prefixes."""
    lines = [line.strip().removeprefix("error: ") for line in stderr.splitlines() if line.strip()]
    return "; ".join(lines) or f"git apply exited {status}"


def plan_series(scratch: Scratch, recipe: Recipe, profile: str, reverse_check=False) -> Plan:
    """Apply `profile`'s series in the scratch index, recording the tree after each patch.

    Stops at the first patch that does not apply (zero fuzz, -p1). With
    `reverse_check`, also un-applies the whole series in reverse order and
    records an error on the first patch whose reverse does not lead back to T0.
    """
    head_tree = scratch.checkout.repo.head.commit.tree.hexsha
    scratch.git("read-tree", head_tree)
    plan = Plan(profile, [head_tree], [])
    for entry in recipe.series(profile):
        step = Step(entry, recipe.patch_dir / entry.file)
        plan.steps.append(step)
        status, _, err = scratch.git("apply", "--cached", "-p1", "--whitespace=nowarn",
                                     str(step.path), check=False)
        if status:
            step.error = _git_message(err, status)
            return plan
        _, tree, _ = scratch.git("write-tree")
        plan.trees.append(tree.strip())
        step.files = _diff_trees(scratch, plan.trees[-2], plan.trees[-1])
    if reverse_check:
        for step in reversed(plan.steps):
            status, _, err = scratch.git("apply", "--cached", "-R", "-p1", "--whitespace=nowarn",
                                         str(step.path), check=False)
            if status:
                step.error = f"does not reverse cleanly: {_git_message(err, status)}"
                return plan
        _, tree, _ = scratch.git("write-tree")
        if tree.strip() != head_tree:
            plan.steps[0].error = "reversing the series does not give back the pinned tree"
    return plan


def all_plans(scratch: Scratch, recipe: Recipe) -> dict:
    """A plan per profile; profiles with the same series share one."""
    by_series: dict = {}
    plans = {}
    for profile in recipe.profiles:
        key = tuple(e.file for e in recipe.series(profile))
        if key not in by_series:
            by_series[key] = plan_series(scratch, recipe, profile)
        plans[profile] = by_series[key]
    return plans


def conflict_message(step: Step) -> str:
    line = locate_apply_error(step.path, step.error)
    where = f"{step.path}:{line}" if line else str(step.path)
    return f"{where}: patch {step.entry.file} does not apply to the pinned upstream: {step.error}"


# --- the work tree's state -------------------------------------------------------------

def _work_blobs(checkout: Checkout, paths) -> dict:
    """path -> blob id of the file in the work tree as git would store it (None = absent)."""
    present = [p for p in paths if (checkout.path / p).is_file()]
    blobs = dict.fromkeys(paths)
    if present:
        out = checkout.repo.git.hash_object("--", *present)
        blobs.update(zip(present, out.split()))
    return blobs


def _tree_blobs(scratch: Scratch, tree: str, paths) -> dict:
    """path -> blob id in `tree` (None = absent)."""
    blobs = dict.fromkeys(paths)
    if paths:
        _, out, _ = scratch.git("ls-tree", "-r", "-z", tree, "--", *paths)
        for record in filter(None, out.split("\0")):
            meta, path = record.split("\t", 1)
            blobs[path] = meta.split()[2]
    return blobs


def read_journal(checkout: Checkout) -> dict | None:
    try:
        return json.loads(checkout.journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SdrecipeError(f"{checkout.journal}: unreadable journal ({exc}); it records an "
                            "interrupted run: remove it and run `sdrecipe patch revert --force`") from exc


@dataclass(frozen=True)
class PatchState:
    entry: PatchEntry
    state: str  # applied / not applied / conflicting
    detail: str = ""


@dataclass(frozen=True)
class TreeState:
    """What `status` shows: per patch, per file, and one word for the whole tree."""
    profile: str
    state: str  # pristine / applied / partial / drift / conflicting
    patches: tuple  # PatchState per patch of the profile's series
    drifted: tuple  # files the series touch that match no known state (edited by hand)
    foreign: tuple  # files changed by another profile's series
    interrupted: dict | None  # the journal of a run that was killed half-way
    conflict: str | None  # why the series does not apply to the pinned upstream


def _patch_state(step: Step, index: int, states_of, current, known) -> PatchState:
    """Applied if every file it touches is at a state after it, not applied if before."""
    verdicts = set()
    for path in step.files:
        if current[path] not in states_of[path] and current[path] in known[path]:
            return PatchState(step.entry, CONFLICTING,
                              f"{path} is as another profile's series left it")
        states, blob = states_of[path], current[path]
        if blob == states[index + 1]:
            verdicts.add(APPLIED)
        elif blob == states[index]:
            verdicts.add(NOT_APPLIED)
        elif blob in states[index + 1:]:
            verdicts.add(APPLIED)
        elif blob in states[:index]:
            verdicts.add(NOT_APPLIED)
        else:
            return PatchState(step.entry, CONFLICTING, f"{path} was edited by hand")
    if len(verdicts) == 1:
        return PatchState(step.entry, verdicts.pop())
    return PatchState(step.entry, CONFLICTING, "partly applied: some of its files are, some not")


def _assess(checkout: Checkout, scratch: Scratch, recipe: Recipe, profile: str):
    """The plans, the current blobs and the TreeState of `checkout` for `profile`."""
    plans = all_plans(scratch, recipe)
    plan = plans[profile]
    journal = read_journal(checkout)
    ours = set(journal["paths"]) if journal else set()
    known: dict = {}
    for each in plans.values():
        for path in each.paths():
            known.setdefault(path, set()).update(each.states(path))
    paths = sorted(set(known) | ours)
    current = _work_blobs(checkout, paths)
    pristine = _tree_blobs(scratch, plan.trees[0], paths)
    drifted = tuple(p for p in paths if p not in ours and current[p] not in known[p])
    mine = set(plan.paths())
    foreign = tuple(p for p in paths if p not in mine and p not in drifted
                    and current[p] != pristine[p])
    failed = plan.failed
    states_of = {p: plan.states(p) for p in mine}
    patch_states = tuple(_patch_state(step, i, states_of, current, known)
                         for i, step in enumerate(plan.steps) if not step.error)
    if failed:
        patch_states += (PatchState(failed.entry, CONFLICTING,
                                    "does not apply to the pinned upstream"),)
        patch_states += tuple(PatchState(e, NOT_APPLIED, "not checked: an earlier patch conflicts")
                              for e in recipe.series(profile)[len(plan.steps):])
        state = "conflicting"
    else:
        final = _tree_blobs(scratch, plan.final_tree, paths)
        if drifted:
            state = "drift"
        elif all(current[p] == pristine[p] for p in paths):
            state = "pristine"
        elif all(current[p] == final[p] for p in paths):
            state = "applied"
        else:
            state = "partial"
    tree_state = TreeState(profile, state, patch_states, drifted, foreign, journal,
                           conflict_message(failed) if failed else None)
    return plan, paths, current, tree_state


def tree_state(source, recipe: Recipe, profile: str) -> TreeState:
    """The state of the series for `profile` on the checkout at `source` (read-only)."""
    checkout = check_pinned_head(source, recipe)
    with Scratch(checkout) as scratch:
        return _assess(checkout, scratch, recipe, profile)[3]


# --- changing the work tree -------------------------------------------------------------

def _lock(checkout: Checkout) -> FileLock:
    try:
        checkout.state_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise SdrecipeError(f"{checkout.state_dir}: cannot create ({exc.strerror}); the checkout "
                            "must be writable by you to apply or revert patches") from None
    return FileLock(str(checkout.state_dir / "lock"), timeout=LOCK_TIMEOUT_S)


def _hold_for_test(written: int):
    if os.environ.get(HOLD_ENV) == str(written):
        log.info("test hold after %d files", written)
        time.sleep(3600)


def _remove_empty_parents(root: Path, path: Path):
    parent = path.parent
    while parent != root and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def _converge(checkout, scratch, target_tree, target, action, profile):
    """Make each file of `target` (path -> blob or None) match it, under a journal."""
    stage = checkout.state_dir / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    scratch.git("read-tree", target_tree)
    writes = [p for p, blob in target.items() if blob is not None]
    if writes:
        scratch.git("checkout-index", "-f", f"--prefix={stage}/", "--", *writes)
    atomic_write_text(checkout.journal, json.dumps({
        "action": action, "profile": profile, "head": checkout.head, "tree": target_tree,
        "paths": sorted(target), "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
    for written, (path, blob) in enumerate(sorted(target.items())):
        _hold_for_test(written)
        dest = checkout.path / path
        if blob is None:
            if dest.is_file() or dest.is_symlink():
                dest.unlink()
                _remove_empty_parents(checkout.path, dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(stage / path), str(dest))  # a rename (atomic) unless .git is elsewhere
    checkout.journal.unlink()
    shutil.rmtree(stage, ignore_errors=True)


def _interrupted_note(journal: dict | None, action: str) -> str | None:
    if not journal:
        return None
    verb = "completing" if journal.get("action") == action else "rolling back"
    return (f"found an interrupted {journal.get('action')} (profile {journal.get('profile')}, "
            f"pid {journal.get('pid')}, started {journal.get('started')}): {verb} it")


def _drift_error(checkout: Checkout, drifted, action: str) -> SdrecipeError:
    files = "\n  ".join(drifted)
    return SdrecipeError(
        f"{checkout.path}: {len(drifted)} file(s) the series touches were edited by hand "
        f"(drift):\n  {files}\nnothing was changed; save your edits, then rerun "
        f"`sdrecipe patch {action}` with --force to overwrite them")


def patch_sha256_problems(recipe: Recipe, entries):
    """(entry, actual sha256) for each patch that differs from the recipe's pin; None if missing."""
    for entry in entries:
        try:
            actual = sha256_file(recipe.patch_dir / entry.file)
        except FileNotFoundError:
            actual = None
        if actual != entry.sha256:
            yield entry, actual


def verify_patch_files(recipe: Recipe, profile: str):
    """Refuse to apply a series whose files are missing or differ from the recipe's sha256."""
    for entry, actual in patch_sha256_problems(recipe, recipe.series(profile)):
        path = recipe.patch_dir / entry.file
        if actual is None:
            raise SdrecipeError(f"{recipe.path}:{entry.line}: patch file {path} is missing")
        raise SdrecipeError(
            f"{recipe.path}:{entry.line}: {path} has sha256 {actual}, the recipe pins "
            f"{entry.sha256}; nothing was changed (restore the patch, or update the recipe "
            "and check it with `sdrecipe lint`)")


def _run(source, recipe: Recipe, profile: str, force: bool, action: str) -> str:
    checkout = check_pinned_head(source, recipe)
    if action == "apply":
        verify_patch_files(recipe, profile)
    lock = _lock(checkout)
    try:
        lock.acquire()
    except Timeout:
        raise SdrecipeError(f"{checkout.path}: another sdrecipe run is changing this checkout "
                            f"(lock {lock.lock_file}); wait for it to finish") from None
    try:
        with Scratch(checkout) as scratch:
            plan, paths, current, state = _assess(checkout, scratch, recipe, profile)
            notes = [n for n in (_interrupted_note(state.interrupted, action),) if n]
            if action == "apply" and plan.failed:
                raise SdrecipeError(f"{conflict_message(plan.failed)}\nnothing was changed")
            target_tree = plan.final_tree if action == "apply" else plan.trees[0]
            target = _tree_blobs(scratch, target_tree, paths)
            changes = {p: b for p, b in target.items() if current[p] != b}
            if state.drifted and not force:
                raise _drift_error(checkout, state.drifted, action)
            if not changes:
                if state.interrupted:
                    checkout.journal.unlink()
                done = "applied" if action == "apply" else "pristine"
                notes.append(f"{checkout.path}: series for profile {profile} already {done}; "
                             "nothing to do")
                return "\n".join(notes)
            _converge(checkout, scratch, target_tree, changes, action, profile)
            if state.drifted:
                notes.append(f"overwrote {len(state.drifted)} hand-edited file(s) (--force): "
                             + ", ".join(state.drifted))
            if action == "apply":
                notes.append(f"{checkout.path}: applied {len(plan.steps)} patch(es) for profile "
                             f"{profile}; {len(changes)} file(s) changed")
            else:
                notes.append(f"{checkout.path}: reverted to the pinned tree "
                             f"{recipe.upstream.commit[:12]}; {len(changes)} file(s) restored")
            return "\n".join(notes)
    finally:
        lock.release()


def apply_series(source, recipe: Recipe, profile: str, force: bool = False) -> str:
    """Apply `profile`'s series, all or nothing; returns what was done (a no-op says so)."""
    return _run(source, recipe, profile, force, "apply")


def revert_series(source, recipe: Recipe, profile: str, force: bool = False) -> str:
    """Restore every file any series touches to the pinned tree (added files are removed)."""
    return _run(source, recipe, profile, force, "revert")
