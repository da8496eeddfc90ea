"""The lint registry behind `sdrecipe lint` (the CI gate): checks that return findings.

In the style of Spack's `audit.py`: each check is a function decorated with
`@check("name", "what it guards")` that takes a `LintContext` and returns (or
yields) `Finding`s. Checks live beside the stage they guard and register when
their module is imported; this registry sits below those modules, so
`project`, above them, imports them all, and `commands/lint.py` runs `sdrecipe
lint`: it prints the findings and exits non-zero on any error (warnings alone
exit 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable


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
    """The findings of every registered check (those needing a checkout only with one)."""
    findings: list[Finding] = []
    for registered in CHECKS.values():
        if registered.needs_source and ctx.source is None:
            continue
        findings.extend(registered.func(ctx) or ())
    return findings
