"""The project as a whole: the recipe with every stage's section.

`recipe.py` sits below the stages (they use its model), so it cannot import
their section parsers; this module sits above them and names them in plain
imports. Load recipes here, never with the core's `parse_recipe` alone.
"""

from __future__ import annotations

from pathlib import Path

from . import artifacts, slurm, verify
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
