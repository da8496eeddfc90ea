"""`sdrecipe cache gc`: free the content cache of what no deployment uses."""

from __future__ import annotations

from ..artifacts import collect_garbage
from ..console import out
from ..files import human_size


def gc(config, dry_run: bool = False) -> int:
    garbage = collect_garbage(config, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path, size, why in garbage:
        out(f"{verb}  {path}  {human_size(size)}  ({why})")
    total = sum(size for _, size, _ in garbage)
    out(f"cache gc: {len(garbage)} file(s), {human_size(total)} "
        + ("would be freed (dry run: nothing removed)" if dry_run else "freed"))
    return 0
