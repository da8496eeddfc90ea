"""One downloader for every URL: endpoint fallback, resume, retries, one-pass sha256.

Interface (the `artifacts` stage and anything else that downloads uses only this):

    downloads = [Download(urls=hf_resolve_urls(endpoints_from(config, mirrors),
                                               "CompVis/stable-diffusion-v-1-4-original",
                                               "<commit sha>", "sd-v1-4.ckpt"),
                          dest=cache / "sd-v1-4.ckpt", sha256="fe4e...", size=4265380512,
                          gated=True, label="sd-v1-4.ckpt")]
    results = Transfer.from_config(config).fetch(downloads)   # -> [Result(dest, sha256, size, url)]

- `Transfer(ca_bundle=None, token=None, retries=4, timeout=30.0, jobs=4,
  progress=None, backoff=1.0, quarantine_dir=None, connections=8, per_host=8,
  segment_threshold=64 MiB, piece_size=16 MiB)`: `token=None` looks one up
  with `resolve_token()`, `""` means none; `timeout` is per connect and per read;
  `progress=None` reports per-file and total tasks through `progress.py` (the CLI
  draws bars with speed and ETA on a terminal), `False` nothing; `from_config(config,
  **overrides)` takes the CA bundle and the connection counts from the site config.
- `Download.urls` are candidates tried in order (mirrors first, huggingface.co
  last). `sha256=None` is trust on first use: the hash is computed while
  downloading and returned for the caller to record. `size=None` likewise.
- `fetch` downloads up to `jobs` files at once and returns results in input
  order. Failures are collected across all files and raised together as one
  `TransferError` (its `.failures` are `DownloadError`s, its `.results` the files
  that did arrive). Free disk space is checked for all files before any byte is
  fetched (`DiskSpaceError`).

How one file arrives:
- A file pinned by size and sha256 and larger than `segment_threshold` comes as byte
  ranges (pieces of `piece_size`, in file order) over `connections` parallel
  connections (`_Segmented`): mirrors and proxies cap each connection well below the
  link. The part is preallocated and each piece written at its offset; the sidecar
  lists the ranges on disk, so a resume after a cut, a kill or a reboot asks only for
  the missing ones; one thread hashes the contiguous prefix in order as it grows, so
  the sha256 is ready moments after the last byte. A failing piece retries alone. A
  server answering a ranged request with 200 is remembered and served over one
  connection. At most `per_host` connections go to one endpoint at once, all files
  together. Smaller or unpinned files, and `connections=1`, take one stream:
- The body streams into `<dest>.part` in 1 MiB chunks (memory stays flat at any
  size), hashed as it is written: one pass, never a second read. A sidecar
  `<dest>.part.json` records the URL, ETag/Last-Modified and expected sha256, so a
  later run (or the next retry) resumes with `Range: bytes=N-` and `If-Range`;
  the existing part is hashed once, then the rest is appended. A server that
  answers 200 instead of 206 (the file changed, or no range support) restarts
  the part from zero, so a changed remote file is never spliced.
- Only after size and sha256 match is the part renamed atomically onto `dest`.
  A mismatch moves the part to quarantine (`<dest>.bad-<time>` or the
  `quarantine_dir`), and the next endpoint is tried; the error names the URL and
  both hashes. No fsync before the rename: the pinned hash (and the artifacts
  stamps) catch a file torn by a power loss, and an fsync of gigabytes would
  double the wall time.
- 5xx, 429, timeouts and dropped connections are retried with exponential
  backoff, at most `retries` times without progress (an attempt that advanced
  the part does not use up a retry). 404 and other 4xx move on to the next
  endpoint at once. 401/403 on a gated file says how to get access. A name that
  does not resolve or a refused connection is not retried: that endpoint is skipped
  by every download of the run, and if no endpoint answered at all, one
  `UnreachableError` names them and the ways forward (a mirror, a bundle, smoke).
- TLS is verified always. The CA bundle is `ca_bundle` (config `ca_bundle` /
  `SDRECIPE_CA_BUNDLE`), else `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` or
  `SSL_CERT_FILE`, else certifi's. There is no switch to turn verification off.
- The token (`resolve_token()`: `HF_TOKEN`, else the token file that
  `huggingface-cli login` writes) goes only to downloads marked `gated`, and
  never to another host after a redirect (HF redirects to a CDN; pieces go to the
  redirect's target without it). It travels only over TLS or to loopback: a gated
  download with a plain-http remote URL is refused before any connection. It is
  redacted from every message and log line.
- `<dest>.lock` keeps two processes that share a cache from writing one part at
  once (the second waits, and says so). A complete part left by a run killed
  before its rename is verified and renamed, not fetched again.
- A full disk (ENOSPC, or EDQUOT on a quota'd cluster filesystem) stops with
  `DiskSpaceError`; the part stays for the next run to resume, `dest` is never
  touched.

Why requests: it follows redirects and strips Authorization when the host
changes, honours the proxy variables (`HTTPS_PROXY`, `NO_PROXY`) that cluster
login nodes rely on, and streams from urllib3 in 1 MiB reads with one copy out
of the socket, so the Python layer costs little: the benchmark (benchmarks/README.md)
measures fetch+verify against `curl -o`. httpx would add h11's pure-Python
parsing; bare urllib3 would need proxy and redirect handling written by hand.
The token lookup is implemented here (a few lines, same order as
huggingface_hub 2.x's `get_token()`) rather than pulling in huggingface_hub and
its dependencies for it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import queue
import random
import re
import shutil
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import filelock
import requests
import urllib3.exceptions

from .errors import SdrecipeError
from .progress import Reporter, reporter

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20
HASH_BACKLOG = 8  # chunks written but not yet hashed, at most (8 MiB)
HASH_READ = 4 << 20  # the segmented hash reads the prefix back in 4 MiB blocks
MAX_BACKOFF = 30.0
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
GATED_HINT = ("this repo is gated: accept its license on huggingface.co and set HF_TOKEN "
              "or run `huggingface-cli login`")


# --- errors --------------------------------------------------------------------------------
class DownloadError(SdrecipeError):
    """One file could not be fetched from any of its URLs; `attempts` says why, per URL."""

    def __init__(self, download: "Download", summary: str, attempts: list[str],
                 unreachable: dict[str, str] | None = None):
        self.download, self.attempts = download, attempts
        self.unreachable = unreachable or {}  # endpoint -> why, when no URL could be reached
        lines = [f"{download.label}: {summary}"] + [f"  {a}" for a in attempts]
        super().__init__("\n".join(lines))


class GatedError(DownloadError):
    """401/403 on a gated file: no token, or a token without access."""


class IntegrityError(DownloadError):
    """Every URL served bytes whose size or sha256 did not match."""


class DiskSpaceError(SdrecipeError):
    """Not enough free space for the downloads (checked first), or the disk filled up."""


class TransferError(SdrecipeError):
    """Some files failed; all failures at once, plus the files that did arrive."""

    def __init__(self, failures: list[SdrecipeError], results: list["Result"], total: int,
                 message: str | None = None):
        self.failures, self.results = failures, results
        head = f"{len(failures)} of {total} downloads failed:"
        super().__init__(message or "\n".join([head] + [str(f) for f in failures]))


class UnreachableError(TransferError):
    """No endpoint could be reached at all (names that do not resolve, refused connections):
    one error with the ways forward instead of a page of per-file failures."""

    def __init__(self, failures, results, total: int, endpoints: dict[str, str]):
        tried = ", ".join(f"{where} ({why})" for where, why in endpoints.items())
        super().__init__(failures, results, total, message=(
            f"cannot reach any download endpoint ({tried}); {len(failures)} of {total} "
            "downloads failed. Ways forward: HF_ENDPOINT=<mirror> (or config hf_endpoints) "
            "for a mirror this node reaches; `sdrecipe fetch --from-bundle BUNDLE` with a "
            "bundle made where the Hub is reachable; or `sdrecipe deploy --smoke`, which "
            "downloads no model"))


# --- what to fetch, what arrived ------------------------------------------------------------
@dataclass(frozen=True)
class Download:
    urls: tuple[str, ...]
    dest: Path
    sha256: str | None = None
    size: int | None = None
    gated: bool = False
    label: str = ""

    def __post_init__(self):
        object.__setattr__(self, "urls", tuple(self.urls))
        object.__setattr__(self, "dest", Path(self.dest))
        object.__setattr__(self, "label", self.label or self.dest.name)
        if not self.urls:
            raise SdrecipeError(f"{self.label}: no URL to download from")
        if self.sha256 is not None:
            object.__setattr__(self, "sha256", self.sha256.lower())
            if not SHA256_RE.match(self.sha256):
                raise SdrecipeError(f"{self.label}: sha256 {self.sha256!r} is not 64 hex digits")

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")


@dataclass(frozen=True)
class Result:
    dest: Path
    sha256: str
    size: int
    url: str  # the candidate URL that served it (before redirects)


# --- endpoints, token, CA bundle ---------------------------------------------------------------
def hf_resolve_urls(endpoints, repo: str, revision: str, path: str) -> list[str]:
    """`{endpoint}/{repo}/resolve/{revision}/{path}` for each endpoint, in order."""
    tail = f"{repo}/resolve/{quote(revision, safe='')}/{quote(path)}"
    return [f"{endpoint.rstrip('/')}/{tail}" for endpoint in endpoints]


def endpoints_from(config=None, mirrors=()) -> list[str]:
    """Hugging Face endpoints in the order to try: `HF_ENDPOINT` / config `hf_endpoints`
    (a comma list in the variable), then the recipe's `mirrors`, then huggingface.co unless
    config `hf_hub_fallback` ($SDRECIPE_HF_HUB_FALLBACK) is off."""
    if config is None:
        from .config import load_config
        config = load_config()
    hub = [DEFAULT_ENDPOINT] if config.get("hf_hub_fallback") else []
    found = [e.strip().rstrip("/") for e in [*(config.get("hf_endpoints") or ()), *mirrors, *hub]]
    return list(dict.fromkeys(e for e in found if e))


def token_file() -> Path:
    """Where `huggingface-cli login` keeps the token."""
    if os.environ.get("HF_TOKEN_PATH"):
        return Path(os.environ["HF_TOKEN_PATH"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "huggingface")
    return Path(hf_home).expanduser() / "token"


def resolve_token() -> str | None:
    """`HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`), else the token file, else None."""
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(variable, "").strip():
            return os.environ[variable].strip()
    try:
        return token_file().read_text().strip() or None
    except OSError:
        return None


def resolve_ca_bundle(explicit: str | os.PathLike | None = None) -> str | bool:
    """The CA bundle to verify against; `True` means the default (certifi's)."""
    candidates = [("ca_bundle setting", explicit)] + [
        (name, os.environ.get(name)) for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                                                  "SSL_CERT_FILE")]
    for origin, value in candidates:
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise SdrecipeError(
                    f"CA bundle {path} (from {origin}) does not exist: point it at your site's "
                    "PEM file (config key ca_bundle or SDRECIPE_CA_BUNDLE), or unset it")
            return str(path)
    return True


# Where the other TLS clients sdrecipe starts read a CA bundle: git (GIT_SSL_CAINFO),
# uv and py-rattler (SSL_CERT_FILE, read by rustls-native-certs), Python requests.
CA_BUNDLE_VARIABLES = ("GIT_SSL_CAINFO", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def ca_bundle_environ(explicit: str | os.PathLike | None = None) -> dict[str, str]:
    """The variables that make git, uv and py-rattler verify against the same CA bundle as
    this downloader (`explicit`, default: the `ca_bundle` setting); {} for the default."""
    if explicit is None:
        from .config import load_config
        explicit = load_config().get("ca_bundle")
    bundle = resolve_ca_bundle(explicit)
    return {} if bundle is True else dict.fromkeys(CA_BUNDLE_VARIABLES, bundle)


@contextlib.contextmanager
def ca_bundle_in_environ(explicit: str | os.PathLike | None = None):
    """`ca_bundle_environ` set in this process while the block runs (py-rattler, which
    reads SSL_CERT_FILE when it builds its HTTP client), then restored."""
    variables = ca_bundle_environ(explicit)
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- the part file: resumable, hashed once ---------------------------------------------------------
class _Part:
    """`<dest>.part` + its sidecar; keeps the running hash of the bytes on disk."""

    def __init__(self, download: Download):
        self.download = download
        self.path = download.part
        self.meta_path = self.path.with_name(self.path.name + ".json")
        self.offset, self.hasher, self.meta = 0, hashlib.sha256(), {}
        self.resumed = False

    @property
    def have(self) -> list[list[int]]:
        """The byte ranges on disk: [[0, offset]] for a part written in order; a segmented
        part's sidecar lists its ranges (`_Pieces`)."""
        return self.meta.get("have") or ([[0, self.offset]] if self.offset else [])

    def load(self) -> None:
        """Adopt an existing part from an earlier run: hash its contiguous prefix once, keep
        its validators (and, if segmented, which ranges beyond the prefix are there)."""
        try:
            meta = json.loads(self.meta_path.read_text())
            size = self.path.stat().st_size
        except (OSError, ValueError):
            return self.reset()
        if meta.get("sha256") != self.download.sha256 or size == 0:
            return self.reset()
        prefix = size
        if "have" in meta:
            if meta.get("size") != self.download.size or not _Pieces.valid(meta["have"], size):
                return self.reset()
            prefix = meta["have"][0][1] if meta["have"] and meta["have"][0][0] == 0 else 0
        with open(self.path, "rb") as f:
            buffer = memoryview(bytearray(CHUNK))
            while self.offset < prefix and (n := f.readinto(buffer[:min(CHUNK, prefix - self.offset)])):
                self.hasher.update(buffer[:n])
                self.offset += n
        self.meta, self.resumed = meta, True
        log.debug("%s: resuming from %d bytes", self.download.label, self.offset)

    def linear(self) -> None:
        """Written in order from here on: drop a segmented part's ranges past the prefix."""
        if "have" in self.meta:
            os.truncate(self.path, self.offset)
            del self.meta["have"]
            self.save()

    def save(self) -> None:
        """The sidecar, replaced whole: a kill at any moment leaves the old or the new one."""
        temp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        temp.write_text(json.dumps(self.meta))
        os.replace(temp, self.meta_path)

    def reset(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(b"")
        self.meta_path.unlink(missing_ok=True)
        self.offset, self.hasher, self.meta, self.resumed = 0, hashlib.sha256(), {}, False

    def resume_headers(self, url: str) -> dict:
        """Headers that make the server send the rest only if the file is unchanged.

        Without a validator from this URL, a pinned sha256 still vouches for the result
        (a wrong splice fails the hash and restarts); an unpinned one starts over."""
        if not self.offset:
            return {}
        validator = self.validator(url)
        if not validator and self.download.sha256 is None:
            self.reset()
            return {}
        return {"Range": f"bytes={self.offset}-", **validator}

    def remember(self, url: str, response: requests.Response, **more) -> None:
        self.meta = {"url": url, "etag": response.headers.get("ETag"),
                     "last_modified": response.headers.get("Last-Modified"),
                     "sha256": self.download.sha256, **more}
        self.save()

    def validator(self, url: str) -> dict:
        """If-Range from this URL's earlier answer: the server sends the range only if the
        file is unchanged (a weak ETag cannot serve; Last-Modified then)."""
        etag = self.meta.get("etag") or ""
        if self.meta.get("url") != url:
            return {}
        if etag and not etag.startswith("W/"):
            return {"If-Range": etag}
        return {"If-Range": self.meta["last_modified"]} if self.meta.get("last_modified") else {}

    def fill(self, read, advance) -> None:
        """Append what `read(buffer) -> n` puts into buffers (0: the body ended), hashing
        each as it is written: one pass over the bytes. Exactly what reached the file is
        hashed, so after ENOSPC the written prefix still counts and the part stays resumable.

        The hash runs on a second thread, handed the very buffer just written: hashlib
        releases the GIL on large buffers, so hashing one MiB overlaps reading and writing
        the next (benchmarks/README.md). HASH_BACKLOG + 1 buffers go round between the two
        threads, so memory stays fixed and no MiB is allocated (and page-faulted) per read:
        that churn was most of the CPU the benchmark measured over curl's.
        """
        free: queue.Queue = queue.Queue()
        for _ in range(HASH_BACKLOG + 1):
            free.put(bytearray(CHUNK))
        backlog: queue.Queue = queue.Queue()

        def hash_written():
            while (item := backlog.get()) is not None:
                buffer, length = item
                self.hasher.update(memoryview(buffer)[:length])
                free.put(buffer)

        hashing = threading.Thread(target=hash_written, name="sdrecipe-sha256", daemon=True)
        hashing.start()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            while length := read(buffer := free.get()):
                view, written = memoryview(buffer)[:length], 0
                try:
                    while written < length:
                        written += os.write(fd, view[written:])
                finally:
                    backlog.put((buffer, written))
                    self.offset += written
                advance(length)
        finally:
            os.close(fd)
            backlog.put(None)
            hashing.join()  # the hash covers every written byte before anyone reads it

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)


# --- segmented downloads ---------------------------------------------------------------------
class _Pieces:
    """The byte ranges of one segmented download: what is on disk, what is left to fetch,
    and how far the contiguous prefix (the part the hash may read) reaches.

    Entries `[start, end, written]` cover the file in order: the ranges found on disk
    (complete), and the gaps cut into pieces of at most `piece_size`, fetched in file order
    by whichever connection is free, so the prefix follows the downloads closely."""

    def __init__(self, size: int, have, piece_size: int):
        self.size = size
        self.entries: list[list[int]] = []
        position = 0
        for start, end in [*have, (size, size)]:
            while position < start:
                stop = min(position + piece_size, start)
                self.entries.append([position, stop, 0])
                position = stop
            if end > start:
                self.entries.append([start, end, end - start])
                position = end
        self.todo = collections.deque(e for e in self.entries if e[2] < e[1] - e[0])
        self.head = 0
        self.failure: BaseException | None = None
        self.finished = False
        self.cond = threading.Condition()

    @staticmethod
    def valid(have, size: int) -> bool:
        """Sorted, disjoint [start, end] ranges inside the file (a sidecar is untrusted)."""
        previous = 0
        for pair in have if isinstance(have, list) else [None]:
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(type(n) is int for n in pair) and previous <= pair[0] < pair[1] <= size):
                return False
            previous = pair[1]
        return True

    def take(self) -> list[int] | None:
        with self.cond:
            return self.todo.popleft() if self.todo and self.failure is None else None

    def wrote(self, entry: list[int], amount: int) -> None:
        with self.cond:
            entry[2] += amount
            self.cond.notify_all()

    def prefix(self) -> int:
        """End of the contiguous prefix on disk (call with `cond` held)."""
        while self.head < len(self.entries) and \
                self.entries[self.head][2] == self.entries[self.head][1] - self.entries[self.head][0]:
            self.head += 1
        if self.head == len(self.entries):
            return self.size
        return self.entries[self.head][0] + self.entries[self.head][2]

    def have(self) -> list[list[int]]:
        """The ranges on disk, merged: what the sidecar keeps for a resume."""
        merged: list[list[int]] = []
        with self.cond:
            for start, _, written in self.entries:
                if not written:
                    continue
                if merged and merged[-1][1] == start:
                    merged[-1][1] = start + written
                else:
                    merged.append([start, start + written])
        return merged

    def written(self) -> int:
        with self.cond:
            return sum(e[2] for e in self.entries)

    def stop(self, failure: BaseException | None = None) -> None:
        with self.cond:
            if failure is not None and self.failure is None:
                self.failure = failure
            self.finished = True
            self.cond.notify_all()


class _RangesIgnored(Exception):
    """The server answered a ranged request with the whole file (200)."""


class _Segmented:
    """One file as byte ranges over up to `connections` parallel connections.

    The part is preallocated; each connection writes its piece at its offset with pwrite.
    The sha256 is computed once, in order, by a thread that follows the contiguous prefix
    (reading back, from the page cache, bytes that other connections wrote moments
    before), so the hash is complete moments after the last byte. The sidecar lists the
    ranges on disk (rewritten at most every SAVE_EVERY seconds, and on failure), so a
    resume after a cut, a kill or a reboot asks only for what is missing. A failing piece
    retries alone with the usual backoff while the others go on; a server that answers a
    ranged request with 200 sends the download back to one connection."""

    SAVE_EVERY = 0.5
    SAMPLE = 0.2  # seconds the first piece runs alone, to see whether one connection is capped

    def __init__(self, transfer: "Transfer", download: Download, url: str, part: _Part,
                 progress: "_Progress", task):
        self.transfer, self.download, self.url, self.part = transfer, download, url, part
        self.progress, self.task = progress, task
        self.size = download.size
        self.pieces = _Pieces(self.size, part.have, transfer.piece_size)
        self.piece_url, self.validator = url, part.validator(url)
        self.authorized = download.gated and bool(transfer.token)
        self.slot = transfer._slot(url)
        self.saved_at = time.monotonic()
        self.save_lock = threading.Lock()
        self.fd = -1

    def run(self) -> bool:
        """Fetch the missing ranges. True: the part is complete and hashed; False: one
        connection is fast enough alone (`_enough_alone`), and the caller continues the
        file in order from the part's prefix."""
        if "have" not in self.part.meta and self.part.offset:  # a part written in order
            self.part.meta["have"], self.part.meta["size"] = self.part.have, self.size
        self.progress.restart(self.task, self.pieces.written(), self.size)
        first = self.pieces.take()
        if first is None:
            self._hash_only()
            return True
        session = requests.Session()
        response = self._request(session, first)  # the probe: are ranges honoured?
        try:
            self._check(response, first)
        except BaseException as exc:
            response.close()
            self.slot.release()
            session.close()
            if isinstance(exc, _RangesIgnored):
                self._one_connection()
            raise
        if not self.part.meta.get("have"):
            self.part.remember(self.url, response, size=self.size, have=[])
        self.piece_url = response.url
        self.validator = self.part.validator(self.url)
        self.authorized = self.authorized and urlsplit(response.url).netloc == urlsplit(self.url).netloc
        self.fd = os.open(self.part.path, os.O_RDWR)
        try:
            try:
                if first[0] + first[2] == self.part.offset and self._enough_alone(response, first):
                    return False
                _preallocate(self.fd, self.size)  # only now: a file going on in order needs none
                if first[2] == first[1] - first[0]:  # the sample finished it (and its response)
                    first = response = None
            except BaseException:
                response.close()
                self.slot.release()
                session.close()
                raise
            workers = min(self.transfer.connections, len(self.pieces.todo) + 1)
            with ThreadPoolExecutor(max_workers=workers + 1,
                                    thread_name_prefix="fetch-piece") as pool:
                hashing = pool.submit(self._hash_in_order)
                jobs = [pool.submit(self._worker, session, first, response)]
                jobs += [pool.submit(self._worker, None) for _ in range(workers - 1)]
                for job in jobs:
                    job.result()
                self.pieces.stop()
                hashing.result()
        finally:
            os.close(self.fd)
            self._save(force=True)
        failure = self.pieces.failure
        if isinstance(failure, _RangesIgnored):
            self._one_connection()
        if failure is not None:
            raise failure
        return True

    def _enough_alone(self, response, entry) -> bool:
        """Read the first piece alone for SAMPLE seconds, hashing it as it comes. A connection
        that reaches `fast_connection` is not capped: more would only cost CPU (on loopback, 8
        connections took twice the wall time of one: benchmarks/README.md), so the piece is
        finished alone and the file goes on in order. Slower: the others join."""
        started = time.monotonic()
        done_alone = self._stream(response, entry, deadline=started + self.SAMPLE, inline=True)
        rate = entry[2] / max(time.monotonic() - started, 1e-6)
        if rate < self.transfer.fast_connection:
            return False
        if not done_alone:
            self._stream(response, entry, inline=True)
        log.debug("%s: one connection at %.0f MiB/s: in order from here", self.download.label,
                  rate / 2**20)
        return bool(self.pieces.todo)

    def _one_connection(self) -> None:
        log.info("%s: %s ignores Range: one connection from now on", self.download.label,
                 _endpoint(self.url))
        with self.transfer._lock:
            self.transfer._no_ranges.add(_endpoint(self.url))
        raise _Retry("the server ignores Range; continuing over one connection", wait=0)

    def _hash_only(self) -> None:
        """Every range is on disk already (a run died before its hash finished)."""
        self.fd = os.open(self.part.path, os.O_RDONLY)
        try:
            self.pieces.stop()
            self._hash_in_order()
        finally:
            os.close(self.fd)

    # -- the connections ---------------------------------------------------------------------
    def _worker(self, session, entry=None, response=None) -> None:
        session = session or requests.Session()
        try:
            while entry is not None or (entry := self.pieces.take()) is not None:
                self._piece(session, entry, response)
                entry = response = None
        except BaseException as exc:  # every outcome reaches the coordinator
            self.pieces.stop(exc)
        finally:
            session.close()

    def _piece(self, session, entry, response=None) -> None:
        """One range, retried alone: an attempt that dropped resumes where its bytes stopped."""
        failures_in_a_row = 0
        while True:
            before = entry[2]
            try:
                if response is None:
                    response = self._request(session, entry)
                    try:
                        self._check(response, entry)
                    except BaseException:
                        response.close()
                        self.slot.release()
                        raise
                return self._stream(response, entry)
            except _Retry as exc:
                failures_in_a_row = 0 if entry[2] > before else failures_in_a_row + 1
                if failures_in_a_row > self.transfer.retries:
                    raise _NextEndpoint(f"gave up after {self.transfer.retries + 1} attempts in "
                                        f"a row at byte {entry[0] + entry[2]}: {exc}") from None
                self.transfer._wait_to_retry(self.download, self.url, exc, failures_in_a_row)
            finally:
                response = None

    def _request(self, session, entry):
        """GET the rest of `entry`, holding a connection slot of the host (released by the
        caller once the body is read, or at once on error)."""
        headers = {"Accept-Encoding": "identity",
                   "Range": f"bytes={entry[0] + entry[2]}-{entry[1] - 1}", **self.validator}
        if self.authorized:
            headers["Authorization"] = f"Bearer {self.transfer.token}"
        self.slot.acquire()
        try:
            return self.transfer._get(session, self.piece_url, headers)
        except BaseException:
            self.slot.release()
            raise

    def _check(self, response, entry) -> None:
        if response.status_code == 206:
            start, total = _content_range(response)
            if total is not None and total != self.size:
                raise _Mismatch(f"serves {total} bytes, expected {self.size}")
            if start != entry[0] + entry[2]:
                raise _Retry(f"server sent bytes from {start}, not {entry[0] + entry[2]}", wait=0)
            return
        if response.status_code == 200:
            raise _RangesIgnored()
        if response.status_code == 416:
            raise _Mismatch(f"refuses bytes {entry[0]}-{entry[1] - 1}: smaller than the pinned "
                            f"{self.size} bytes")
        _raise_for_status(response)

    def _stream(self, response, entry, deadline: float | None = None, inline=False) -> bool:
        """The response's body into its piece. With a `deadline`, reading stops then and the
        response stays open (False); `inline` hashes the bytes as written (the piece is at
        the prefix and no hash thread runs yet)."""
        readinto, buffer = _body_reader(response), memoryview(bytearray(CHUNK))
        try:
            with contextlib.ExitStack() as closing:
                closing.enter_context(response)
                while entry[2] < entry[1] - entry[0] and self.pieces.failure is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        closing.pop_all()
                        return False
                    position = entry[0] + entry[2]
                    try:
                        length = readinto(buffer[:min(CHUNK, entry[1] - position)])
                    except READ_ERRORS as exc:
                        raise _Retry(f"connection dropped at byte {position} "
                                     f"({_reason(exc)})") from None
                    if not length:
                        raise _Retry(f"body ended at byte {position}")
                    view, written = buffer[:length], 0
                    while written < length:
                        written += os.pwrite(self.fd, view[written:], position + written)
                    if inline:
                        self.part.hasher.update(view)
                        self.part.offset += written
                    self.pieces.wrote(entry, written)
                    self.progress.advance(self.task, written)
                    self._save()
        except BaseException:
            self.slot.release()
            raise
        self.slot.release()
        return True

    # -- the hash and the sidecar ------------------------------------------------------------
    def _hash_in_order(self) -> None:
        """sha256 over the contiguous prefix as it grows; 4 MiB reads into one buffer."""
        buffer = memoryview(bytearray(HASH_READ))
        position = self.part.offset
        while position < self.size:
            with self.pieces.cond:
                while (end := self.pieces.prefix()) <= position and not self.pieces.finished:
                    self.pieces.cond.wait()
            if end <= position:
                return
            while position < end:
                n = os.preadv(self.fd, [buffer[:min(HASH_READ, end - position)]], position)
                if n <= 0:
                    raise OSError(errno.EIO, f"short read at byte {position}", str(self.part.path))
                self.part.hasher.update(buffer[:n])
                position += n
                self.part.offset = position

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.saved_at < self.SAVE_EVERY:
            return
        with self.save_lock:
            self.saved_at = now
            if self.part.meta:
                self.part.meta["have"] = self.pieces.have()
                self.part.save()


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks (ENOSPC now, not mid-download); sparse where unsupported."""
    if os.fstat(fd).st_size >= size:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise
        os.ftruncate(fd, size)


# --- internal outcomes of one attempt ------------------------------------------------------------
class _Retry(Exception):
    """Transient: retry the same URL after a backoff."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class _NextEndpoint(Exception):
    """This URL will not serve the file: try the next one."""


class _AuthRefused(_NextEndpoint):
    """401/403; `gated_repo` when the server said so (X-Error-Code: GatedRepo)."""

    def __init__(self, message: str, gated_repo: bool):
        super().__init__(message)
        self.gated_repo = gated_repo


class _Mismatch(_NextEndpoint):
    pass


class _Unreachable(_NextEndpoint):
    """The name does not resolve or the port refuses: retrying will not help, and every
    other download from the same endpoint skips it at once."""


# --- progress ----------------------------------------------------------------------------------------
class _Progress:
    """Per-file and total tasks of the one progress interface (`progress.py`), which the
    CLI renders as bars (size, speed, ETA) on a terminal; `enabled=False` reports nothing.
    Sizes come from the pins, else from each response's length as it arrives: the total
    is the sum of the sizes known so far."""

    def __init__(self, enabled: bool | None, sizes: list[int | None]):
        self._reporter = reporter() if enabled is not False else Reporter()
        self._known = sum(size for size in sizes if size is not None)
        self._total = self._reporter.add(f"total ({len(sizes)} files)", self._known or None,
                                         unit="bytes")
        self._completed: dict = {}
        self._sizes: dict = {}
        self._lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._reporter.remove(self._total)

    def file(self, label: str, total: int | None):
        task = self._reporter.add(label, total, unit="bytes")
        self._sizes[task] = total
        return task

    def advance(self, task, amount: int) -> None:
        with self._lock:
            self._completed[task] = self._completed.get(task, 0) + amount
        self._reporter.advance(task, amount)
        self._reporter.advance(self._total, amount)

    def restart(self, task, completed: int, total: int | None) -> None:
        """The file starts over (or resumes) at `completed`; keep the total bar honest."""
        with self._lock:
            self._reporter.advance(self._total, completed - self._completed.get(task, 0))
            self._completed[task] = completed
            if total is not None and self._sizes.get(task) is None:  # learnt from the server
                self._sizes[task] = total
                self._known += total
                self._reporter.update(self._total, total=self._known)
        self._reporter.update(task, completed=completed, total=total)

    def done(self, task) -> None:
        self._reporter.remove(task)


# --- the downloader ---------------------------------------------------------------------------------
@dataclass
class Transfer:
    """Fetch `Download`s. `token=None` looks one up with `resolve_token()` (pass "" for
    none); `progress=None` shows bars only on a terminal; `backoff` is the first wait
    between retries in seconds (doubling, at most 30 s)."""

    ca_bundle: str | os.PathLike | None = None
    token: str | None = None
    retries: int = 4
    timeout: float = 30.0
    jobs: int = 4
    progress: bool | None = None
    backoff: float = 1.0
    quarantine_dir: Path | None = None
    connections: int = 8
    per_host: int = 8
    segment_threshold: int = 64 << 20
    piece_size: int = 16 << 20
    fast_connection: float = 200 * 2**20  # bytes/s: one such connection is not capped
    _verify: str | bool = field(init=False, repr=False)
    _no_ranges: set = field(init=False, repr=False, default_factory=set)
    _slots: dict = field(init=False, repr=False, default_factory=dict)
    _unreachable: dict = field(init=False, repr=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self):
        self._verify = resolve_ca_bundle(self.ca_bundle)
        if self.token is None:
            self.token = resolve_token()
        if min(self.jobs, self.connections, self.per_host) < 1 or self.retries < 0:
            raise SdrecipeError(f"jobs, connections and connections per host must be >= 1 and "
                                f"retries >= 0 (got {self.jobs}, {self.connections}, "
                                f"{self.per_host}, {self.retries})")

    def __repr__(self) -> str:  # never show the token
        return (f"Transfer(ca_bundle={self.ca_bundle!r}, token={'***' if self.token else None}, "
                f"retries={self.retries}, timeout={self.timeout}, jobs={self.jobs})")

    @classmethod
    def from_config(cls, config, **overrides) -> "Transfer":
        """Take the CA bundle (`ca_bundle` / SDRECIPE_CA_BUNDLE) and the connection counts
        (`connections` per file, `connections_per_host`) from the site config."""
        return cls(**{"ca_bundle": config.get("ca_bundle"),
                      "connections": config.get("connections"),
                      "per_host": config.get("connections_per_host"), **overrides})

    # -- public -------------------------------------------------------------------------------------
    def fetch(self, downloads) -> list[Result]:
        downloads = list(downloads)
        dests = [d.dest.resolve() for d in downloads]
        if len(set(dests)) != len(dests):
            twice = sorted({str(d) for d in dests if dests.count(d) > 1})
            raise SdrecipeError(f"two downloads write to the same file: {', '.join(twice)}")
        self._refuse_token_over_plain_http(downloads)
        self._unreachable.clear()
        self._check_free_space(downloads)
        results: list[Result | None] = [None] * len(downloads)
        failures: list[SdrecipeError] = []
        with _Progress(self.progress, [d.size for d in downloads]) as progress, \
                ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="fetch") as pool:
            futures = [pool.submit(self._fetch_one, d, progress) for d in downloads]
            for index, future in enumerate(futures):
                try:
                    results[index] = future.result()
                except SdrecipeError as exc:
                    failures.append(exc)
        arrived = [r for r in results if r]
        if failures and all(getattr(f, "unreachable", None) for f in failures):
            endpoints = {e: why for f in failures for e, why in f.unreachable.items()}
            raise UnreachableError(failures, arrived, len(downloads), endpoints)
        if failures:
            raise TransferError(failures, arrived, len(downloads))
        return results

    def _refuse_token_over_plain_http(self, downloads) -> None:
        """The token travels only over TLS, or to this machine: checked before any connection."""
        if not self.token:
            return
        for download in downloads:
            for url in download.urls if download.gated else ():
                if urlsplit(url).scheme == "http" and not _is_loopback(urlsplit(url).hostname):
                    raise SdrecipeError(
                        f"{download.label}: refusing to send your Hugging Face token over plain "
                        f"http to {_endpoint(url)}: use an https:// endpoint (HF_ENDPOINT or "
                        "config hf_endpoints); tokens go only over TLS or to this machine")

    # -- one file -----------------------------------------------------------------------------------
    def _fetch_one(self, download: Download, progress: _Progress) -> Result:
        part, attempts, kinds, unreachable = _Part(download), [], set(), {}
        task = progress.file(download.label, download.size)
        try:
            download.dest.parent.mkdir(parents=True, exist_ok=True)
            with _exclusive(download):
                part.load()
                progress.advance(task, part.offset)
                if download.size is not None and part.offset == download.size:
                    with contextlib.suppress(_Mismatch):  # a run died just before the rename
                        return self._finish(download, part.meta.get("url", ""), part)
                for url in download.urls:
                    try:
                        return self._from_url(download, url, part, progress, task)
                    except _NextEndpoint as exc:
                        attempts.append(self._redact(f"{url}: {exc}"))
                        kinds.add(type(exc))
                        if isinstance(exc, _Unreachable):
                            unreachable[_endpoint(url)] = self._unreachable[_endpoint(url)]
                        if isinstance(exc, _AuthRefused) and exc.gated_repo:
                            kinds.add("gated repo")
                if not part.offset:
                    part.discard()
        except OSError as exc:  # local trouble: full disk, quota, permissions
            where = exc.filename or part.path
            if exc.errno in DISK_FULL:
                raise DiskSpaceError(
                    f"{download.label}: disk full while writing {where} ({exc.strerror}): free "
                    "space (or move the cache with SDRECIPE_CACHE) and run again; the "
                    f"{part.offset} bytes already in {part.path.name} are kept and the download "
                    "resumes from there") from None
            raise DownloadError(download, f"cannot write {where}: {exc.strerror}", attempts) \
                from None
        finally:
            progress.done(task)
        if _AuthRefused in kinds and download.gated:
            summary = GATED_HINT if not self.token else (
                "the server refused your token: check that it is valid and that your account "
                "accepted this repo's license on huggingface.co")
            raise GatedError(download, summary, attempts)
        if "gated repo" in kinds:
            raise GatedError(download, "the server says this repo is gated, but the download is "
                             "not marked gated, so no token was sent: mark it `gated: true` in "
                             "the recipe", attempts)
        if kinds == {_Mismatch}:
            raise IntegrityError(download, "every URL served different bytes than pinned "
                                 "(bad copies are quarantined)", attempts)
        raise DownloadError(download, f"failed from all {len(download.urls)} URL(s)", attempts,
                            unreachable if kinds == {_Unreachable} else None)

    def _from_url(self, download, url, part, progress, task) -> Result:
        """Retry one URL within bounds; restart fresh once if a resumed part mismatches."""
        failures_in_a_row, last = 0, None
        known = self._unreachable.get(_endpoint(url))
        if known:
            raise _Unreachable(f"{known} (as a moment ago)")
        while failures_in_a_row <= self.retries:
            before, resumed = part.offset, part.resumed
            try:
                return self._attempt(download, url, part, progress, task)
            except _Retry as exc:
                last = exc
                failures_in_a_row = 0 if part.offset > before else failures_in_a_row + 1
                if failures_in_a_row > self.retries:
                    break
                self._wait_to_retry(download, url, exc, failures_in_a_row)
            except _Mismatch:
                if not resumed:
                    raise
                log.warning("%s: mismatch after resuming an old part; starting over from %s",
                            download.label, self._redact(url))
                part.reset()
                progress.restart(task, 0, download.size)
        raise _NextEndpoint(f"gave up after {self.retries + 1} attempts in a row: {last}")

    def _wait_to_retry(self, download, url, exc: "_Retry", failures_in_a_row: int) -> None:
        wait = exc.wait if exc.wait is not None else min(
            MAX_BACKOFF, self.backoff * 2 ** (failures_in_a_row - 1))
        wait *= random.uniform(0.75, 1.25)
        log.warning("%s", self._redact(f"{download.label}: {url}: {exc}; retrying in "
                                       f"{wait:.1f}s"))
        time.sleep(wait)

    def _segmentable(self, download, url) -> bool:
        """Large, pinned (size and sha256: a splice of two versions cannot pass), and the
        endpoint has not been seen ignoring Range."""
        return (self.connections > 1 and download.sha256 is not None
                and download.size is not None and download.size > self.segment_threshold
                and _endpoint(url) not in self._no_ranges)

    def _slot(self, url: str) -> threading.BoundedSemaphore:
        """The per-host cap: one semaphore per endpoint, shared by all files and pieces."""
        with self._lock:
            return self._slots.setdefault(_endpoint(url), threading.BoundedSemaphore(self.per_host))

    def _get(self, session, url: str, headers: dict):
        """A streamed GET; transport failures mapped to what the caller does next."""
        log.debug("GET %s (%s)", url, headers.get("Range", "whole file"))
        try:
            return session.get(url, headers=headers, stream=True, verify=self._verify,
                               timeout=(self.timeout, self.timeout))
        except requests.exceptions.SSLError as exc:
            raise _NextEndpoint(
                f"TLS verification failed ({_reason(exc)}): if your site uses its own CA, set "
                "ca_bundle in the sdrecipe config or SDRECIPE_CA_BUNDLE to its PEM file "
                "(verification is never switched off)") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            self._raise_if_unreachable(url, exc)
            raise _Retry(f"no response ({_reason(exc)})") from None
        except requests.exceptions.RequestException as exc:
            raise _NextEndpoint(_reason(exc)) from None

    def _attempt(self, download, url, part, progress, task) -> Result:
        if self._segmentable(download, url) and \
                _Segmented(self, download, url, part, progress, task).run():
            return self._finish(download, url, part)
        part.linear()
        headers = {"Accept-Encoding": "identity", **part.resume_headers(url)}
        if download.gated and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        with self._slot(url):
            return self._attempt_in_order(download, url, part, progress, task, headers)

    def _attempt_in_order(self, download, url, part, progress, task, headers) -> Result:
        """One connection, the body appended to the part as it comes."""
        response = self._get(requests, url, headers)
        with response:
            self._check_status(download, part, response)
            length = response.headers.get("Content-Length")
            remaining = int(length) if length is not None else None
            total = part.offset + remaining if remaining is not None else None
            if download.size is not None and total is not None and total != download.size:
                raise _Mismatch(f"serves {total} bytes, expected {download.size}")
            if remaining:
                _ensure_space(part.path.parent, remaining, download.label)
            if part.offset == 0:
                part.remember(url, response)
            progress.restart(task, part.offset, total)
            self._stream(response, part, progress, task)
            if total is not None and part.offset != total:  # urllib3 1.x does not raise here
                raise _Retry(f"body ended at byte {part.offset} of {total}")
        return self._finish(download, url, part)

    def _check_status(self, download, part, response) -> None:
        status = response.status_code
        if status == 206:
            start, _ = _content_range(response)
            if start != part.offset:
                part.reset()
                raise _Retry(f"server resumed at byte {start}, not {part.offset}; starting over",
                             wait=0)
            return
        if status == 200:
            if part.offset:
                log.info("%s: server sent the whole file (changed or no ranges): restarting",
                         download.label)
                part.reset()
            return
        if status == 416 and part.offset:
            part.reset()
            raise _Retry("server refused the resume range; starting over", wait=0)
        _raise_for_status(response)

    def _stream(self, response, part, progress, task) -> None:
        """The body into the part, in 1 MiB reads into the part's buffers."""
        readinto = _body_reader(response)

        def read(buffer) -> int:
            try:
                return readinto(buffer)
            except READ_ERRORS as exc:
                raise _Retry(f"connection dropped at byte {part.offset} "
                             f"({_reason(exc)})") from None

        part.fill(read, lambda n: progress.advance(task, n))

    def _finish(self, download, url, part) -> Result:
        digest = part.hasher.hexdigest()
        size = part.offset
        wrong_size = download.size is not None and size != download.size
        if wrong_size or (download.sha256 and digest != download.sha256):
            where = self._quarantine(download, part)
            expected = f"sha256 {download.sha256}, {download.size} bytes"
            raise _Mismatch(f"served sha256 {digest} ({size} bytes), expected {expected}; "
                            f"the bad copy is quarantined at {where}")
        os.replace(part.path, download.dest)
        part.meta_path.unlink(missing_ok=True)
        log.debug("%s: %d bytes, sha256 %s, from %s", download.label, size, digest,
                 self._redact(url))
        return Result(download.dest, digest, size, url)

    def _quarantine(self, download, part) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        folder = self.quarantine_dir or download.dest.parent
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{download.dest.name}.bad-{stamp}-{os.getpid()}"
        os.replace(part.path, target)
        part.discard()
        part.reset()
        return target

    def _check_free_space(self, downloads) -> None:
        """Before any byte: sum what is still missing per filesystem, compare to free."""
        needed: dict[int, list] = {}
        for d in downloads:
            if d.size is None:
                continue
            folder = _existing_parent(d.dest.parent)
            have = d.part.stat().st_size if d.part.is_file() else 0
            entry = needed.setdefault(folder.stat().st_dev, [folder, 0, []])
            entry[1] += max(d.size - have, 0)
            entry[2].append(d.label)
        for folder, missing, labels in needed.values():
            _ensure_space(folder, missing, ", ".join(labels))

    def _raise_if_unreachable(self, url: str, exc: Exception) -> None:
        """A name that does not resolve or a refused port is not transient like a 5xx: say
        so at once, and remember it so no other download waits on that endpoint."""
        reason = _unreachable_reason(exc)
        if reason:
            with self._lock:
                self._unreachable[_endpoint(url)] = reason
            raise _Unreachable(reason) from None

    def _redact(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text


@contextlib.contextmanager
def _exclusive(download: Download):
    """One writer per file: two jobs sharing a cache wait for each other, and say so."""
    lock = filelock.FileLock(str(download.dest) + ".lock")
    try:
        lock.acquire(timeout=1)
    except filelock.Timeout:
        log.warning("%s: another process is downloading %s; waiting for it", download.label,
                    download.dest)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _ensure_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(_existing_parent(folder)).free
    if needed > free:
        raise DiskSpaceError(
            f"not enough disk space in {folder}: {what} need {_gib(needed)}, "
            f"{_gib(free)} free; free some space or point the cache at a bigger filesystem "
            "(SDRECIPE_CACHE or cache_dir in the sdrecipe config)")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


READ_ERRORS = (urllib3.exceptions.HTTPError, requests.exceptions.RequestException,
               http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError)


def _body_reader(response):
    """`readinto(buffer) -> n` for the body. http.client's own where the body is not
    content-encoded (we ask for identity): it reads from the socket straight into our
    buffer, one copy and no allocation (urllib3's `readinto` reads into a new bytes and
    copies). Else urllib3's decoding `read`, copied in."""
    raw = response.raw
    inner = getattr(raw, "_fp", None)
    if response.headers.get("Content-Encoding", "identity") == "identity" and \
            hasattr(inner, "readinto"):
        return inner.readinto

    def read_decoded(buffer) -> int:
        data = raw.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
    return read_decoded


def _raise_for_status(response) -> None:
    """What a status other than 200/206 means: 401/403 refused, 429/5xx transient (with the
    server's Retry-After), anything else: this URL will not serve the file."""
    status = response.status_code
    if status in (401, 403):
        detail = response.headers.get("X-Error-Message")
        raise _AuthRefused(f"HTTP {status}" + (f": {detail}" if detail else ""),
                           gated_repo=response.headers.get("X-Error-Code") == "GatedRepo")
    if status == 429 or status >= 500:
        retry_after = response.headers.get("Retry-After", "")
        wait = min(float(retry_after), MAX_BACKOFF) if retry_after.isdigit() else None
        raise _Retry(f"HTTP {status} {response.reason}", wait)
    raise _NextEndpoint(f"HTTP {status} {response.reason}")


def _content_range(response) -> tuple[int | None, int | None]:
    """(first byte, total size) from `Content-Range: bytes a-b/total` (total None for `*`)."""
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not match:
        return None, None
    return int(match[1]), (int(match[2]) if match[2] != "*" else None)


def _endpoint(url: str) -> str:
    """scheme://host[:port] of a URL: what a person types into HF_ENDPOINT."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _is_loopback(host: str | None) -> bool:
    """localhost or a loopback address literal; names are not resolved (no traffic)."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unreachable_reason(exc: BaseException) -> str | None:
    """'name does not resolve' / 'connection refused' when that is what `exc` (requests'
    ConnectionError around urllib3's) comes down to; None for anything that may pass."""
    seen = exc
    while seen is not None:
        if isinstance(seen, urllib3.exceptions.NameResolutionError) or isinstance(
                seen, socket.gaierror):
            return "name does not resolve"
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        inner = getattr(seen, "reason", None)
        if isinstance(seen, requests.exceptions.ConnectionError) and seen.args:
            inner = seen.args[0]
        seen = inner if isinstance(inner, BaseException) else (seen.__cause__ or seen.__context__)
    return None


def _reason(exc: BaseException) -> str:
    """The innermost cause, short: 'Read timed out', 'Connection refused', ..."""
    while exc.__context__ is not None and not str(exc):
        exc = exc.__context__
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
