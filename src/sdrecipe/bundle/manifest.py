"""A bundle's manifest, and the checks every reader of a bundle goes through first.

Nothing in a bundle is trusted: paths that leave it (absolute, `..`, symlinks, tar
links or devices) are refused before anything is written, and every file is checked
against the manifest by size, and by sha256 either here (small files) or where it
enters a cache (model files and packages, named by their hash: hashed once, there).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

from ..errors import SdrecipeError
from ..files import sha256_file
from ..placement import is_safe_relative
from ..schema import SHA1_RE, SHA256_RE

FORMAT = "sdrecipe-bundle"
VERSION = 2
MANIFEST = "manifest.json"
SOURCE_BUNDLE = "source.bundle"  # a git bundle of the pinned commit
SOURCE_CHECKOUT = "source"  # or a copy of a checkout, where git cannot bundle it
# Large files named by content: their bytes are hashed where they enter a cache, not here.
HASHED_ON_ADOPTION = ("artifacts/", "packages/")


def artifact_path(sha256: str) -> str:
    return f"artifacts/sha256/{sha256[:2]}/{sha256}"


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


def read_manifest(folder: Path) -> dict:
    """The manifest of a bundle `verify_bundle` has already checked."""
    return json.loads((folder / MANIFEST).read_text())


def verify_bundle(folder: Path) -> dict:
    """Check the manifest's shape, then every file it lists, by path and size, and the
    small ones by sha256. A file named by content (`artifacts/sha256/ab/<sha256>`,
    `packages/pip/<sha256>/<file>`) must be listed with that hash; its bytes are hashed
    where they enter a cache (`restore.py`), once, and only if needed."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SdrecipeError(f"{folder / MANIFEST}: unreadable bundle manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("version") != VERSION:
        raise SdrecipeError(f"{folder / MANIFEST}: not a version-{VERSION} sdrecipe bundle; "
                            "make it again with this sdrecipe (bundle create)")
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
        named = _content_name(rel)
        if named and named != entry["sha256"]:
            raise SdrecipeError(f"{folder}: {rel} is listed with sha256 {entry['sha256']}, not "
                                "its content address; a crafted bundle: refusing it")
        if path.stat().st_size != entry["size"] or (not rel.startswith(HASHED_ON_ADOPTION)
                                                    and sha256_file(path) != entry["sha256"]):
            raise SdrecipeError(f"{folder}: {rel} does not match its sha256 in the manifest "
                                "(damaged in transfer?); copy the bundle again")
    source = manifest["upstream"]["source"]
    needed = [source if source == SOURCE_BUNDLE else f"{source}/.git/HEAD"] + [
        artifact_path(a["sha256"]) for a in manifest["artifacts"].values()]
    unlisted = [rel for rel in needed if rel not in listed]
    if unlisted:
        raise SdrecipeError(f"{folder}: the manifest does not vouch for {', '.join(unlisted)}")
    return manifest


def _content_name(rel: str) -> str | None:
    """The sha256 a path names its file by, where it does."""
    parts = rel.split("/")
    if parts[:2] == ["artifacts", "sha256"] and len(parts) == 4:
        return parts[3]
    if parts[:2] == ["packages", "pip"] and len(parts) == 4:
        return parts[2]
    return None


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
    if upstream.get("source") not in (SOURCE_BUNDLE, SOURCE_CHECKOUT):
        return f"upstream.source is neither {SOURCE_BUNDLE} nor {SOURCE_CHECKOUT}"
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

