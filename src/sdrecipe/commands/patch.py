"""`sdrecipe patch apply|revert|status`: the series of the target's profile on a checkout
named by --source (patches.py applies it all or nothing, journaled)."""

from __future__ import annotations

from pathlib import Path

from ..console import out
from ..patches import TreeState, apply_series, revert_series, tree_state


def format_state(state: TreeState) -> str:
    """Each patch's state, then what stands in the way (conflict, drift, another series)."""
    lines = [f"profile {state.profile}: {state.state}"]
    width = max((len(p.entry.file) for p in state.patches), default=0)
    for patch in state.patches:
        detail = f"  ({patch.detail})" if patch.detail else ""
        lines.append(f"  [{patch.state:^11}] {patch.entry.file:<{width}}  "
                     f"{patch.entry.summary}{detail}")
    if not state.patches:
        lines.append("  (the series for this profile is empty)")
    if state.conflict:
        lines.append(state.conflict)
    if state.drifted:
        lines.append("drift (edited by hand; apply/revert refuse without --force): "
                     + ", ".join(state.drifted))
    if state.foreign:
        lines.append("changed by another profile's series (apply resets them): "
                     + ", ".join(state.foreign))
    if state.interrupted:
        lines.append(f"an interrupted {state.interrupted.get('action')} was found; the next "
                     "apply or revert finishes it")
    return "\n".join(lines)


def run(target, action: str, source: Path, force: bool = False) -> int:
    """`action` is apply, revert or status; status exits 1 when the series conflicts."""
    recipe = target.recipe
    if action == "status":
        state = tree_state(source, recipe, target.profile)
        out(f"{Path(source).resolve()} at {recipe.upstream.commit[:12]} (pinned)")
        out(format_state(state))
        return 1 if state.conflict else 0
    change = apply_series if action == "apply" else revert_series
    out(change(source, recipe, target.profile, force=force))
    return 0
