"""`lock/upstream.lock`: the blob id of every file of the upstream at the pinned commit.

CI has no upstream checkout, yet must prove the series targets the pinned tree.
Each patch's `index <pre>..<post>` lines name the blob ids it expects; this
committed manifest (written by `sdrecipe upstream-lock --source DIR` from a real
checkout) lets lint compare them. The format is `git ls-tree -r` output under a
`commit` line, so a change of pin shows as a readable diff.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SdrecipeError
from .files import atomic_write_text
from .recipe import Recipe

LOCK_FILE = "lock/upstream.lock"
_ENTRY_RE = re.compile(r"^(\d{6}) (blob|commit) ([0-9a-f]{40})\t(.+)$")
_HEADER = """\
# The upstream at the pinned commit: mode, type, object id and path of every file,
# as printed by `git ls-tree -r --full-tree <commit>`. Written by
# `sdrecipe upstream-lock --source DIR` from a checkout; do not edit by hand.
# `sdrecipe lint` checks each patch's `index` pre-image blob ids against it.
"""


@dataclass(frozen=True)
class UpstreamLock:
    path: Path
    commit: str
    blobs: dict  # upstream path -> object id


def lock_path(recipe: Recipe) -> Path:
    return recipe.root / LOCK_FILE


def load_upstream_lock(recipe: Recipe) -> UpstreamLock:
    """Read the manifest; errors name its line and say how to regenerate it."""
    path = lock_path(recipe)
    regenerate = "regenerate it with `sdrecipe upstream-lock --source DIR`"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SdrecipeError(f"{path}: missing; {regenerate}") from None
    commit, blobs = None, {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("commit "):
            commit = line.split()[1]
            continue
        match = _ENTRY_RE.match(line)
        if not match:
            raise SdrecipeError(f"{path}:{number}: not a `<mode> <type> <id>\\t<path>` line; "
                                f"{regenerate}")
        blobs[match.group(4)] = match.group(3)
    if commit is None:
        raise SdrecipeError(f"{path}: no `commit` line; {regenerate}")
    return UpstreamLock(path, commit, blobs)


def write_upstream_lock(source, recipe: Recipe) -> Path:
    """Write the manifest from a checkout whose HEAD is the pinned commit."""
    from .checkout import check_pinned_head  # GitPython only here: lint imports this module
    checkout = check_pinned_head(source, recipe)
    listing = checkout.repo.git.ls_tree("-r", "--full-tree", "-z", checkout.head)
    body = [f"commit {checkout.head}"]
    for record in filter(None, listing.split("\0")):
        if "\n" in record:
            raise SdrecipeError(f"{checkout.path}: a path with a newline cannot be locked: {record!r}")
        body.append(record)
    path = lock_path(recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, _HEADER + "\n".join(body) + "\n")
    return path

