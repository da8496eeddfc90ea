"""`sdrecipe deploy`: every stage that is not done yet, in order (deploy.py)."""

from __future__ import annotations

import time

from ..console import out
from ..deploy import deploy
from ..stages import verify as verify_stage
from .verify import show_report


def run(target) -> int:
    start = time.monotonic()
    ran = []

    def show(status, result, seconds) -> None:
        if result is None and not status.settled:
            ran.append(status.stage)
            out(f"{status.stage:<10} {status.state.value}: {status.reason} -> running")
            return
        what = result.summary if result else f"{status.state.value}: {status.reason}"
        out(f"{status.stage:<10} {what} ({seconds:.2f} s)")

    out(f"deploy: profile {target.profile}{' (smoke)' if target.smoke else ''} into "
        f"{target.deployment.root}")
    try:
        deploy(target, on_stage=show)
    finally:
        if verify_stage.NAME in ran:
            show_report(verify_stage.report_folder(target))
    out(f"deploy: complete in {time.monotonic() - start:.1f} s; provenance: "
        f"{target.deployment.provenance}")
    return 0
