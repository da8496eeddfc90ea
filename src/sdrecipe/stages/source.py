"""Stage `source`: the upstream checkout at the pinned commit (the work is `source.py`'s).

Record (one per deployment: every profile shares the checkout): the commit and
where it came from.
"""

from __future__ import annotations

from . import State, StageResult, StageStatus, incomplete_status

NAME = "source"


def record(target):
    return target.record(NAME, per_profile=False)


def local_checkout(target) -> str | None:
    """--source, else the site's configured checkout ($SDRECIPE_UPSTREAM, upstream_checkout)."""
    return target.options.source or target.config.get("upstream_checkout")


def status(target) -> StageStatus:
    import git
    pinned = target.recipe.upstream.commit
    source = target.deployment.source
    origin = local_checkout(target) or ", ".join(target.recipe.upstream.urls)
    if not (source / ".git").exists():
        return StageStatus(NAME, State.MISSING, "no checkout", f"get commit {pinned[:12]} from {origin}")
    try:
        head = git.Repo(source).head.commit.hexsha
    except (git.GitError, ValueError) as exc:
        return StageStatus(NAME, State.BLOCKED, f"{source} is not a usable git checkout ({exc})",
                           "move the folder aside")
    if head != pinned:
        return StageStatus(NAME, State.BLOCKED, f"{source}: checkout at {head[:12]}, not the "
                           f"pinned {pinned[:12]}", "move the folder aside")
    unfinished = incomplete_status(NAME, record(target), "the checkout is not recorded yet",
                                   "check of the checkout", "check the checkout and record it")
    if unfinished:
        return unfinished
    return StageStatus(NAME, State.DONE, f"{source} at the pinned commit {head[:12]}")


def run(target) -> StageResult:
    from ..source import ensure_source
    bundle = target.options.bundle
    local = None if bundle else local_checkout(target)
    rec = record(target)
    inputs = {"commit": target.recipe.upstream.commit, "local": str(bundle) if bundle else local}
    rec.begin(inputs)
    fresh = not (target.deployment.source / ".git").exists()
    if bundle:
        from ..bundle.restore import source_origin
        origin = source_origin(bundle)
    else:
        origin = {"local": local}
    ensure_source(target.recipe, target.deployment.source, target.profile, config=target.config,
                  **origin)
    rec.finish(inputs, {"commit": target.recipe.upstream.commit})
    if not fresh:
        return StageResult(NAME, "the checkout in place is at the pinned commit", changed=False)
    how = f"from the bundle {bundle}" if bundle else f"copied the checkout {local}" if local \
        else f"cloned commit {inputs['commit'][:12]}"
    return StageResult(NAME, how)
