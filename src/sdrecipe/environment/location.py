"""Where a profile's environment is: the folder its last build chose (even with --prefix),
kept in the env stage's record, else `<deploy>/envs/<profile>`."""

from __future__ import annotations

from pathlib import Path

from ..stages import Record


def env_record(deployment, profile: str) -> Record:
    """The env stage's record (stages/env.py writes it; everything else only reads it)."""
    return Record(deployment.record("env", profile), "env")


def env_prefix(deployment, profile: str) -> Path:
    data = env_record(deployment, profile).read() or {}
    chosen = data.get("inputs", {}).get("prefix")
    return Path(chosen) if chosen else deployment.env_prefix(profile)


def env_python(deployment, profile: str) -> Path:
    """The environment's interpreter (conda and venv alike keep it in bin/)."""
    return env_prefix(deployment, profile) / "bin" / "python"


def is_conda_prefix(prefix: Path) -> bool:
    return (prefix / "conda-meta").is_dir()


def activation_script(deployment, profile: str) -> Path:
    """The bash file to `source` to activate the environment (any backend)."""
    return env_prefix(deployment, profile) / "etc" / "sdrecipe" / "activate.sh"


def modulefile_path(deployment, profile: str) -> Path:
    """The Lmod modulefile (Lua)."""
    return deployment.modulefiles / "sdrecipe" / f"{profile}.lua"


def tcl_modulefile_path(deployment, profile: str) -> Path:
    """The Environment Modules modulefile (Tcl), beside the Lua one: same `module load` name."""
    return deployment.modulefiles / "sdrecipe" / profile


def env_modules(recipe, deployment, profile: str) -> tuple[str, ...]:
    """The modules a job loads before activating: the profile's, and any site module the
    last build relied on (the libmpi module, recorded by the env stage)."""
    data = env_record(deployment, profile).read() or {}
    extra = data.get("outputs", {}).get("modules", [])
    return tuple(dict.fromkeys(tuple(recipe.profile(profile).modules) + tuple(extra)))


def usage(deployment, profile: str) -> str:
    """How a person activates the environment."""
    return (f"activate:  source {activation_script(deployment, profile)}\n"
            f"or:        module use {modulefile_path(deployment, profile).parent.parent}; "
            f"module load sdrecipe/{profile}")
