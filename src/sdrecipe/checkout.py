"""An upstream git checkout, and the check that its HEAD is the recipe's pinned commit.

Patching, the upstream lock and lint all start from such a checkout; keeping it
here, below them, lets each open one without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import git

from .errors import SdrecipeError
from .recipe import Recipe


@dataclass(frozen=True)
class Checkout:
    """An upstream git checkout (work tree root) and where sdrecipe keeps its state."""
    path: Path
    repo: git.Repo
    head: str

    @property
    def state_dir(self) -> Path:
        return Path(self.repo.git_dir) / "sdrecipe"

    @property
    def journal(self) -> Path:
        return self.state_dir / "journal.json"


def open_checkout(source) -> Checkout:
    """The git checkout at `source`; a clear error when it is missing or not git."""
    path = Path(source).expanduser().resolve()
    if not path.is_dir():
        raise SdrecipeError(f"{path}: no such folder; pass --source the upstream checkout "
                            "(clone it first, e.g. with `sdrecipe fetch`)")
    try:
        repo = git.Repo(path)
    except git.InvalidGitRepositoryError:
        raise SdrecipeError(f"{path}: not a git checkout; --source must be the top folder of "
                            "a git clone of the upstream at the pinned commit") from None
    if repo.bare or Path(repo.working_tree_dir).resolve() != path:
        raise SdrecipeError(f"{path}: not the top folder of a git work tree "
                            f"(the work tree is {repo.working_tree_dir})")
    try:
        head = repo.head.commit.hexsha
    except ValueError:
        raise SdrecipeError(f"{path}: the git checkout has no commit checked out") from None
    return Checkout(path, repo, head)


def check_pinned_head(source, recipe: Recipe) -> Checkout:
    """Open `source` and refuse it unless HEAD is the recipe's pinned commit."""
    checkout = open_checkout(source)
    pinned = recipe.upstream.commit
    if checkout.head != pinned:
        raise SdrecipeError(
            f"{checkout.path}: HEAD is {checkout.head}, not the pinned commit {pinned} of "
            f"{recipe.path}; run `git -C {checkout.path} checkout {pinned}` (or clone again)")
    return checkout
