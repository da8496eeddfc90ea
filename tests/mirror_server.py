"""A real HTTP(S) server on 127.0.0.1 that speaks the Hugging Face resolve layout.

Tests and benchmarks download from it instead of the internet. It is a real
threaded `http.server` on loopback (not a mock): requests go through sockets,
redirects, Range/206, TLS handshakes, and it can inject faults per file.

    with MirrorServer() as hub:                      # or the `mirror` pytest fixture
        url = hub.add_file("org/model", "weights.bin", data, gated=True)
        hub.add_plain("files/hardnet.pth", other)    # a plain (non-HF) URL
        hub.fault(url, cut_after=1000)               # cut the connection once, mid-body
        ...download...
        hub.bytes_sent(url)                          # body bytes that left the server

Layout (like huggingface.co):
    HEAD/GET /{repo}/resolve/{revision}/{path}
        -> 302 to /cdn/{repo}/{commit}/{path} on `cdn_host` (default "localhost",
           a different host name than 127.0.0.1, like HF's CDN), with
           X-Repo-Commit, X-Linked-Etag, X-Linked-Size; `redirect=False` serves
           the body directly instead.
        -> 401 (X-Error-Code: GatedRepo) for a gated repo without the right
           `Authorization: Bearer <token>`; 404 for an unknown revision or path.
    HEAD/GET /cdn/... and plain paths: 200 or 206 with ETag (the sha256),
        Content-Length, Accept-Ranges; `Range: bytes=a-[b]` and `If-Range` honoured.

Faults (`fault(url_or_path, ...)`, each for `times` requests, None = always; several
faults on one file queue up and act in order; `clear_faults()` ends them):
    status=500       answer with that status (at the first hop)
    delay=2.0        sleep before answering (a slow server; the client times out)
    cut_after=N      send N body bytes, then drop the connection
    corrupt=True     serve the right length with wrong bytes
    no_length=True   omit Content-Length (body ends when the connection closes)
    on_range=N       only a request whose `Range` starts at byte N (one segment of a
                     segmented download), at whichever hop it arrives

Server-wide modes: `rate=N` caps each connection at N bytes/s (like nginx's
`limit_rate`, or a mirror's per-connection cap); `ignore_ranges=True` answers every
request with the whole file (200) while still advertising `Accept-Ranges: bytes`, as
some proxies do.

`tls=make_tls_files(dir)` serves HTTPS with a certificate from a throwaway CA
(returned as `.ca`, to hand to the client as its CA bundle).
File bodies on disk (`data` given as a Path) go out with sendfile(2), so the
server keeps up with curl for benchmarks.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.server
import ipaddress
import re
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

CHUNK = 1 << 20


@dataclass
class Blob:
    """One file's bytes (in memory or on disk) and its validators."""

    data: bytes | Path
    sha256: str
    size: int

    @classmethod
    def of(cls, data: bytes | Path) -> "Blob":
        if isinstance(data, Path):
            digest = hashlib.sha256()
            with open(data, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    digest.update(block)
            return cls(data, digest.hexdigest(), data.stat().st_size)
        return cls(bytes(data), hashlib.sha256(data).hexdigest(), len(data))

    @property
    def etag(self) -> str:
        return f'"{self.sha256}"'


@dataclass
class Fault:
    times: int | None = 1
    status: int | None = None
    delay: float = 0.0
    cut_after: int | None = None
    corrupt: bool = False
    no_length: bool = False
    on_range: int | None = None

    def take(self) -> bool:
        """Use up one occurrence; False once exhausted."""
        if self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
        return True


@dataclass
class Repo:
    commit: str
    files: dict[str, Blob] = field(default_factory=dict)
    token: str | None = None


@dataclass
class Hit:
    """One request as the server saw it (for assertions)."""

    method: str
    path: str
    host: str
    headers: dict
    status: int = 0
    body_bytes: int = 0


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path, hosts=("127.0.0.1", "localhost")) -> TLSFiles:
    """A throwaway CA and a server certificate for `hosts`, written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(minutes=5),
                 not_valid_after=now + datetime.timedelta(days=1))

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder(**valid).subject_name(name("sdrecipe test CA"))
               .issuer_name(name("sdrecipe test CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder(**valid).subject_name(name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TLSFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<rev>[0-9a-f]{40})/(?P<path>.+)$")
RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class MirrorServer:
    """See the module docstring. Start with `with` or `start()`; stop with `stop()`."""

    def __init__(self, tls: TLSFiles | None = None, cdn_host: str = "localhost",
                 redirect: bool = True, rate: int | None = None, ignore_ranges: bool = False):
        self.tls, self.cdn_host, self.redirect = tls, cdn_host, redirect
        self.rate, self.ignore_ranges = rate, ignore_ranges
        self.repos: dict[str, Repo] = {}
        self.plain: dict[str, Blob] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.hits: list[Hit] = []
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> "MirrorServer":
        self._httpd = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert, self.tls.key)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True,
                                                     do_handshake_on_connect=False)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint: `https://127.0.0.1:PORT` (or http); use it as an HF endpoint."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # -- content ------------------------------------------------------------------------
    def add_file(self, repo: str, path: str, data: bytes | Path, *, gated: bool = False,
                 token: str | None = None, commit: str | None = None) -> str:
        """Publish `path` in HF repo `repo`; returns its resolve URL at the commit sha.

        `gated=True` (or a `token`) makes the repo answer 401 unless the request
        carries `Authorization: Bearer <token>` (default token "hf_test_token").
        """
        entry = self.repos.get(repo)
        if entry is None:
            entry = self.repos[repo] = Repo(commit or hashlib.sha1(repo.encode()).hexdigest())
        if gated or token:
            entry.token = token or "hf_test_token"
        entry.files[path] = Blob.of(data)
        return f"{self.url}/{repo}/resolve/{entry.commit}/{quote(path)}"

    def add_plain(self, path: str, data: bytes | Path) -> str:
        """Publish a plain URL (like a GitHub release asset); returns it."""
        path = "/" + path.lstrip("/")
        self.plain[path] = Blob.of(data)
        return self.url + path

    def fault(self, url_or_path: str, *, times: int | None = 1, status: int | None = None,
              delay: float = 0.0, cut_after: int | None = None, corrupt: bool = False,
              no_length: bool = False, on_range: int | None = None) -> None:
        """Queue a fault for the file at `url_or_path` (a URL from add_* or its path)."""
        with self._lock:
            self.faults.setdefault(self._file_key(urlsplit(url_or_path).path), []).append(
                Fault(times, status, delay, cut_after, corrupt, no_length, on_range))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    # -- observations -----------------------------------------------------------------
    def bytes_sent(self, url_or_path: str | None = None) -> int:
        """Body bytes sent for that file (any hop), or in total."""
        key = url_or_path and self._file_key(urlsplit(url_or_path).path)
        with self._lock:
            return sum(h.body_bytes for h in self.hits
                       if key is None or self._file_key(h.path) == key)

    def requests_for(self, url_or_path: str) -> list[Hit]:
        key = self._file_key(urlsplit(url_or_path).path)
        with self._lock:
            return [h for h in self.hits if self._file_key(h.path) == key]

    # -- internals ---------------------------------------------------------------------
    def _file_key(self, path: str) -> str:
        """The same key for a file's resolve URL (any revision name) and its CDN URL."""
        path = unquote(path.split("?", 1)[0])
        match = RESOLVE.match(path) or CDN.match(path)
        return f"{match['repo']}:{match['path']}" if match else path

    def _take_fault(self, path: str, first_hop: bool, body_hop: bool,
                    range_start: int | None) -> Fault | None:
        """The fault for this hop: status faults at the first hop, the rest where bytes flow;
        a fault `on_range` only for its range (status faults then at any hop)."""
        with self._lock:
            queue = self.faults.get(self._file_key(path), [])
            while queue and queue[0].times is not None and queue[0].times <= 0:
                queue.pop(0)
            fault = next((f for f in queue if (f.times is None or f.times > 0)
                          and f.on_range in (None, range_start)), None)
            if fault is None:
                return None
            hop = (first_hop or fault.on_range is not None) if fault.status else body_hop
            return fault if hop and fault.take() else None

    def _lookup(self, repo: str, revision: str, path: str):
        entry = self.repos.get(repo)
        if entry is None or revision not in (entry.commit, "main"):
            return entry, None
        return entry, entry.files.get(path)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """Clients that hang up (timeouts, refused TLS, size checks) are normal here."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler_for(server: MirrorServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "sdrecipe-test-mirror"

        def setup(self):
            if server.tls:
                try:
                    self.request.do_handshake()
                except (ssl.SSLError, OSError):
                    self.request.close()
                    raise
            super().setup()

        def log_message(self, *args):  # quiet: tests assert on `server.hits`
            pass

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        def _serve(self, head: bool) -> None:
            hit = Hit(self.command, self.path, self.headers.get("Host", ""), dict(self.headers))
            with server._lock:
                server.hits.append(hit)
                server._active += 1
                server.max_concurrent = max(server.max_concurrent, server._active)
            try:
                self._route(hit, head)
            except (ConnectionError, ssl.SSLError, TimeoutError):
                self.close_connection = True
            finally:
                with server._lock:
                    server._active -= 1

        def _route(self, hit: Hit, head: bool) -> None:
            path = unquote(self.path.split("?", 1)[0])
            resolve, cdn = RESOLVE.match(path), CDN.match(path)
            ranged = RANGE.match((self.headers.get("Range") or "").strip())
            fault = server._take_fault(path, first_hop=not cdn,
                                       body_hop=not (resolve and server.redirect),
                                       range_start=int(ranged[1]) if ranged else None)
            if fault and fault.delay:
                time.sleep(fault.delay)
            if fault and fault.status:
                return self._status(hit, fault.status, f"injected {fault.status}")
            if resolve or cdn:
                match = resolve or cdn
                repo, blob = server._lookup(match["repo"], match["rev"], match["path"])
                if repo and repo.token and resolve and \
                        self.headers.get("Authorization") != f"Bearer {repo.token}":
                    return self._status(hit, 401, "gated repo: token required", {
                        "X-Error-Code": "GatedRepo",
                        "X-Error-Message": "Access to this repo is restricted: log in"})
                if blob is None:
                    return self._status(hit, 404, "entry not found",
                                        {"X-Error-Code": "EntryNotFound"})
                if resolve and server.redirect:
                    location = (f"{'https' if server.tls else 'http'}://{server.cdn_host}:"
                                f"{server.port}/cdn/{match['repo']}/{repo.commit}/"
                                f"{quote(match['path'])}")
                    return self._status(hit, 302, "", {
                        "Location": location, "X-Repo-Commit": repo.commit,
                        "X-Linked-Etag": blob.etag, "X-Linked-Size": str(blob.size)})
                extra = {"X-Repo-Commit": repo.commit}
            else:
                blob, extra = server.plain.get(path), {}
                if blob is None:
                    return self._status(hit, 404, "not found")
            self._body(hit, blob, head, extra, fault)

        def _status(self, hit: Hit, code: int, text: str, headers: dict | None = None) -> None:
            body = text.encode()
            hit.status = code
            self.send_response(code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self, hit: Hit, blob: Blob, head: bool, extra: dict, fault: Fault | None):
            start, end = 0, blob.size - 1
            ranged = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            partial = bool(ranged) and if_range in (None, blob.etag) and not server.ignore_ranges
            if partial:
                match = RANGE.match(ranged.strip())
                if not match or int(match[1]) >= blob.size:
                    return self._status(hit, 416, "range not satisfiable",
                                        {"Content-Range": f"bytes */{blob.size}"})
                start = int(match[1])
                end = min(int(match[2]), blob.size - 1) if match[2] else blob.size - 1
            hit.status = 206 if partial else 200
            self.send_response(hit.status)
            if fault and fault.no_length:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", blob.etag)
            self.send_header("Content-Type", "application/octet-stream")
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end}/{blob.size}")
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if head:
                return
            self._send_bytes(hit, blob, start, end - start + 1, fault)

        def _send_bytes(self, hit: Hit, blob: Blob, offset: int, count: int, fault: Fault | None):
            limit = count if not (fault and fault.cut_after is not None) \
                else min(count, fault.cut_after)
            corrupt = bool(fault and fault.corrupt)
            started, step = time.monotonic(), (server.rate // 20 if server.rate else 1 << 26)
            pace = (lambda sent: time.sleep(max(0.0, started + sent / server.rate
                                                - time.monotonic()))) if server.rate else None
            if isinstance(blob.data, Path) and not corrupt:
                with open(blob.data, "rb") as f:
                    sent = 0
                    while sent < limit:  # sendfile(2) on plain sockets, send() under TLS
                        if pace:
                            pace(sent)
                        n = self.connection.sendfile(f, offset + sent, min(limit - sent, step))
                        if not n:
                            break
                        sent += n
                        hit.body_bytes += n
            else:
                view = memoryview(blob.data) if isinstance(blob.data, bytes) else None
                position = offset
                with open(blob.data, "rb") if view is None else contextlib.nullcontext() as f:
                    while position < offset + limit:
                        if pace:
                            pace(position - offset)
                        size = min(CHUNK, step, offset + limit - position)
                        if view is not None:
                            piece = bytes(view[position:position + size])
                        else:
                            f.seek(position)
                            piece = f.read(size)
                        if corrupt:
                            piece = bytes(b ^ 0x5A for b in piece[:16]) + piece[16:]
                        self.wfile.write(piece)
                        hit.body_bytes += len(piece)
                        position += size
            if limit < count:  # injected cut: drop the connection mid-body
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)

    return Handler
