"""File primitives every stage shares: a streamed sha256, and atomic writes.

An atomic write goes to a unique temporary file in the target's folder (so two
writers never share a temp name, and the rename never crosses filesystems), is
fsynced, then renamed over the target: a reader, or a run after a crash, sees
the old file or the complete new one, never half of it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

_CHUNK = 8 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """The file's digest (a hashlib name), read in chunks: model files are gigabytes."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Replace `path` by `data` all at once; `mode` is filtered by the umask, as open() does."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode & ~_umask())
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, mode: int = 0o666) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def human_size(n: int) -> str:
    """A byte count as people read it: 1.5 GiB, 830.2 MiB, 12 bytes."""
    return next(f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} bytes" for scale, unit in
                ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "bytes")) if n >= scale or scale == 1)
