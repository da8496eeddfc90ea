"""`sdrecipe fetch`: the pinned upstream and the profile's model files, into the deployment.

Online it runs the source and artifacts stages (copying the site's local checkout when
one is configured, as `deploy` does) and places the $TORCH_HOME files; with
`--from-bundle` it takes everything from an offline bundle (`bundle/`) and never
touches the network. Either way a second run with everything in place only compares
stamps, and `--verify` rehashes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..console import out
from ..deploy_lock import deployment_lock
from ..errors import SdrecipeError
from ..stages import artifacts as artifacts_stage
from ..stages import source as source_stage


def run(target, verify: bool = False, with_optional: bool = False, only=None,
        from_bundle: Path | None = None, connections: int | None = None) -> int:
    if connections is not None:  # --connections: this run's setting over the site config's
        if connections < 1:
            raise SdrecipeError(f"--connections {connections}: give 1 or more")
        config = replace(target.config, values={**target.config.values,
                                                "connections": connections})
        target = replace(target, config=config)
    with deployment_lock(target.deployment, "sdrecipe fetch"):
        placed, origin = _fetch(target, verify, with_optional, only, from_bundle)
    _show(target, placed, origin)
    return 0


def _fetch(target, verify, with_optional, only, from_bundle) -> tuple[list, str]:
    from ..artifacts import fetch_artifacts
    recipe, deployment = target.recipe, target.deployment
    options = {"verify": verify, "with_optional": with_optional, "only": only}
    fresh = not (deployment.source / ".git").exists()
    if from_bundle:
        from ..bundle.restore import restore
        placed = restore(recipe, deployment, from_bundle, target.profile, **options)
        origin = f"from {from_bundle}" if fresh else "in place"
    else:
        source_stage.run(target)
        local = source_stage.local_checkout(target)
        origin = "in place" if not fresh else f"copied from {local}" if local else "cloned"
        placed = list(artifacts_stage.run(target, **options).details)  # recorded
        placed += fetch_artifacts(recipe, deployment, target.profile, roots=("torch_home",),
                                  config=target.config, **options)  # preseed's files: no record
    return placed, origin


def _show(target, placed, origin) -> None:
    recipe, deployment = target.recipe, target.deployment
    out(f"source     {deployment.source} at {recipe.upstream.commit[:12]} ({origin})")
    for item in placed:
        how = f" by {item.method}" if item.method else ""
        out(f"{item.action:<10} {item.file.place}{how}")
    counts = {}
    for item in placed:
        counts[item.action] = counts.get(item.action, 0) + 1
    summary = ", ".join(f"{n} {action}" for action, n in counts.items()) or "nothing to fetch"
    out(f"fetch: profile {target.profile}: {len(placed)} files: {summary}")
