"""`sdrecipe upstream-lock`: write lock/upstream.lock from a checkout at the pinned commit,
so lint can check the series' blob ids where there is no upstream (CI)."""

from __future__ import annotations

from pathlib import Path

from ..console import out
from ..upstream_lock import write_upstream_lock


def run(recipe, source: Path) -> int:
    path = write_upstream_lock(source, recipe)
    out(f"wrote {path} ({recipe.upstream.commit})")
    return 0
