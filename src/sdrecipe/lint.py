"""`sdrecipe lint`: the CI gate, as registered checks that return findings.

In the style of Spack's `audit.py`: each check is a function decorated with
`@check("name", "what it guards")` that takes a `LintContext` and returns (or
yields) `Finding`s. Checks live beside the stage they guard; `CHECK_MODULES`
lists the modules to import so their checks register. The CLI prints the
findings and exits non-zero on any error (warnings alone exit 0).
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

# Modules whose import registers checks (each defines functions decorated with @check).
CHECK_MODULES: tuple[str, ...] = ("patch_lint", "artifacts", "lock")


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    check: str
    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.severity}: {self.message} [{self.check}]"


@dataclass
class LintContext:
    recipe: object  # sdrecipe.recipe.Recipe
    source: Path | None  # an upstream checkout at the pinned commit, when given

    def error(self, check, file, line, message) -> Finding:
        return Finding("error", check, str(file), line, message)

    def warning(self, check, file, line, message) -> Finding:
        return Finding("warning", check, str(file), line, message)


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    func: Callable[[LintContext], Iterable[Finding]]
    needs_source: bool


CHECKS: dict[str, Check] = {}


def check(name: str, description: str, needs_source: bool = False):
    """Register a lint check; `needs_source` checks run only with --source."""
    def register(func):
        CHECKS[name] = Check(name, description, func, needs_source)
        return func
    return register


def run_checks(ctx: LintContext) -> list[Finding]:
    for module in CHECK_MODULES:
        importlib.import_module(f"sdrecipe.{module}")
    findings: list[Finding] = []
    for registered in CHECKS.values():
        if registered.needs_source and ctx.source is None:
            continue
        findings.extend(registered.func(ctx) or ())
    return findings


def run_command(cli_ctx) -> int:
    args = cli_ctx.args
    findings = run_checks(LintContext(recipe=cli_ctx.recipe, source=args.source))
    errors = [f for f in findings if f.severity == "error"]
    if args.format == "json":
        json.dump({"ok": not errors, "findings": [asdict(f) for f in findings]},
                  sys.stdout, indent=2)
        print()
    else:
        for finding in findings:
            print(finding)
        ran = sum(1 for c in CHECKS.values() if args.source or not c.needs_source)
        print(f"lint: {ran} checks, {len(errors)} errors, {len(findings) - len(errors)} warnings")
    return 1 if errors else 0
