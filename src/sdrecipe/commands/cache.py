"""`sdrecipe cache gc`: free the content cache of what no deployment uses."""

from __future__ import annotations

from ..artifacts import collect_garbage
from ..console import out


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def gc(config, dry_run: bool = False) -> int:
    garbage = collect_garbage(config, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for path, size, why in garbage:
        out(f"{verb}  {path}  {_size(size)}  ({why})")
    total = sum(size for _, size, _ in garbage)
    out(f"cache gc: {len(garbage)} file(s), {_size(total)} "
        + ("would be freed (dry run: nothing removed)" if dry_run else "freed"))
    return 0
