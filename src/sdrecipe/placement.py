"""Bytes stored once: the content-addressed cache, and placing its files into deployments.

The cache keeps each file under its sha256 (`<cache>/sha256/ab/abcdef...`), so a
second deployment, or a second recipe naming the same bytes, reuses them. Cache
files are read-only: a placed hardlink shares the inode, and writing to it would
change the cache too.

Placement is a hardlink (0 bytes copied), else a reflink (copy-on-write clone),
else a copy, always written under a temporary name and renamed into place, so a
target is either the old file or the complete new one. A stamp beside the
deployment's state records size, mtime, inode and device at placement; a later
run trusts a matching stamp instead of re-reading gigabytes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path, PurePosixPath

from filelock import FileLock

from .errors import SdrecipeError
from .files import atomic_write_text

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
READ_ONLY = 0o444


def is_safe_relative(rel: str) -> bool:
    """A relative POSIX path with no `..`, `.` or empty parts, and no leading `/`."""
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def contained(root: Path, rel: str, create: bool = False) -> Path:
    """`root/rel`, refusing a path that leaves `root` by `..`, `/` or a symlink on the way.

    With `create`, the folders on the way are made; a symlinked folder that points
    outside `root` is refused before anything is created behind it. `root` itself
    may be a symlink (a site may keep models on another filesystem).
    """
    if not is_safe_relative(rel):
        raise SdrecipeError(f"refusing path {rel!r}: it must stay inside {root}")
    if create:
        root.mkdir(parents=True, exist_ok=True)
    real_root = root.resolve()
    target = root.joinpath(*PurePosixPath(rel).parts)
    folder = root
    for part in PurePosixPath(rel).parts[:-1]:
        folder = folder / part
        if os.path.lexists(folder) and not folder.resolve().is_relative_to(real_root):
            raise SdrecipeError(f"refusing {target}: {folder} is a link to "
                                f"{folder.resolve()}, outside {real_root}")
        if create:
            folder.mkdir(exist_ok=True)
    return target


class Cache:
    """The content-addressed store under `cache_dir`."""

    def __init__(self, root):
        self.root = Path(root).expanduser()

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def incoming(self, key: str) -> Path:
        """Where a file of not-yet-known hash downloads (stable, so `.part` resumes)."""
        return self.root / "incoming" / hashlib.sha256(key.encode()).hexdigest()[:32]

    def lock(self) -> FileLock:
        """Serialises fetches sharing this cache (the second waits, then finds the bytes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    def adopt(self, file: Path, sha256: str) -> Path:
        """Move a verified file into the store under its hash, read-only."""
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(file, READ_ONLY)
        os.replace(file, final)
        return final

    def seal(self, sha256: str) -> Path:
        """Make a store file read-only (the downloader writes it with default mode)."""
        final = self.path(sha256)
        if final.stat().st_mode & 0o777 != READ_ONLY:
            os.chmod(final, READ_ONLY)
        return final

    def quarantine(self, sha256: str) -> Path:
        """Move a store file whose bytes no longer match its name out of the way."""
        bad = self.root / "quarantine" / f"{sha256}.{time.time_ns()}"
        bad.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(sha256), bad)
        return bad


def place(src: Path, target: Path) -> str:
    """Put `src`'s bytes at `target` atomically; returns hardlink, reflink or copy."""
    tmp = target.with_name(f".{target.name}.sdrecipe-tmp")
    if os.path.lexists(tmp):
        tmp.unlink()
    try:
        os.link(src, tmp)
        method = "hardlink"
    except OSError:
        method = _clone_or_copy(src, tmp)
    os.replace(tmp, target)
    return method


def _clone_or_copy(src: Path, tmp: Path) -> str:
    try:
        with open(src, "rb") as source, open(tmp, "wb") as clone:
            fcntl.ioctl(clone.fileno(), FICLONE, source.fileno())
        method = "reflink"
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                             errno.ENOSYS, errno.EPERM, errno.EBADF):
            tmp.unlink(missing_ok=True)
            raise
        shutil.copyfile(src, tmp)  # sendfile/copy_file_range under the hood
        method = "copy"
    os.chmod(tmp, READ_ONLY)
    return method


def write_stamp(stamp: Path, target: Path, sha256: str, method: str, key: str) -> None:
    st = target.stat()
    record = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "ino": st.st_ino, "dev": st.st_dev, "method": method, "source": key}
    stamp.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(record, indent=1) + "\n")


def read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def stamp_differs(stamp: dict, target: Path) -> str | None:
    """Why `target` is not the file the stamp recorded, or None if it still is."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return "not placed"
    if not os.path.isfile(target) or os.path.islink(target):
        return "not a regular file"
    for field, now in (("size", st.st_size), ("mtime_ns", st.st_mtime_ns),
                       ("ino", st.st_ino), ("dev", st.st_dev)):
        if stamp.get(field) != now:
            return f"changed since placed ({field} differs)"
    return None
