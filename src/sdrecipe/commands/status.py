"""`sdrecipe status`: each stage's state, why, and what a deploy would do (read-only)."""

from __future__ import annotations

import json

from ..console import out
from ..deploy import status


def run(target, format: str = "text") -> int:
    stages = status(target)
    pending = [s.stage for s in stages if not s.settled]
    if format == "json":
        out(json.dumps({"deployment": str(target.deployment.root), "profile": target.profile,
                        "smoke": target.smoke, "stages": [s.as_dict() for s in stages]}, indent=2))
        return 0 if not pending else 1
    out(f"deployment {target.deployment.root} (profile {target.profile}"
        f"{', smoke' if target.smoke else ''})")
    for s in stages:
        out(f"  {s.stage:<10} {s.state.value:<8} {s.reason}")
        if s.action != "nothing":
            out(f"  {'':<10} {'':<8} {'you must: ' if s.blocking else 're-run: '}{s.action}")
    blocked = [s.stage for s in stages if s.blocking]
    deploy = target.command("deploy")
    out(f"a re-run of {deploy} would do nothing" if not pending else
        f"a re-run of {deploy} would stop at {blocked[0]} (see above)" if blocked else
        f"a re-run of {deploy} would run: {', '.join(pending)}")
    return 0 if not pending else 1
