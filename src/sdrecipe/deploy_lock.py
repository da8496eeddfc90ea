"""One lock per deployment: runs that change a deployment take turns, and say who they wait for.

`fetch`, `deploy`, `env build`, `verify` and `fetch --from-bundle` hold
`<deploy>/.sdrecipe/deploy.lock` (filelock: released by the kernel when the
holder dies, so a kill -9 leaves no stale lock) for their whole run, taken before
anything else is created in the deployment. Beside it, `deploy.lock.holder` names
the holder's pid and command, so a second run says one line, `waiting for pid N
(sdrecipe deploy) holding <lock>`, then continues on what the first left (a
finished stage is a no-op). A deployment that cannot be written to is a one-line
error pointing to `--deploy-dir` (or `verify --out`, which needs no lock there).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import SdrecipeError
from .files import atomic_write_text

LOCK_NAME = "deploy.lock"
HOLDER_SUFFIX = ".holder"
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
log = logging.getLogger("sdrecipe.deploy_lock")


def unwritable(deployment, exc: OSError) -> SdrecipeError:
    """The one-line error for a deployment this run cannot write to."""
    where = exc.filename or deployment.root
    return SdrecipeError(f"cannot write to the deployment {deployment.root}: {where}: "
                         f"{exc.strerror or exc}; make it writable, or choose another "
                         "--deploy-dir (a report alone can go elsewhere: verify --out DIR)")


def _holder(lock_file: str, patience_s: float = 1.0) -> str:
    """Who holds the lock; the holder writes its name just after taking it, so wait a moment
    for a name not written yet."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            with open(lock_file + HOLDER_SUFFIX, encoding="utf-8") as handle:
                data = json.load(handle)
            return f"pid {int(data['pid'])} ({data['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "another sdrecipe run"
            time.sleep(0.05)


@contextlib.contextmanager
def deployment_lock(deployment, command: str, read_only_ok: bool = False):
    """Hold the deployment's lock for the block; `command` names this run to a waiting one.
    `read_only_ok`: a deployment nobody can write to needs no lock (verify --out DIR)."""
    lock_file = str(deployment.state / LOCK_NAME)
    try:
        deployment.state.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_file)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for %s holding %s", _holder(lock_file), lock_file)
            lock.acquire()
    except OSError as exc:
        if read_only_ok and exc.errno in READ_ONLY:
            log.debug("%s cannot be written (%s): running without its lock", deployment.root, exc)
            yield
            return
        raise unwritable(deployment, exc) from exc
    holder = lock_file + HOLDER_SUFFIX
    try:
        atomic_write_text(Path(holder), json.dumps({"pid": os.getpid(), "command": command}))
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(holder)
        lock.release()
