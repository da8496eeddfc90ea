"""`sdrecipe lock`: resolve env/ into lock/<profile>.conda-lock.yml (lock.py) for one or
every profile of the recipe, and say what each lock holds."""

from __future__ import annotations

from ..console import out
from ..lock import write_lock


def run(recipe, config, profiles=None, pip_only: bool = False) -> int:
    """`profiles`: names of the recipe's profiles (None: all of them), all checked before
    any is locked."""
    chosen = [recipe.profile(name).name for name in (profiles or recipe.profiles)]
    for profile in chosen:
        lock = write_lock(recipe, profile, pip_only=pip_only, config=config)
        conda = (f"{len(lock.conda)} conda packages" if lock.conda_locked else
                 "conda part not locked (--pip-only): commit, and run `sdrecipe lock` where "
                 "the channels are reachable")
        wheels = f", {len(lock.platform_wheels)} platform wheels" if lock.platform_wheels else ""
        venv = f" (+{len(lock.venv)} for the venv backend)" if lock.venv else ""
        out(f"wrote {lock.path.relative_to(recipe.root)}: {len(lock.pip)} pip packages{venv}"
            f"{wheels}; {conda}")
    return 0
