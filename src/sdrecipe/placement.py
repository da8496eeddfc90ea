"""Bytes stored once: the content-addressed cache, and placing its files into deployments.

The cache keeps each file under its sha256 (`<cache>/sha256/ab/abcdef...`), so a
second deployment, or a second recipe naming the same bytes, reuses them. Cache
files are read-only: a placed hardlink shares the inode, and writing to it would
change the cache too.

Content addressing is enforced where bytes enter the store: `adopt` hashes a
file (or takes the hash the downloader computed while writing it) and refuses it
unless it equals the name it would be stored under. Each entry then gets a stamp
(`<cache>/stamps/ab/<hash>.json`: size, mtime_ns, ctime_ns, inode, device); an
entry found by name is trusted only while its stamp matches, else it is rehashed
(and quarantined if wrong). ctime is the kernel's: any write, chmod or new link
moves it and no user call can set it back, so `dd conv=notrunc` + `touch -r`
cannot hide a change.

Placement is a hardlink (0 bytes copied), else a reflink (copy-on-write clone),
else a copy (after checking the free space), always written under a temporary
name and renamed into place, so a target is either the old file or the complete
new one. A stamp beside the deployment's state records the same fields at
placement; a later run trusts a matching stamp instead of re-reading gigabytes.

Quarantine keeps the newest `quarantine_keep` bad copies per file (default 1);
`garbage` lists what `sdrecipe cache gc` removes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath

from filelock import FileLock

from .errors import SdrecipeError
from .files import atomic_write_text, human_size, sha256_file

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
READ_ONLY = 0o444
STAMP_FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


class ContentMismatch(SdrecipeError):
    """Bytes that do not hash to the name they were to be stored or used under."""


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

    def __init__(self, root, quarantine_keep: int = 1):
        self.root = Path(root).expanduser()
        self.quarantine_keep = quarantine_keep

    def path(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def stamp_path(self, sha256: str) -> Path:
        return self.root / "stamps" / sha256[:2] / f"{sha256}.json"

    def has(self, sha256: str) -> bool:
        """A file is stored under that name (not that its bytes are right: see `verified`)."""
        return self.path(sha256).is_file()

    def incoming(self, key: str) -> Path:
        """Where a file of not-yet-known hash downloads (stable, so `.part` resumes)."""
        return self.root / "incoming" / hashlib.sha256(key.encode()).hexdigest()[:32]

    def lock(self) -> FileLock:
        """Serialises fetches sharing this cache (the second waits, then finds the bytes)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / ".lock"))

    def register(self, deployment_root: Path) -> None:
        """Remember a deployment placing from this cache: `cache gc` keeps what it uses."""
        root = str(Path(deployment_root).resolve())
        entry = self.root / "deployments" / f"{hashlib.sha256(root.encode()).hexdigest()[:24]}.json"
        if not entry.is_file():
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(entry, json.dumps({"root": root}) + "\n")

    def deployments(self) -> dict[Path, Path]:
        """Registered deployment roots -> their registration files."""
        found = {}
        for entry in sorted(self.root.glob("deployments/*.json")):
            data = read_stamp(entry) or {}
            if isinstance(data.get("root"), str):
                found[Path(data["root"])] = entry
        return found

    def verified(self, sha256: str, rehash: bool = False) -> bool:
        """The store holds bytes that hash to `sha256`: its adoption stamp still matches, or
        (no stamp, a stamp that differs, or `rehash`) they were hashed now and re-stamped.
        An entry whose bytes are wrong is quarantined."""
        if not self.has(sha256):
            return False
        if not rehash and self._stamp_holds(sha256):
            return True
        if sha256_file(self.path(sha256)) == sha256:
            self._stamp(sha256)
            return True
        self.quarantine(sha256)
        return False

    def adopt(self, file: Path, sha256: str, found: str | None = None, origin: str = "") -> Path:
        """Move `file` into the store under `sha256`, read-only, only if its bytes hash to it.
        `found`: their sha256 computed while writing them (the downloader's one pass);
        else they are hashed here. A refused file is deleted; nothing is stored."""
        found = found or sha256_file(file)
        if found != sha256:
            Path(file).unlink(missing_ok=True)
            raise ContentMismatch(f"refusing {origin or file}: its bytes hash to {found}, not "
                                  f"{sha256}, the name it was to be stored under; nothing was "
                                  "cached")
        final = self.path(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(file, READ_ONLY)
        os.replace(file, final)
        self._stamp(sha256)
        return final

    def seal(self, sha256: str) -> Path:
        """Make a store file the downloader wrote read-only and stamp it (it renames a file
        under its pinned name only after its one-pass sha256 matched)."""
        final = self.path(sha256)
        if final.stat().st_mode & 0o777 != READ_ONLY:
            os.chmod(final, READ_ONLY)
        self._stamp(sha256)
        return final

    def place(self, sha256: str, target: Path) -> str:
        """`place` a verified entry at `target`; a hardlink moves the entry's ctime, so a
        stamp that held before it is renewed."""
        held = self._stamp_holds(sha256)
        method = place(self.path(sha256), target)
        if held:
            self._stamp(sha256)
        return method

    def quarantine(self, sha256: str) -> Path:
        """Move a store file whose bytes no longer match its name out of the way."""
        bad = self.root / "quarantine" / f"{sha256}.bad-{time.time_ns()}"
        bad.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(sha256), bad)
        self.stamp_path(sha256).unlink(missing_ok=True)
        self.trim_quarantine()
        return bad

    def trim_quarantine(self) -> list[Path]:
        """Keep the newest `quarantine_keep` bad copies of each file; returns those removed."""
        excess = [path for path, _, _ in self.quarantine_excess()]
        for path in excess:
            path.unlink(missing_ok=True)
        return excess

    def quarantine_excess(self) -> list[tuple[Path, int, str]]:
        """Quarantined copies beyond the cap: (path, size, why). Grouped by the file they
        were to be (the name before the first '.'), newest by ctime (the move) first."""
        folder = self.root / "quarantine"
        groups: dict[str, list] = {}
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.is_file() and not path.name.endswith(".lock"):
                groups.setdefault(path.name.split(".")[0], []).append((path, path.stat()))
        excess = []
        for copies in groups.values():
            copies.sort(key=lambda item: item[1].st_ctime_ns, reverse=True)
            excess += [(path, st.st_size, f"quarantined copy beyond the newest "
                        f"{self.quarantine_keep}") for path, st in copies[self.quarantine_keep:]]
        return excess

    def garbage(self, referenced: set) -> list[tuple[Path, int, str]]:
        """What `cache gc` removes: entries no deployment references (but none still
        hardlinked elsewhere: removing those frees nothing) and quarantine beyond the cap."""
        found = []
        for entry in sorted(self.root.glob("sha256/*/*")):
            if not _SHA256_NAME.fullmatch(entry.name):
                continue  # the downloader's lock files
            st = entry.stat()
            if entry.name not in referenced and st.st_nlink == 1:
                found.append((entry, st.st_size, "referenced by no deployment"))
        return found + self.quarantine_excess()

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if path.parent.parent == self.root / "sha256":
            self.stamp_path(path.name).unlink(missing_ok=True)

    def _stamp(self, sha256: str) -> None:
        path = self.stamp_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(stat_fields(self.path(sha256))) + "\n")

    def _stamp_holds(self, sha256: str) -> bool:
        stamp = read_stamp(self.stamp_path(sha256))
        return stamp is not None and stamp_differs(stamp, self.path(sha256), STAMP_FIELDS) is None


def stat_fields(path: Path) -> dict:
    st = os.lstat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "ino": st.st_ino, "dev": st.st_dev}


def place(src: Path, target: Path, link: bool = True) -> str:
    """Put `src`'s bytes at `target` atomically; returns hardlink, reflink or copy. Nothing
    half-written stays behind on failure. `link=False`: never a hardlink, which would move
    `src`'s ctime (uv, for one, takes a local wheel whose ctime moved for a new one)."""
    tmp = target.with_name(f".{target.name}.sdrecipe-tmp")
    try:
        if os.path.lexists(tmp):
            tmp.unlink()
        try:
            if not link:
                raise OSError(errno.EXDEV, "no hardlink asked for")
            os.link(src, tmp)
            method = "hardlink"
        except OSError:
            method = _clone_or_copy(src, tmp, target)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return method


def _clone_or_copy(src: Path, tmp: Path, target: Path) -> str:
    try:
        with open(src, "rb") as source, open(tmp, "wb") as clone:
            fcntl.ioctl(clone.fileno(), FICLONE, source.fileno())
        method = "reflink"
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                             errno.ENOSYS, errno.EPERM, errno.EBADF):
            raise
        _copy(src, tmp, target)
        method = "copy"
    os.chmod(tmp, READ_ONLY)
    return method


def _copy(src: Path, tmp: Path, target: Path) -> None:
    """A full copy, once the target's filesystem is known to have room for it."""
    needed, free = src.stat().st_size, shutil.disk_usage(tmp.parent).free
    advice = ("free some space, or keep the deployment on the cache's filesystem (then files "
              "are hardlinked: 0 bytes copied)")
    if needed > free:
        raise SdrecipeError(f"not enough space in {tmp.parent} to copy {target.name} there: "
                            f"{human_size(needed)} needed, {human_size(free)} free; {advice}")
    try:
        shutil.copyfile(src, tmp)  # sendfile/copy_file_range under the hood
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise SdrecipeError(f"no space left in {tmp.parent} while copying {target.name} there; "
                            f"{advice}") from exc


def write_stamp(stamp: Path, target: Path, sha256: str, method: str, key: str) -> None:
    record = {"sha256": sha256, **stat_fields(target), "method": method, "source": key}
    stamp.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, json.dumps(record, indent=1) + "\n")


def read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None


def stamp_differs(stamp: dict, target: Path, fields=("size", "mtime_ns", "ino", "dev")) -> str | None:
    """Why `target` is not the file the stamp recorded, or None if it still is. The default
    `fields` are what a status needs; proving bytes before use adds ctime (STAMP_FIELDS)."""
    try:
        now = stat_fields(target)
    except FileNotFoundError:
        return "not placed"
    if not os.path.isfile(target) or os.path.islink(target):
        return "not a regular file"
    for field in fields:
        if stamp.get(field) != now[field]:
            return f"changed since placed ({field} differs)"
    return None
