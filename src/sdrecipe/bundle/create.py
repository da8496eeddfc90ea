"""`bundle create`: gather the items (contents.py), write them beside the old bundle, swap.

A folder bundle made again (after a lock change, say) reuses every file of the old one
whose path and sha256 are unchanged, as a hardlink: same inode, same mtime, so rsync
sends only what changed. A failed or interrupted create leaves the old bundle whole.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import SdrecipeError
from ..files import sha256_file
from ..progress import Task
from . import contents
from .manifest import FORMAT, MANIFEST, SOURCE_BUNDLE, SOURCE_CHECKOUT, VERSION


@dataclass
class Written:
    """What a create wrote: per section, files and bytes; and how many were reused."""
    path: Path
    sections: dict = field(default_factory=dict)  # section -> [files, bytes]
    hashes: dict = field(default_factory=dict)  # path in the bundle -> sha256
    reused: int = 0
    rewritten: int = 0

    @property
    def size(self) -> int:
        return sum(size for _, size in self.sections.values())

    def count(self, section: str, size: int) -> None:
        files, total = self.sections.get(section, (0, 0))
        self.sections[section] = (files + 1, total + size)


def create_bundle(recipe, deployment, out: Path, config, profiles=None, with_optional=False,
                  smoke=False, fmt="dir", local=None) -> Written:
    """Write a bundle serving `profiles` (default: all of the recipe's) to `out`, filling
    the site's caches on the way; `smoke`: no model files (a smoke deploy makes its own)."""
    out = Path(out).absolute()
    previous = _previous(out, fmt)
    profiles = profiles or list(recipe.profiles)
    for profile in profiles:
        recipe.profile(profile)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="sdrecipe-bundle-") as work:
        items, artifacts = ([], {}) if smoke else contents.artifact_items(
            recipe, profiles, with_optional, config)
        for profile in profiles:
            items += contents.package_items(recipe, profile, config)
        items += contents.source_items(recipe, deployment, config, local)
        items += contents.project_items(recipe)
        items += contents.engine_items(Path(work))
        unique: dict = {}
        for item in items:  # a file two profiles share goes in once
            unique.setdefault(item.rel, item)
        items = list(unique.values())
        try:  # a failed or interrupted create leaves no staging folder behind
            written = _fill(staging, items, previous, out)
            _write_manifest(staging, recipe, profiles, smoke, items, artifacts, written)
            if fmt == "tar":
                _write_tar(staging, out)
                shutil.rmtree(staging)
            else:
                _swap(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return written


def _previous(out: Path, fmt: str) -> dict:
    """The files of the bundle at `out` (or of one a killed swap left aside), by path ->
    sha256; empty when there is none. Anything else at `out` is refused, not replaced."""
    aside = _aside(out)
    folder = out if out.is_dir() else aside if aside.is_dir() else None
    if fmt == "tar":
        if out.exists() and not tarfile.is_tarfile(out):
            raise SdrecipeError(f"{out} exists and is not a tar bundle; choose a new name")
        return {}
    if os.path.lexists(out) and not out.is_dir():
        raise SdrecipeError(f"{out} exists and is not a bundle folder; choose a new name")
    if folder is None:
        return {}
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"] if manifest.get("format") == FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if not isinstance(files, dict):
        if folder == out and any(out.iterdir()):
            raise SdrecipeError(f"{out} exists and is not a bundle (no readable {MANIFEST}); "
                                "choose a new name")
        return {}
    return {rel: (folder / rel, entry.get("sha256")) for rel, entry in files.items()
            if isinstance(entry, dict)}


def _aside(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _fill(staging: Path, items, previous: dict, out: Path) -> Written:
    written = Written(out)
    staging.mkdir(parents=True)
    with Task(f"writing the bundle {out.name}", total=len(items)) as task:
        for item in items:
            dest = staging / item.rel
            sha = item.sha256 or sha256_file(item.path)
            old, old_sha = previous.get(item.rel, (None, None))
            if old_sha == sha and old.is_file():
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.link(old, dest)  # the same inode: rsync sees nothing to send
                written.reused += 1
            else:
                item.write(dest)
                written.rewritten += 1
            written.count(item.section, dest.stat().st_size)
            written.hashes[item.rel] = sha
            task.advance()
    return written


def _write_manifest(staging, recipe, profiles, smoke, items, artifacts, written) -> None:
    files = {item.rel: {"sha256": written.hashes[item.rel],
                        "size": (staging / item.rel).stat().st_size} for item in items}
    manifest = {
        "format": FORMAT, "version": VERSION, "sdrecipe": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.path.resolve().relative_to(recipe.root).as_posix(),
        "profiles": list(profiles), "smoke": smoke,
        "upstream": {"commit": recipe.upstream.commit,
                     "source": SOURCE_BUNDLE if SOURCE_BUNDLE in files else SOURCE_CHECKOUT},
        "engine": {"python": (staging / "engine" / "python-version").read_text().strip()},
        "contents": {section: {"files": n, "bytes": size}
                     for section, (n, size) in sorted(written.sections.items())},
        "artifacts": artifacts,
        "files": dict(sorted(files.items())),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _swap(staging: Path, out: Path) -> None:
    """The new bundle in, the old one out. Killed in between, the old one waits aside,
    and the next create reuses its files from there."""
    aside = _aside(out)
    if out.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(out, aside)
    os.replace(staging, out)
    shutil.rmtree(aside, ignore_errors=True)


def _write_tar(staging: Path, out: Path):
    needed = sum(path.stat().st_size for path in staging.rglob("*") if path.is_file())
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise SdrecipeError(f"{out.parent} has {free / 2**30:.1f} GiB free, the tar needs "
                            f"{needed / 2**30:.1f} GiB: free space, write it elsewhere, or "
                            "use the folder format (it hardlinks from the cache)")
    partial = out.with_name(f".{out.name}.partial.tar")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(staging).as_posix(), recursive=False)
    os.replace(partial, out)
