"""The recipe: what upstream to deploy, which patches, artifacts, environments and jobs.

`recipe/stable-diffusion.yaml` is data; this module validates it on load and turns
it into frozen dataclasses. Errors name the file, the line and the field
(see `schema.Node`). The schema is documented in `docs/recipe-schema.md`.

The core sections (`upstream`, `patches`, `profiles`) are parsed here. Each later
stage owns the schema of its own section (`artifacts`, `verify`, `slurm`); this
module sits below the stages, so it is handed their parsers (`parse_recipe`'s
`sections`) rather than importing them: `project.load_recipe` passes them all,
so a recipe that loads is valid as a whole.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import SdrecipeError
from .schema import SHA1_RE, SHA256_RE, Node, load_yaml

SCHEMA_VERSION = 1
# A profile's name becomes part of paths (envs/<profile>, lock/<profile>.conda-lock.yml)
# and of commands, so it must be safe in both.
PROFILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
DEFAULT_RECIPE = "recipe/stable-diffusion.yaml"


@dataclass(frozen=True)
class Upstream:
    url: str
    commit: str
    mirrors: tuple[str, ...]

    @property
    def urls(self) -> tuple[str, ...]:
        """Where to clone from, in the order to try: mirrors first, then the canonical URL."""
        return tuple(dict.fromkeys(self.mirrors + (self.url,)))


@dataclass(frozen=True)
class PatchEntry:
    file: str
    sha256: str
    summary: str
    when: tuple[str, ...] | None
    line: int | None

    def applies_to(self, profile: str) -> bool:
        return self.when is None or profile in self.when


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    accelerator: str  # "dcu", "cuda" or "none"
    env: str | None  # path of the env profile, relative to the project root
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    upstream: Upstream
    patch_dir: Path
    patches: tuple[PatchEntry, ...]
    profiles: dict[str, Profile]
    sections: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        """The project folder: the recipe lives in `<root>/recipe/`."""
        return self.path.resolve().parent.parent

    def series(self, profile: str) -> list[PatchEntry]:
        """The patches that apply to `profile`, in order."""
        self.profile(profile)
        return [p for p in self.patches if p.applies_to(profile)]

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise SdrecipeError(f"unknown profile {name!r} in {self.path} "
                                f"(known: {', '.join(self.profiles)})")
        return self.profiles[name]


def _parse_upstream(node: Node) -> Upstream:
    node.keys(required=("url", "commit"), optional=("mirrors",))
    commit = node.text("commit", SHA1_RE, "a full 40-character commit sha (never a branch or tag)")
    return Upstream(url=node.text("url"), commit=commit,
                    mirrors=node.string_list("mirrors") or ())


def _parse_patches(node: Node, recipe_path: Path,
                   profiles: tuple[str, ...]) -> tuple[Path, tuple[PatchEntry, ...]]:
    node.keys(required=("dir", "series"))
    patch_dir = recipe_path.resolve().parent.parent / node.text("dir")
    entries, seen = [], set()
    for item in node.get("series", list).items():
        item.keys(required=("file", "sha256", "summary"), optional=("when",))
        name = item.text("file")
        if "/" in name or name.startswith("."):
            raise item.get("file").error("must be a plain file name inside the patch dir")
        if name in seen:
            raise item.get("file").error(f"{name} is listed twice")
        seen.add(name)
        entries.append(PatchEntry(
            file=name, sha256=item.text("sha256", SHA256_RE, "a 64-hex sha256"),
            summary=item.text("summary"), when=item.string_list("when", profiles),
            line=item.line))
    return patch_dir, tuple(entries)


def _parse_profiles(node: Node) -> dict[str, Profile]:
    profiles = {}
    for name, item in node.entries():
        if not isinstance(name, str) or not PROFILE_NAME_RE.match(name):
            raise item.error(f"profile name {name!r} must be lowercase letters, digits, '.', "
                             "'_' or '-', starting with a letter or digit")
        item.keys(required=("description", "accelerator"), optional=("env", "modules"))
        accelerator = item.text("accelerator")
        if accelerator not in ("dcu", "cuda", "none"):
            raise item.get("accelerator").error("expected one of dcu, cuda, none")
        profiles[name] = Profile(name=name, description=item.text("description"),
                                 accelerator=accelerator, env=item.opt("env", str),
                                 modules=item.string_list("modules") or ())
    return profiles


def parse_recipe(path: Path | str,
                 sections: Mapping[str, Callable[[Node, Recipe], Any]]) -> Recipe:
    """Load and validate a recipe file; raises `RecipeError` naming file:line:field.

    `sections` maps each optional section to the parser of the stage that owns it;
    a top-level key that is neither a core section nor one of them is refused.
    """
    path = Path(path)
    root = load_yaml(path)
    root.keys(required=("schema", "name", "upstream", "patches", "profiles"),
              optional=tuple(sections))
    schema = root.get("schema", int)
    if schema.value != SCHEMA_VERSION:
        raise schema.error(f"unsupported schema version {schema.value} "
                           f"(this sdrecipe reads version {SCHEMA_VERSION})")
    profiles = _parse_profiles(root.get("profiles"))
    patch_dir, patches = _parse_patches(root.get("patches"), path, tuple(profiles))
    recipe = Recipe(path=path, name=root.text("name"), upstream=_parse_upstream(root.get("upstream")),
                    patch_dir=patch_dir, patches=patches, profiles=profiles)
    for section, parse in sections.items():
        if root.has(section):
            recipe.sections[section] = parse(root.get(section), recipe)
    return recipe


def find_recipe(explicit: str | None = None) -> Path:
    """The recipe to use: --recipe, $SDRECIPE_RECIPE, or the project's default."""
    candidate = explicit or os.environ.get("SDRECIPE_RECIPE")
    if candidate:
        return Path(candidate)
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / DEFAULT_RECIPE).is_file():
            return base / DEFAULT_RECIPE
    raise SdrecipeError(f"no recipe found: run from the sdrecipe checkout, or pass --recipe "
                        f"(or set SDRECIPE_RECIPE) to the path of {DEFAULT_RECIPE}")
