"""Offline bundles: what a compute node without network needs, in one folder or tar file.

    OUT/manifest.json                size and sha256 of every file below, plus what they are
    OUT/source.bundle                git bundle of the pinned upstream commit
    OUT/recipe/ patches/ env/ lock/  the project's data, so `--recipe OUT/recipe/...` deploys it
    OUT/artifacts/sha256/ab/<hash>   the model files, named by content (the cache's layout)
    OUT/wheels/                      wheels for `pip install --no-index --find-links` (see below)

A folder is the default: rsync copies it to a cluster incrementally and resumes.
`--format tar` writes one uncompressed tar (model weights do not compress).

Restoring (`sdrecipe fetch --from-bundle OUT`) trusts nothing in it: paths that
leave the bundle (absolute, `..`, symlinks, tar links or devices) are refused
before anything is written, and every file is checked against the manifest
before use. Then the artifacts are adopted into the local cache, the upstream is
cloned from `source.bundle`, and placement runs with the network forbidden.

Wheels: the bundle carries whatever folders `--wheels DIR` names (the build
stage's wheel download folder; none exist before environments are built).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tarfile
from pathlib import Path

from . import __version__
from .artifacts import (ArtifactLock, artifact_status, expected, fetch_artifacts, fill_cache,
                        open_cache, select)
from .errors import SdrecipeError
from .files import sha256_file
from .placement import ContentMismatch, is_safe_relative, place
from .schema import SHA1_RE, SHA256_RE
from .source import PINNED_REF, ensure_source, git_reason

FORMAT = "sdrecipe-bundle"
VERSION = 1
MANIFEST = "manifest.json"
SOURCE_BUNDLE = "source.bundle"
PROJECT_FOLDERS = ("recipe", "env", "lock")  # plus the recipe's patch folder


# --- create ----------------------------------------------------------------------------

def create_bundle(recipe, deployment, out: Path, config, profiles=None, with_optional=False,
                  wheels=(), fmt="dir") -> Path:
    """Write a bundle for `profiles` (default: all of the recipe's) to `out`, filling the
    site's download cache (`config`: where it is, the mirrors) on the way."""
    out = Path(out)
    if os.path.lexists(out):
        raise SdrecipeError(f"{out} already exists; choose a new name (bundles are not updated "
                            "in place, so a half-written one is never mistaken for complete)")
    missing = [str(folder) for folder in wheels if not Path(folder).is_dir()]
    if missing:
        raise SdrecipeError(f"--wheels: no such folder: {', '.join(missing)}")
    files = _bundle_files(recipe, profiles or list(recipe.profiles), with_optional)
    cache = open_cache(config)
    lock = ArtifactLock.for_recipe(recipe)
    with cache.lock():
        hashes = fill_cache(files, lock, cache, verify=False, offline=False, extra_pins=None,
                            config=config)
    lock.save()
    staging = out.parent / (f".{out.name}.partial" if fmt == "dir" else f".{out.name}.files")
    shutil.rmtree(staging, ignore_errors=True)
    try:  # a failed or interrupted create leaves no staging folder behind
        _fill_staging(recipe, deployment, cache, staging, files, hashes, wheels)
        if fmt == "tar":
            _write_tar(staging, out)
            shutil.rmtree(staging)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _fill_staging(recipe, deployment, cache, staging, files, hashes, wheels) -> None:
    staging.mkdir(parents=True)
    entries: dict[str, dict] = {}
    _add_source(recipe, deployment, cache, staging)
    _add_project(recipe, staging)
    for folder in wheels:
        _copy_tree(Path(folder), staging / "wheels")
    artifacts = {}
    for file in files:
        sha = hashes[file]
        rel = f"artifacts/sha256/{sha[:2]}/{sha}"
        if not (staging / rel).exists():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            cache.place(sha, staging / rel)
        entries[rel] = {"sha256": sha, "size": (staging / rel).stat().st_size}
        artifacts[file.key] = {"sha256": sha, "size": entries[rel]["size"], "place": file.place}
    for path in sorted(staging.rglob("*")):
        rel = path.relative_to(staging).as_posix()
        if path.is_file() and rel not in entries:
            entries[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    manifest = {
        "format": FORMAT, "version": VERSION, "sdrecipe": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.path.resolve().relative_to(recipe.root).as_posix(),
        "upstream": {"commit": recipe.upstream.commit, "bundle": SOURCE_BUNDLE},
        "artifacts": dict(sorted(artifacts.items())),
        "files": dict(sorted(entries.items())),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _bundle_files(recipe, profiles, with_optional):
    seen = {}
    for profile in profiles:
        for file in select(recipe, profile, with_optional):
            seen.setdefault(file.place, file)
    return list(seen.values())


def _add_source(recipe, deployment, cache, staging):
    """A git bundle of the pinned commit, from the deployment's checkout or a cached clone."""
    checkout = deployment.source if (deployment.source / ".git").exists() \
        else cache.root / "source" / recipe.upstream.commit
    repo = ensure_source(recipe, checkout)
    import git
    handle = git.Repo(repo)
    try:
        handle.git.update_ref(PINNED_REF, recipe.upstream.commit)
        handle.git.bundle("create", str(staging / SOURCE_BUNDLE), PINNED_REF)
    except git.GitCommandError as exc:
        raise SdrecipeError(
            f"cannot bundle commit {recipe.upstream.commit[:12]} from {repo}: "
            f"{git_reason(exc)}; the checkout lacks objects (a sparse or partial clone?): "
            "bundle from a complete one (another --deploy-dir), or move it aside so a fresh "
            "clone is made") from exc


def _add_project(recipe, staging):
    root = recipe.root
    folders = list(PROJECT_FOLDERS)
    if recipe.patch_dir.is_dir():
        folders.append(recipe.patch_dir.resolve().relative_to(root).as_posix())
    for name in folders:
        if (root / name).is_dir():
            _copy_tree(root / name, staging / name)


def _copy_tree(src: Path, dest: Path):
    """Copy regular files only (a symlink could point anywhere on the login node)."""
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.is_symlink() and "__pycache__" not in path.parts:
            target = dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _write_tar(staging: Path, out: Path):
    needed = sum(path.stat().st_size for path in staging.rglob("*") if path.is_file())
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        shutil.rmtree(staging)
        raise SdrecipeError(f"{out.parent} has {free / 2**30:.1f} GiB free, the tar needs "
                            f"{needed / 2**30:.1f} GiB: free space, write it elsewhere, or "
                            "use the folder format (it hardlinks from the cache)")
    partial = out.with_name(f".{out.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(staging).as_posix(), recursive=False)
    os.replace(partial, out)


# --- restore ---------------------------------------------------------------------------

def restore(recipe, deployment, bundle: Path, profile: str, verify=False, with_optional=False,
            only=None):
    """Deploy source and artifacts from a bundle, with no network; returns the placements.

    A deployment already complete (checkout present, every stamp valid) does not
    need the bundle: a re-run then neither extracts nor rehashes gigabytes.
    """
    if not verify and (deployment.source / ".git").exists() and all(
            s.state == "done" for s in artifact_status(recipe, deployment, profile,
                                                       with_optional, only)):
        ensure_source(recipe, deployment.source, profile)  # checks the checkout, offline
        return fetch_artifacts(recipe, deployment, profile, with_optional=with_optional,
                               only=only, offline=True)
    folder = open_bundle(Path(bundle), deployment.state / "bundle")
    manifest = verify_bundle(folder)
    commit = manifest["upstream"]["commit"]
    if commit != recipe.upstream.commit:
        raise SdrecipeError(
            f"{bundle} holds upstream commit {commit}, but {recipe.path} pins "
            f"{recipe.upstream.commit}; deploy the bundle's own recipe with "
            f"--recipe {folder / manifest['recipe']}")
    _check_pins(recipe, manifest, bundle, profile, with_optional, only)
    _adopt_artifacts(folder, manifest, bundle)
    ensure_source(recipe, deployment.source, profile, bundle=folder / SOURCE_BUNDLE)
    placed = fetch_artifacts(recipe, deployment, profile, verify=verify,
                             with_optional=with_optional, only=only,
                             extra_pins=manifest["artifacts"], offline=True)
    _record_bundle_pins(recipe, placed, manifest["artifacts"])
    return placed


def _check_pins(recipe, manifest, bundle, profile, with_optional, only) -> None:
    """The bundle's hash of each file the recipe or lock pins must be that pin: a bundle
    vouches only for files this project has no hash of yet."""
    lock = ArtifactLock.for_recipe(recipe)
    for file in select(recipe, profile, with_optional, only):
        pin, _, origin = expected(file, lock)
        offered = manifest["artifacts"].get(file.key, {}).get("sha256")
        if pin and offered and offered != pin:
            where = recipe.path if origin == "recipe" else lock.path
            raise SdrecipeError(f"{bundle}: {file.place} is {offered} in the bundle, but {where} "
                                f"pins {pin}; refusing the bundle (nothing was placed or "
                                "cached): make it again from this recipe")


def _adopt_artifacts(folder, manifest, bundle) -> None:
    """Every artifact the cache lacks, hashed on its way in; one that does not hash to its
    name refuses the whole bundle before any of its files is cached."""
    cache = open_cache()
    staged = []
    with cache.lock():
        try:
            for sha in sorted({entry["sha256"] for entry in manifest["artifacts"].values()}):
                if cache.verified(sha):
                    continue
                rel = f"artifacts/sha256/{sha[:2]}/{sha}"
                incoming = cache.incoming("bundle:" + sha)
                incoming.parent.mkdir(parents=True, exist_ok=True)
                place(folder / rel, incoming)
                staged.append((incoming, sha, sha256_file(incoming)))
                if staged[-1][2] != sha:
                    raise ContentMismatch(
                        f"{bundle}: {rel} hashes to {staged[-1][2]}, not its name: a damaged or "
                        "crafted bundle; refusing it (nothing was placed or cached): copy the "
                        "bundle again, or make it again")
        except BaseException:
            for incoming, _, _ in staged:
                incoming.unlink(missing_ok=True)
            raise
        for incoming, sha, found in staged:
            cache.adopt(incoming, sha, found=found)


def _record_bundle_pins(recipe, placed, pins):
    """Hashes vouched for by the bundle become this project's trust-on-first-use record."""
    lock = ArtifactLock.for_recipe(recipe)
    for item in placed:
        if expected(item.file, lock)[0] is None and item.file.key in pins:
            pin = pins[item.file.key]
            lock.record(item.file.key, pin["size"], pin["sha256"])
    lock.save()


def open_bundle(path: Path, scratch: Path) -> Path:
    """The bundle as a folder: itself, or a tar safely extracted into `scratch`."""
    if path.is_dir():
        return path
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise SdrecipeError(f"{path} is not a bundle (a folder or a tar made by "
                            "`sdrecipe bundle create`)")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        _extract(path, scratch)
    except (tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise SdrecipeError(f"{path}: damaged tar bundle ({exc}); copy it again (or use the "
                            "folder format: rsync resumes it)") from exc
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


def _extract(path: Path, scratch: Path) -> None:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        for member in members:
            if not (member.isfile() or member.isdir()):
                raise SdrecipeError(f"{path}: refusing {member.name!r}: bundles hold only files "
                                    "and folders (no links or devices)")
            if not is_safe_relative(member.name.rstrip("/")):
                raise SdrecipeError(f"{path}: refusing {member.name!r}: it would land outside "
                                    "the extraction folder")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(scratch, members, filter="data")
        else:  # Python without extraction filters: the checks above are the guard
            tar.extractall(scratch, members)


def verify_bundle(folder: Path) -> dict:
    """Check the manifest's shape, then every file it lists, by path, size and sha256. An
    artifact's entry must be its content address (`artifacts/sha256/ab/<its sha256>`); its
    bytes are hashed where they enter the cache (`restore`), once, and only if needed."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SdrecipeError(f"{folder / MANIFEST}: unreadable bundle manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION:
        raise SdrecipeError(f"{folder / MANIFEST}: not a version-{VERSION} sdrecipe bundle")
    problem = _shape_problem(manifest)
    if problem:
        raise SdrecipeError(f"{folder / MANIFEST}: malformed manifest: {problem}; refusing it")
    real_root = folder.resolve()
    listed = manifest["files"]
    for rel, entry in listed.items():
        path = folder / rel
        if (not is_safe_relative(rel) or os.path.islink(path)
                or not path.resolve().is_relative_to(real_root)):
            raise SdrecipeError(f"{folder}: manifest entry {rel!r} leaves the bundle; refusing it")
        if not path.is_file():
            raise SdrecipeError(f"{folder}: {rel} is listed in the manifest but missing; "
                                "copy the bundle again (rsync resumes)")
        if rel.startswith("artifacts/") and rel != f"artifacts/sha256/{entry['sha256'][:2]}/" \
                f"{entry['sha256']}":
            raise SdrecipeError(f"{folder}: {rel} is listed with sha256 {entry['sha256']}, not "
                                "its content address; a crafted bundle: refusing it")
        if path.stat().st_size != entry["size"] or (not rel.startswith("artifacts/")
                                                    and sha256_file(path) != entry["sha256"]):
            raise SdrecipeError(f"{folder}: {rel} does not match its sha256 in the manifest "
                                "(damaged in transfer?); copy the bundle again")
    needed = [SOURCE_BUNDLE] + [f"artifacts/sha256/{a['sha256'][:2]}/{a['sha256']}"
                                for a in manifest["artifacts"].values()]
    unlisted = [rel for rel in needed if rel not in listed]
    if unlisted:
        raise SdrecipeError(f"{folder}: the manifest does not vouch for {', '.join(unlisted)}")
    return manifest


def _shape_problem(manifest: dict) -> str | None:
    """What is wrong with the manifest's structure (hashes, sizes, paths), if anything."""
    def pin_ok(entry):
        return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and SHA256_RE.match(entry["sha256"]) is not None
                and isinstance(entry.get("size"), int) and entry["size"] >= 0)
    upstream, recipe = manifest.get("upstream"), manifest.get("recipe")
    if not (isinstance(upstream, dict) and isinstance(upstream.get("commit"), str)
            and SHA1_RE.match(upstream["commit"])):
        return "upstream.commit is not a 40-hex commit"
    if not (isinstance(recipe, str) and is_safe_relative(recipe)):
        return "recipe is not a relative path inside the bundle"
    for section in ("files", "artifacts"):
        entries = manifest.get(section)
        if not isinstance(entries, dict):
            return f"{section} is not a mapping"
        bad = [key for key, entry in entries.items() if not pin_ok(entry)]
        if bad:
            return f"{section} entry {bad[0]!r} lacks a 64-hex sha256 or a byte size"
    return None

