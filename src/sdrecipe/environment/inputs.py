"""The files an environment is made of, from its lock: platform wheels found in the site's
wheel folder, the pip layer and the conda archives fetched into the cache; each one's
digest checked against the lock before any installer sees it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..errors import SdrecipeError
from ..files import file_digest, sha256_file

log = logging.getLogger("sdrecipe.env")


@dataclass(frozen=True)
class LocalFile:
    """A file pip installs (platform wheel or pip-layer file), on disk, with its sha256."""
    path: Path
    sha256: str


# The seed's site keeps the DTK 22.10 wheels here, some one folder down in pytorch/.
SEED_WHEEL_DIR = Path("/public/software/apps/DeepLearning/whl/dtk-22.10")
WHEEL_SUBFOLDERS = ("", "pytorch")


def wheel_dirs(config) -> list[Path]:
    """Where platform wheels are looked for, in order: the `wheel_dir` setting
    ($SDRECIPE_WHEEL_DIR over the config file), then the seed's folder, each with its
    pytorch/ subfolder, then those a bundle brought. The lock names the file only, so
    any of them will do."""
    roots = [Path(config.get("wheel_dir")).expanduser(), SEED_WHEEL_DIR]
    found = [root / sub for root in roots for sub in WHEEL_SUBFOLDERS]
    return list(dict.fromkeys(found + [bundled_wheel_dir(config)]))


def bundled_wheel_dir(config) -> Path:
    """Where `deploy --from-bundle` puts the platform wheels it brought, checked."""
    return Path(config.get("cache_dir")).expanduser() / "wheels"


def pip_file_name(package, lock) -> str:
    """The file name a pip-layer URL ends in; refused if it could name a path."""
    name = unquote(package.url.rsplit("/", 1)[-1].split("#", 1)[0])
    if "/" in name or name.startswith("."):
        raise SdrecipeError(f"{lock.path}: {package.url} does not end in a file name")
    return name


def find_platform_wheels(recipe, profile: str, lock, folders: list[Path]) -> list[LocalFile]:
    """Locate each platform wheel of the lock in `folders`, check (or first record) its sha256."""
    from .. import lock as lock_module
    wheels = []
    for entry in lock.platform_wheels:
        name = entry.filename
        if "/" in name or name.startswith("."):
            raise SdrecipeError(f"{lock.path}: platform wheel {name!r} must be a plain file name")
        path = next((folder / name for folder in folders if (folder / name).is_file()), None)
        if path is None:
            raise SdrecipeError(
                f"platform wheel {name} not found in the wheel folder {folders[0]} (searched: "
                f"{', '.join(map(str, folders))}). Copy it there, or point sdrecipe at the "
                f"folder that has it: export SDRECIPE_WHEEL_DIR=/path/to/dtk-22.10 (or "
                f"wheel_dir: in the config file)")
        actual = sha256_file(path)
        if entry.sha256 is None:
            lock_module.record_wheel_hash(recipe, profile, name, actual, path.stat().st_size)
            log.warning("recorded sha256 of %s in %s (first sight): %s\n  commit it: git add %s",
                        name, lock.path, actual, lock.path)
        elif entry.sha256 != actual:
            raise SdrecipeError(
                f"platform wheel {path} has sha256 {actual}, but {lock.path} pins {entry.sha256}. "
                f"The file changed since it was locked: restore the original, or if the site "
                f"replaced it on purpose, delete its sha256 from the lock and rebuild to record "
                f"the new one")
        wheels.append(LocalFile(path, actual))
    return wheels


def fetch_pip_files(lock, venv: bool, cache_dir: Path, config,
                    skip=frozenset()) -> list[LocalFile]:
    """Every file of the pip layer in the download cache, sha256-checked on arrival.

    Through the one downloader (`transfer.py`), into `<cache>/pip/<sha256>/<file>`: a
    second build, CI, or a bundle for an air-gapped site reuses them, and pip then
    installs local files (pip's own HTTP cache does not keep them on every site).
    """
    from ..transfer import Download, Transfer
    packages = [p for p in lock.pip + (lock.venv if venv else ()) if p.name not in skip]
    files, downloads = [], []
    for package in packages:
        name = pip_file_name(package, lock)
        path = cache_dir / package.sha256 / name
        if not path.is_file():
            downloads.append(Download(urls=[package.url], dest=path, sha256=package.sha256,
                                      label=name))
        files.append(LocalFile(path, package.sha256))
    if downloads:
        log.info("downloading %d of %d pip-layer files into %s", len(downloads), len(files),
                 cache_dir)
        Transfer.from_config(config).fetch(downloads)
    return files


@dataclass(frozen=True)
class CondaFile:
    """A locked conda package archive, on local disk, its sha256 (or md5) checked."""
    package: object  # lock.CondaPackage
    path: Path


def _check_digest(path: Path, package, lock) -> None:
    """sha256 where the lock has it; md5 (conda-lock always writes it) only where the
    channel listed no sha256. Streamed: conda archives (pytorch) are gigabytes."""
    kind = "sha256" if package.sha256 else "md5"
    wanted = getattr(package, kind)
    if not wanted:
        raise SdrecipeError(f"{lock.path}: {package.url} has neither sha256 nor md5; "
                            f"relock it: sdrecipe lock --profile {lock.profile}")
    actual = file_digest(path, kind)
    if actual != wanted:
        raise SdrecipeError(f"{package.url}: {kind} {actual} does not match the lock's {wanted}; "
                            f"the channel's file changed since it was locked")


def fetch_conda_packages(lock, cache_dir: Path, config) -> list[CondaFile]:
    """Bring every locked conda archive into the cache, checked, before any installer sees it.

    http(s) goes through the one downloader (`transfer.py`: CA bundle, resume, sha256 in
    one pass); file:// channels (mirrors on a shared filesystem) are read in place.
    """
    from urllib.parse import urlparse
    from urllib.request import url2pathname
    from ..transfer import Download, Transfer
    files, downloads = [], []
    for package in lock.conda:
        url = urlparse(package.url)
        if url.scheme == "file":
            path = Path(url2pathname(url.path))
            if not path.is_file():
                raise SdrecipeError(f"{package.url}: no such file (locked in {lock.path})")
        else:
            path = cache_dir / (package.sha256 or package.md5) / package.url.rsplit("/", 1)[-1]
            if not path.is_file():
                downloads.append(Download(urls=[package.url], dest=path, sha256=package.sha256,
                                          label=path.name))
        files.append(CondaFile(package, path))
    if downloads:
        Transfer.from_config(config).fetch(downloads)
    for conda_file in files:
        _check_digest(conda_file.path, conda_file.package, lock)
    return files


def load_build_lock(recipe, profile: str, backend: str):
    """The profile's lock; a conda part not locked yet is solved once and written into it."""
    from ..lock import load_lock, lock_conda_part, lock_staleness
    lock = load_lock(recipe, profile)
    stale = lock_staleness(recipe, profile)
    if stale:
        log.warning("%s. Building the lock as committed.", stale)
    if backend != "venv" and not lock.conda:
        log.info("%s has no conda part yet: solving it once from env/ ...", lock.path)
        try:
            lock_conda_part(recipe, profile)
        except SdrecipeError as exc:
            raise SdrecipeError(f"{exc}\nOr build without conda: install Python "
                                f"{lock.python_version} (found on PATH as python"
                                f"{lock.python_version} or under pyenv), or pass --python "
                                f"/path/to/python{lock.python_version} to the same command"
                                ) from exc
        lock = load_lock(recipe, profile)
        log.warning("wrote the conda part into %s; commit it so builds stay solver-free:\n"
                    "  git add %s && git commit -m 'lock: conda part of %s'", lock.path,
                    lock.path, profile)
    return lock


