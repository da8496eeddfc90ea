"""`sdrecipe fetch`: the pinned upstream and the profile's model files, into the deployment.

Online it clones the source (`source.py`), or copies the site's local checkout
when one is configured (`$SDRECIPE_UPSTREAM`, config `upstream_checkout`, as
`deploy` does), and downloads what the cache lacks (`artifacts.py`); with
`--from-bundle` it takes both from an offline bundle (`bundle.py`) and never
touches the network. Either way a second run with
everything in place only compares stamps, and `--verify` rehashes.
"""

from __future__ import annotations

import os

from .artifacts import fetch_artifacts
from .source import configured_checkout, ensure_source


def run_command(ctx) -> int:
    args = ctx.args
    recipe, deployment, profile = ctx.recipe, ctx.deployment, ctx.profile()
    commit = recipe.upstream.commit
    fresh = not os.path.lexists(deployment.source / ".git")
    local = None if args.from_bundle else configured_checkout()
    if args.from_bundle:
        from .bundle import restore
        placed = restore(recipe, deployment, args.from_bundle, profile, verify=args.verify,
                         with_optional=args.with_optional, only=args.only)
    else:
        ensure_source(recipe, deployment.source, profile, local=local)
        placed = fetch_artifacts(recipe, deployment, profile, verify=args.verify,
                                 with_optional=args.with_optional, only=args.only)
    origin = "in place" if not fresh else (
        f"from {args.from_bundle}" if args.from_bundle else f"copied from {local}" if local
        else "cloned")
    print(f"source     {deployment.source} at {commit[:12]} ({origin})")
    for item in placed:
        how = f" by {item.method}" if item.method else ""
        print(f"{item.action:<10} {item.file.place}{how}")
    counts = {}
    for item in placed:
        counts[item.action] = counts.get(item.action, 0) + 1
    summary = ", ".join(f"{n} {action}" for action, n in counts.items()) or "nothing to fetch"
    print(f"fetch: profile {profile}: {len(placed)} files: {summary}")
    return 0
