"""The run context: one frozen `Target` that the CLI builds once and passes everywhere.

Recipe, deployment, profile, site config and mode (smoke or real) travel together,
so no stage, check or diagnosis loads the config again or is handed them loose.
`Options` holds what the person asked of this run beyond the recipe (a local
checkout to copy, the interpreter or prefix of the environment).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import SdrecipeError
from .layout import Deployment
from .recipe import Recipe
from .stages import Record


# The verbs with a --smoke option: a suggestion for a smoke deployment must carry it.
SMOKE_VERBS = ("deploy", "status", "verify", "doctor", "submit verify", "submit generate")


@dataclass(frozen=True)
class Options:
    source: str | None = None  # a local checkout of the pinned commit to copy
    python: str | None = None  # build the env as a venv of this interpreter
    prefix: Path | None = None  # the env's folder, when not <deploy>/envs/<profile>
    bundle: Path | None = None  # an offline bundle to deploy from (a folder once opened)


@dataclass(frozen=True)
class Target:
    recipe: Recipe
    deployment: Deployment
    profile: str
    config: Config
    smoke: bool = False
    options: Options = field(default_factory=Options)

    def __post_init__(self):
        self.recipe.profile(self.profile)  # an unknown profile names the recipe's

    @property
    def mode(self) -> str:
        return "smoke" if self.smoke else "sample"

    def record(self, stage: str, per_mode: bool = False, per_profile: bool = True) -> Record:
        path = self.deployment.record(stage, self.profile if per_profile else None,
                                      self.mode if per_mode else None)
        return Record(path, stage)

    def command(self, verb: str, *args, profile: bool = True) -> str:
        """A command line to print as a fix or next step: it runs as printed, for this very
        deployment (its recipe and folder when not the defaults, its profile and mode),
        quoted for the shell, and marked as a suggestion (`suggestion`)."""
        from .layout import deployment_dir
        words = []
        if self.deployment.root != deployment_dir(None, self.recipe.root).root:
            words += ["--deploy-dir", str(self.deployment.root)]
        words += verb.split()
        if profile:
            words += ["--profile", self.profile] + (["--smoke"] if self.smoke and verb in
                                                    SMOKE_VERBS else [])
        return recipe_command(self.recipe, *words, *args)


def recipe_command(recipe: Recipe, *words) -> str:
    """`Target.command` for the verbs of a recipe and no deployment (lock, lint,
    upstream-lock): the recipe named when it is not the default one."""
    from .recipe import find_recipe
    program = [_sdrecipe_program(recipe.root)]
    try:
        default_recipe = find_recipe().resolve()
    except SdrecipeError:
        default_recipe = None
    if recipe.path.resolve() != default_recipe:
        program += ["--recipe", str(recipe.path.resolve())]
    return suggestion(shlex.join(program + [str(w) for w in words]))


def suggestion(command: str) -> str:
    """How every command printed as a fix or next step is marked: in backticks, so a person
    sees where it starts and ends and a test can collect and run each one."""
    return f"`{command}`"


def _sdrecipe_program(project: Path) -> str:
    """`sdrecipe` where it is on PATH, else this checkout's wrapper (as a path that works
    from the current folder)."""
    if shutil.which("sdrecipe"):
        return "sdrecipe"
    wrapper = project / "scripts" / "sdrecipe"
    try:
        return "./" + wrapper.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return os.fspath(wrapper)


def last_deployed(deployment: Deployment) -> tuple[str, bool] | None:
    """(profile, smoke) of the last deploy into `deployment`, from its provenance.json, so
    `status`, `doctor`, `verify` and `submit` need no --profile or --smoke after a deploy."""
    try:
        data = json.loads(deployment.provenance.read_text())
        return str(data["profile"]), bool(data.get("smoke"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
