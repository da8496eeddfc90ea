"""`sdrecipe lint`: every registered check's findings, as text or JSON; exit 1 on any error
(warnings alone pass), so CI can gate on it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .. import project  # noqa: F401  every check registers when project imports its module
from ..console import out
from ..lint import CHECKS, LintContext, run_checks


def run(recipe, source: Path | None = None, format: str = "text") -> int:
    findings = run_checks(LintContext(recipe=recipe, source=source))
    errors = [f for f in findings if f.severity == "error"]
    if format == "json":
        out(json.dumps({"ok": not errors, "findings": [asdict(f) for f in findings]}, indent=2))
        return 1 if errors else 0
    for finding in findings:
        out(str(finding))
    ran = sum(1 for c in CHECKS.values() if source or not c.needs_source)
    out(f"lint: {ran} checks, {len(errors)} errors, {len(findings) - len(errors)} warnings")
    return 1 if errors else 0
