"""The project as a whole: the recipe with every stage's section, lint with every check.

`recipe.py` and `lint.py` sit below the stages (the stages use their model and
`@check`), so they cannot import the stages' section parsers and checks; this
module sits above the stages and names them in plain imports. Load recipes
here, never with the core's `parse_recipe` alone: a recipe loaded here also
has every lint check registered.
"""

from __future__ import annotations

from pathlib import Path

# lock, lock_lint and patch_lint only for their @check functions, which register on import
from . import artifacts, lock, lock_lint, patch_lint, slurm, verify  # noqa: F401
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

