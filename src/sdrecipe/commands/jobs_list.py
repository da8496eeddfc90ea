"""`sdrecipe jobs`: the jobs submitted from this deployment (jobs.submitted_jobs), each with
its kind, state, elapsed time and where its report or gallery is."""

from __future__ import annotations

from .. import jobs
from ..console import out


def run(target, profile: str | None = None) -> int:
    """`profile`: only that profile's jobs (None: all of the deployment's)."""
    rows = jobs.submitted_jobs(target.deployment, profile)
    if not rows:
        out(f"sdrecipe: no jobs submitted from {target.deployment.root} yet "
            "(sdrecipe submit verify|generate)")
        return 0
    header = ("JOB", "KIND", "PROFILE", "STATE", "ELAPSED", "REPORT/GALLERY")
    table = [header] + [(r.id, r.kind, r.profile, r.state, r.elapsed, r.results) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0
