"""Building an environment in three steps, so the env stage can keep its record honest:

1. `plan_build`: read the lock, find and check the platform wheels, compute the stamp
   (lock, wheels, backend, interpreter, deployment); changes nothing;
2. `fetch_inputs`: bring every conda archive and pip-layer file into the cache, checked;
   the old environment is still untouched;
3. `make_env`: remove the previous build (only one sdrecipe made), create the base
   (conda backends or venv), install the pip layer from local files (uv, else pip), write
   activation.

Between 2 and 3 the stage marks its record in progress: a build killed in step 3
leaves no complete record, and the next run starts it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import activation
from ..errors import SdrecipeError
from ..files import atomic_write_text, sha256_file
from . import backends
from .inputs import (CondaFile, LocalFile, fetch_conda_packages, fetch_pip_files,
                     find_platform_wheels, load_build_lock, wheel_dirs)
from .libmpi import LibmpiPlan, host_glibc, plan_libmpi
from .location import is_conda_prefix, modulefile_path, tcl_modulefile_path

log = logging.getLogger("sdrecipe.env")
STAMP_VERSION = 2


@dataclass(frozen=True)
class BuildPlan:
    recipe: object
    deployment: object
    profile: str
    prefix: Path
    backend: str  # venv, micromamba, mamba, conda or rattler
    python: str | None  # the venv's interpreter
    lock: object  # lock.Lock
    wheels: list[LocalFile]
    libmpi: LibmpiPlan
    stamp: str  # identifies what this plan builds: equal stamps, equal environments


@dataclass(frozen=True)
class Inputs:
    conda: list[CondaFile]
    pip: list[LocalFile]


def _stamp(lock, wheels: list[LocalFile], backend: str, python: str | None, deployment,
           libmpi: LibmpiPlan) -> str:
    inputs = {"version": STAMP_VERSION, "lock": sha256_file(lock.path),
              "wheels": sorted(w.sha256 for w in wheels), "backend": backend,
              "modules": list(libmpi.modules), "skip": sorted(libmpi.skip),
              "python": str(Path(python).resolve()) if python else None,
              "deployment": str(deployment.root)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def plan_build(recipe, deployment, profile: str, config, prefix: Path | None = None,
               python: str | None = None) -> BuildPlan:
    recipe.profile(profile)
    prefix = Path(prefix).expanduser().absolute() if prefix else deployment.env_prefix(profile)
    backend = backends.choose_backend(python)
    if backend == "rattler":  # no conda here: without a locked conda part, a venv will do
        from ..lock import load_lock
        committed = load_lock(recipe, profile)
        found = None if committed.conda else backends.find_python(committed.python_version)
        if found:
            log.info("no conda on this machine and no conda part in %s: building a venv of "
                     "%s (Python %s)", committed.path.name, found, committed.python_version)
            backend, python = "venv", found
    lock = load_build_lock(recipe, profile, backend)
    if backend == "venv":
        backends.check_python(python, lock)
    from ..lock import load_env_spec, load_lock
    libmpi = plan_libmpi(profile, load_env_spec(recipe, profile).libmpi, lock, backend,
                         config.get("mpi_module"), host_glibc())
    if libmpi.how:
        log.info("%s", libmpi.how)
    wheels = find_platform_wheels(recipe, profile, lock, wheel_dirs(config))
    if any(entry.sha256 is None for entry in lock.platform_wheels):
        lock = load_lock(recipe, profile)  # re-read: the hashes were just recorded
    check_prefix(prefix)
    return BuildPlan(recipe, deployment, profile, prefix, backend, python, lock, wheels, libmpi,
                     _stamp(lock, wheels, backend, python, deployment, libmpi))


def fetch_inputs(plan: BuildPlan, config) -> Inputs:
    """Everything downloaded and checked before the old environment is touched."""
    cache = Path(config.get("cache_dir")).expanduser()
    conda = [] if plan.backend == "venv" else fetch_conda_packages(plan.lock, cache / "conda-pkgs",
                                                                   config)
    return Inputs(conda, fetch_pip_files(plan.lock, plan.backend == "venv", cache / "pip", config,
                                         skip=plan.libmpi.skip))


def _owner_mark(prefix: Path) -> Path:
    """Written beside a prefix before sdrecipe creates it: a half-built env is still ours."""
    return prefix.parent / f".{prefix.name}.sdrecipe"


def _ours(prefix: Path) -> bool:
    return _owner_mark(prefix).exists() or (prefix / "etc" / "sdrecipe").is_dir()


def check_prefix(prefix: Path) -> None:
    """Refuse, before anything is changed, to build over a folder that is not ours."""
    if prefix.exists() and not _ours(prefix) and any(prefix.iterdir()):
        raise SdrecipeError(f"{prefix} exists, is not empty and was not built by sdrecipe: "
                            f"choose another --prefix or remove it yourself")


def _clear_prefix(prefix: Path):
    """Remove a previous build, but only one sdrecipe made: never a user's folder."""
    check_prefix(prefix)
    if prefix.exists():
        shutil.rmtree(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _owner_mark(prefix).write_text("sdrecipe builds the environment next to this file\n")


def make_env(plan: BuildPlan, inputs: Inputs, config) -> None:
    prefix, lock = plan.prefix, plan.lock
    _clear_prefix(prefix)
    cache = Path(config.get("cache_dir")).expanduser()
    if plan.backend == "venv":
        # With uv the env holds exactly the lock: no ensurepip (pip is not in the lock, and
        # `uv pip install --python <env>/bin/python` adds to it); pip's path needs pip.
        without_pip = ["--without-pip"] if backends.uv_binary() else []
        backends.run_step([plan.python, "-m", "venv", *without_pip, prefix], "creating the venv",
                          fix=f"{plan.python} must have its venv module and ensurepip "
                              f"(Debian/Ubuntu system Pythons: apt install "
                              f"python{lock.python_version}-venv)")
    elif plan.backend == "rattler":
        backends.create_rattler(prefix, lock, inputs.conda, cache / "conda-pkgs" / "rattler")
    else:
        with tempfile.TemporaryDirectory(prefix="sdrecipe-env-") as work:
            backends.create_conda(plan.backend, prefix, lock, inputs.conda, Path(work))
    backends.install_pip_files(prefix, lock, plan.wheels + inputs.pip, cache / "uv")
    write_activation(plan.recipe, plan.deployment, plan.profile, prefix, plan.libmpi.modules)
    log.debug("built the %s environment at %s (%s)", plan.profile, prefix, plan.backend)


def write_activation(recipe, deployment, profile: str, prefix: Path, extra_modules=()):
    """The bash file, the conda hooks (conda prefixes) and the modulefiles, from one table;
    `extra_modules`: site modules the build relies on (the libmpi module)."""
    profile_info = recipe.profile(profile)
    table = activation.variables(deployment, profile, prefix)
    modules = tuple(profile_info.modules) + tuple(extra_modules)
    conda = is_conda_prefix(prefix)
    script = prefix / "etc" / "sdrecipe" / "activate.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(script, activation.bash_script(table, profile, modules, conda))
    if conda:
        on, off = activation.conda_hooks(table, profile, modules)
        for folder, text in (("activate.d", on), ("deactivate.d", off)):
            hook = prefix / "etc" / "conda" / folder / "sdrecipe.sh"
            hook.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(hook, text)
    module = modulefile_path(deployment, profile)
    module.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(module, activation.modulefile(table, profile, modules,
                                                    profile_info.description))
    atomic_write_text(tcl_modulefile_path(deployment, profile),
                      activation.tcl_modulefile(table, profile, modules, profile_info.description))
    return script, module
