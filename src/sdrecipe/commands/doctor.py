"""`sdrecipe doctor`: every diagnosis of doctor.py against the target, each finding shown
with the error it causes, why, and the fix; exit 1 on any error (warnings alone pass)."""

from __future__ import annotations

from ..doctor import DIAGNOSES, diagnose


def run(target) -> int:
    from rich.console import Console
    from rich.markup import escape
    findings = diagnose(target)
    console = Console(soft_wrap=True)  # stdout; colours only on a terminal; fixes never wrapped
    console.print(f"sdrecipe doctor: profile {target.profile}{' (smoke)' if target.smoke else ''}, "
                  f"deployment {target.deployment.root}, {len(DIAGNOSES)} diagnoses")
    for finding in findings:
        colour = "red" if finding.severity == "error" else "yellow"
        console.print(f"[{colour}]{finding.severity}[/{colour}] {escape(f'[{finding.check}]')} "
                      f"{escape(finding.symptom)}\n  cause: {escape(finding.cause)}\n"
                      f"  fix:   {escape(finding.fix)}")
    errors = sum(1 for f in findings if f.severity == "error")
    console.print(f"{errors} errors, {len(findings) - errors} warnings" if findings
                  else "no problems found")
    return 1 if errors else 0
