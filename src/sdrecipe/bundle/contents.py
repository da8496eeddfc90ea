"""What a bundle holds, as items: a path in the bundle, its hash when known, and how to
put its bytes there. Everything is gathered into the site's caches first (the one
downloader, hashes checked on arrival), so the bundle is written from local files: model
files hardlinked from the content cache (which renews its stamps), environment files
reflinked or copied (a hardlink would make uv unpack them again), project files copied.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import SdrecipeError
from ..placement import place
from .manifest import SOURCE_BUNDLE, SOURCE_CHECKOUT, artifact_path

log = logging.getLogger("sdrecipe.bundle")
ENGINE_ROOT = Path(__file__).resolve().parents[3]  # the checkout the engine runs from
PROJECT_FOLDERS = ("recipe", "env", "lock")  # plus the recipe's patch folder
ENGINE_FILES = ("pyproject.toml", "README.md", "ARCHITECTURE.md")
ENGINE_FOLDERS = ("src/sdrecipe", "scripts")


@dataclass(frozen=True)
class Item:
    rel: str  # where it goes in the bundle
    section: str  # what it is, for the report: source, artifacts, packages, engine, project
    sha256: str | None  # known (content-named files), else hashed from `path`
    path: Path  # where its bytes are now
    # How to put them there; default, a copy: a hardlink to a project file would let an
    # edit of the project change the bundle behind its manifest's back.
    put: Callable[[Path], object] | None = None

    def write(self, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        (self.put or (lambda target: shutil.copy2(self.path, target)))(dest)


def _linked(path: Path) -> Callable[[Path], object]:
    """For a file named by its hash that nothing else watches: a hardlink where possible."""
    return lambda target: place(path, target)


def _cloned(path: Path) -> Callable[[Path], object]:
    """For a file of the download cache: a reflink or a copy, never a hardlink. A new link
    moves the file's ctime, and uv then unpacks the wheel into its cache once more (2 GB
    for the cpu environment, each time)."""
    return lambda target: place(path, target, link=False)


def artifact_items(recipe, profiles, with_optional: bool, config) -> tuple[list[Item], dict]:
    """The profiles' model files, fetched into the content cache; and the manifest's
    `artifacts` table (recipe key -> sha256, size, place)."""
    from ..artifacts import ArtifactLock, fill_cache, open_cache, select
    seen = {}
    for profile in profiles:
        for file in select(recipe, profile, with_optional):
            seen.setdefault(file.place, file)
    files = list(seen.values())
    cache = open_cache(config)
    lock = ArtifactLock.for_recipe(recipe)
    with cache.lock():
        hashes = fill_cache(files, lock, cache, verify=False, offline=False, extra_pins=None,
                            config=config)
    lock.save()
    items, table = {}, {}
    for file in files:
        sha = hashes[file]
        path = cache.path(sha)
        items[sha] = Item(artifact_path(sha), "artifacts", sha, path,
                          lambda dest, sha=sha: cache.place(sha, dest))
        table[file.key] = {"sha256": sha, "size": path.stat().st_size, "place": file.place}
    return list(items.values()), dict(sorted(table.items()))


def package_items(recipe, profile: str, config) -> list[Item]:
    """Every locked file of the profile's environment, fetched and checked into the cache:
    the pip layer with the venv stand-ins (the node may have no conda), the conda archives
    where the lock has them, and the platform wheels from the site's wheel folder."""
    from ..environment.inputs import (fetch_conda_packages, fetch_pip_files,
                                      find_platform_wheels, wheel_dirs)
    from ..files import sha256_file
    from ..lock import load_lock, lock_path
    if not lock_path(recipe, profile).is_file():
        log.warning("profile %s has no lock (%s): its environment files are not bundled",
                    profile, lock_path(recipe, profile))
        return []
    lock = load_lock(recipe, profile, config)
    cache = Path(config.get("cache_dir")).expanduser()
    items = [Item(f"packages/pip/{f.sha256}/{f.path.name}", "packages", f.sha256, f.path,
                  _cloned(f.path)) for f in fetch_pip_files(lock, True, cache / "pip", config)]
    for conda in fetch_conda_packages(lock, cache / "conda-pkgs", config) if lock.conda else ():
        key = conda.package.sha256 or conda.package.md5
        items.append(Item(f"packages/conda/{key}/{conda.path.name}", "packages",
                          conda.package.sha256 or sha256_file(conda.path), conda.path,
                          _cloned(conda.path)))
    items += [Item(f"packages/wheels/{w.path.name}", "packages", w.sha256, w.path, _cloned(w.path))
              for w in find_platform_wheels(recipe, profile, lock, wheel_dirs(config))]
    return items


def engine_items(work: Path) -> list[Item]:
    """The engine's dependencies as wheels for this interpreter, downloaded into `work`
    (the bundle's `scripts/sdrecipe` installs them with --no-index --require-hashes), and
    the engine's own files: the bundle is a checkout that runs."""
    _download_engine_wheels(work)
    items = [Item(f"engine/{path.name}", "engine", None, path, _linked(path))
             for path in sorted(work.iterdir()) if path.is_file()]
    for name in ENGINE_FILES:
        if (ENGINE_ROOT / name).is_file():
            items.append(Item(name, "engine", None, ENGINE_ROOT / name))
    for name in ENGINE_FOLDERS:
        items += tree_items(ENGINE_ROOT / name, name, "engine")
    return items


def _engine_requirements() -> list[str]:
    """pyproject.toml's dependencies, as the wrapper reads them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    pyproject = ENGINE_ROOT / "pyproject.toml"
    if not pyproject.is_file():
        raise SdrecipeError(f"{pyproject}: not found; bundle create carries the engine from "
                            "a checkout of sdrecipe (git clone), not from an installed package")
    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def _download_engine_wheels(dest: Path) -> None:
    """`pip download` of the engine's requirements for this interpreter (pip's own cache
    makes a second bundle's download local), and a requirements file pinning each wheel
    by sha256, and the Python version they are for."""
    from packaging.utils import parse_wheel_filename
    from ..files import sha256_file
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary", ":all:", "--dest", str(dest), *_engine_requirements()]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SdrecipeError(f"pip download of the engine's wheels failed: {last}; check the "
                            "package index (PIP_INDEX_URL) and run again")
    lines = []
    for path in sorted(dest.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        lines.append(f"{name}=={version} --hash=sha256:{sha256_file(path)}")
    (dest / "requirements.txt").write_text("\n".join(lines) + "\n")
    (dest / "python-version").write_text("%d.%d\n" % sys.version_info[:2])


def project_items(recipe) -> list[Item]:
    """The recipe and what it names: recipe/, env/, lock/ and the patch series."""
    root = recipe.root
    folders = list(PROJECT_FOLDERS)
    if recipe.patch_dir.is_dir():
        folders.append(recipe.patch_dir.resolve().relative_to(root).as_posix())
    items = []
    for name in dict.fromkeys(folders):
        items += tree_items(root / name, name, "project")
    return items


def tree_items(src: Path, rel: str, section: str) -> list[Item]:
    """Regular files only (a symlink could point anywhere on the login node), no bytecode."""
    if not src.is_dir():
        return []
    return [Item(f"{rel}/{path.relative_to(src).as_posix()}", section, None, path)
            for path in sorted(src.rglob("*"))
            if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts]


def source_items(recipe, deployment, config, local: Path | None) -> list[Item]:
    """A git bundle of the pinned commit, kept in the cache (a second create reuses it);
    where the checkout lacks objects git needs (a sparse or partial snapshot), a copy of
    the checkout itself, .git included, which the node copies like `--source`."""
    import git
    from ..source import PINNED_REF, check_existing, ensure_source
    commit = recipe.upstream.commit
    cache = Path(config.get("cache_dir")).expanduser()
    made = cache / "source-bundles" / f"{commit}.bundle"
    if made.is_file():
        return [Item(SOURCE_BUNDLE, "source", None, made, _linked(made))]
    if local:
        repo = Path(local).expanduser().resolve()
        check_existing(recipe, repo)
    elif (deployment.source / ".git").exists():
        repo = deployment.source
    else:
        repo = ensure_source(recipe, cache / "source" / commit, config=config)
    handle = git.Repo(repo)
    partial = made.with_name(f".{made.name}.partial")
    made.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle.git.update_ref(PINNED_REF, commit)
        handle.git.bundle("create", str(partial), PINNED_REF)
    except git.GitCommandError:
        partial.unlink(missing_ok=True)
        _check_checked_out_blobs(handle, repo, commit)
        log.info("%s lacks objects git needs to bundle commit %s (a sparse or partial "
                 "checkout): carrying the checkout itself", repo, commit[:12])
        return [Item(f"{SOURCE_CHECKOUT}/{path.relative_to(repo).as_posix()}", "source", None,
                     path) for path in sorted(repo.rglob("*"))
                if path.is_file() and not path.is_symlink()]
    partial.replace(made)
    return [Item(SOURCE_BUNDLE, "source", None, made, _linked(made))]


def _check_checked_out_blobs(handle, repo: Path, commit: str) -> None:
    """A checkout carried as a copy must have the blob of every file it checks out (those
    outside a sparse checkout may be missing): the node's git reads them to compare."""
    entries = [line.split(None, 4) for line in handle.git.ls_files("-s", "-t").splitlines()]
    shas = [sha for tag, _, sha, _, _ in entries if tag != "S"]
    found = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch-check"],
                           input="\n".join(shas) + "\n", capture_output=True, text=True).stdout
    missing = [line.split()[0] for line in found.splitlines() if line.endswith(" missing")]
    if missing:
        raise SdrecipeError(
            f"cannot bundle commit {commit[:12]} from {repo}: the checkout lacks objects of "
            f"files it checks out ({len(missing)}, e.g. {missing[0]}): a damaged clone; bundle "
            "from a complete one (--source DIR, or another --deploy-dir), or move it aside so "
            "a fresh clone is made")
