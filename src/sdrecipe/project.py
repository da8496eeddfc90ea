"""The project as a whole: the recipe with every stage's section, lint with every check.

`recipe.py` and `lint.py` sit below the stages (the stages use their model and
`@check`), so they cannot import the stages' section parsers and checks; this
module sits above the stages and names them in plain imports. Load recipes
here, never with the core's `parse_recipe` alone: a recipe loaded here also
has every lint check registered.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

# lock and patch_lint only for their @check functions, which register on import
from . import artifacts, lock, patch_lint, slurm, verify  # noqa: F401
from .lint import CHECKS, LintContext, run_checks
from .recipe import Recipe, parse_recipe

# The optional recipe sections, each parsed by the stage that owns its schema.
SECTIONS = {
    "artifacts": artifacts.parse_section,
    "slurm": slurm.parse_section,
    "verify": verify.parse_section,
}


def load_recipe(path: Path | str) -> Recipe:
    """Load and validate a recipe file, every section; errors name file:line:field."""
    return parse_recipe(path, SECTIONS)


def lint_command(cli_ctx) -> int:
    """`sdrecipe lint`: every check's findings, as text or JSON; exit 1 on any error."""
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
