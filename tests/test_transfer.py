"""The downloader against a real HTTP(S) mirror on loopback, with injected faults."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fetch_fixtures import free_port
from mirror_server import MirrorServer
from sdrecipe.errors import SdrecipeError
from sdrecipe.transfer import (GATED_HINT, DiskSpaceError, Download, GatedError, IntegrityError,
                               Transfer, TransferError, endpoints_from, hf_resolve_urls,
                               resolve_token)

pytestmark = pytest.mark.usefixtures("no_hf_credentials")

DATA = os.urandom(3 * 2**20 + 12345)  # a few chunks and a ragged tail
SHA = hashlib.sha256(DATA).hexdigest()
TOKEN = "hf_sEcReT0123456789abcdef"


def fast(**kw) -> Transfer:
    """A Transfer with test-sized backoff and timeouts, quiet."""
    return Transfer(**{"token": "", "backoff": 0.01, "timeout": 5.0, "retries": 3,
                       "progress": False, **kw})


def pinned(urls, dest, **kw) -> Download:
    return Download(urls=urls, dest=dest, **{"sha256": SHA, "size": len(DATA), **kw})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# --- happy paths ---------------------------------------------------------------------------
def test_hf_file_lands_verified_via_redirect_and_trust_on_first_use(mirror, tmp_path):
    url = mirror.add_file("org/model", "sub dir/weights.bin", DATA)
    plain = mirror.add_plain("releases/hardnet.pth", DATA[:1000])
    results = fast().fetch([
        Download([url], tmp_path / "w.bin"),                      # nothing pinned: TOFU
        Download([plain], tmp_path / "h.pth", size=1000),
    ])
    assert (results[0].sha256, results[0].size, results[0].url) == (SHA, len(DATA), url)
    assert results[1].sha256 == hashlib.sha256(DATA[:1000]).hexdigest()
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert [h.status for h in mirror.requests_for(url)] == [302, 200]  # resolve -> CDN
    assert leftovers(tmp_path) == ["h.pth", "w.bin"]  # no .part, no sidecar


def test_hf_resolve_urls_and_endpoint_order(monkeypatch):
    assert hf_resolve_urls(["https://m.example/", "https://huggingface.co"], "org/r", "abc",
                           "a b/c.json") == [
        "https://m.example/org/r/resolve/abc/a%20b/c.json",
        "https://huggingface.co/org/r/resolve/abc/a%20b/c.json"]
    monkeypatch.setenv("HF_ENDPOINT", "https://site-mirror/ , https://hf-mirror.example")
    assert endpoints_from(None, mirrors=["https://recipe-mirror", "https://hf-mirror.example"]) == [
        "https://site-mirror", "https://hf-mirror.example", "https://recipe-mirror",
        "https://huggingface.co"]
    from sdrecipe.config import load_config
    assert endpoints_from(load_config())[0] == "https://site-mirror"
    monkeypatch.setenv("SDRECIPE_HF_HUB_FALLBACK", "0")  # an air-gapped site: its mirror only
    assert endpoints_from(load_config()) == ["https://site-mirror", "https://hf-mirror.example"]
    monkeypatch.setenv("SDRECIPE_HF_HUB_FALLBACK", "maybe")
    with pytest.raises(SdrecipeError, match="SDRECIPE_HF_HUB_FALLBACK"):
        load_config()


# --- resume ---------------------------------------------------------------------------------
def test_cut_mid_file_resumes_and_sends_only_the_rest(mirror, tmp_path):
    url = mirror.add_file("org/model", "w.bin", DATA)
    mirror.fault(url, cut_after=2**20 + 7)
    [result] = fast().fetch([pinned([url], tmp_path / "w.bin")])
    assert result.sha256 == SHA
    assert mirror.bytes_sent(url) == len(DATA)  # nothing sent twice
    ranges = [h.headers.get("Range") for h in mirror.requests_for(url) if h.status in (200, 206)]
    assert ranges == [None, f"bytes={2**20 + 7}-"]


def test_resume_across_runs_from_the_part_file(mirror, tmp_path):
    url = mirror.add_file("org/model", "w.bin", DATA)
    mirror.fault(url, cut_after=2_000_000)
    mirror.fault(url, status=503, times=None)  # then the mirror goes down: this run gives up
    with pytest.raises(TransferError, match="HTTP 503"):
        fast(retries=1).fetch([pinned([url], tmp_path / "w.bin")])
    assert (tmp_path / "w.bin.part").stat().st_size == 2_000_000
    assert not (tmp_path / "w.bin").exists()
    mirror.clear_faults()

    [result] = fast().fetch([pinned([url], tmp_path / "w.bin")])  # a new run, a new Transfer
    assert result.sha256 == SHA and (tmp_path / "w.bin").read_bytes() == DATA
    assert mirror.bytes_sent(url) == len(DATA)
    assert mirror.requests_for(url)[-1].headers["If-Range"] == f'"{SHA}"'
    assert leftovers(tmp_path) == ["w.bin"]


def test_changed_remote_file_is_not_spliced_onto_an_old_part(mirror, tmp_path):
    url = mirror.add_file("org/model", "w.bin", DATA)
    mirror.fault(url, cut_after=1_000_000)
    mirror.fault(url, status=503, times=None)
    with pytest.raises(TransferError):
        fast(retries=0).fetch([Download([url], tmp_path / "w.bin")])
    mirror.clear_faults()
    new = os.urandom(len(DATA))
    mirror.add_file("org/model", "w.bin", new)  # upstream replaced the file: new ETag
    [result] = fast().fetch([Download([url], tmp_path / "w.bin")])
    assert (tmp_path / "w.bin").read_bytes() == new
    assert result.sha256 == hashlib.sha256(new).hexdigest()
    assert mirror.requests_for(url)[-1].status == 200  # If-Range failed: whole file again


def test_a_bad_old_part_is_caught_and_the_file_fetched_fresh(mirror, tmp_path):
    url = mirror.add_plain("w.bin", DATA)
    (tmp_path / "w.bin.part").write_bytes(b"garbage from an older run")
    (tmp_path / "w.bin.part.json").write_text(f'{{"sha256": "{SHA}"}}')
    [result] = fast().fetch([pinned([url], tmp_path / "w.bin")])
    assert result.sha256 == SHA and (tmp_path / "w.bin").read_bytes() == DATA
    assert [h.headers.get("Range") for h in mirror.requests_for(url)] == ["bytes=25-", None]
    assert len(list(tmp_path.glob("w.bin.bad-*"))) == 1


def test_a_complete_part_left_by_a_killed_run_is_verified_not_fetched_again(mirror, tmp_path):
    url = mirror.add_plain("w.bin", DATA)
    (tmp_path / "w.bin.part").write_bytes(DATA)
    (tmp_path / "w.bin.part.json").write_text(f'{{"sha256": "{SHA}", "url": "{url}"}}')
    [result] = fast().fetch([pinned([url], tmp_path / "w.bin")])
    assert result.sha256 == SHA and (tmp_path / "w.bin").read_bytes() == DATA
    assert mirror.hits == []


# --- integrity --------------------------------------------------------------------------------
def test_wrong_bytes_are_quarantined_and_the_next_endpoint_used(mirror, tmp_path):
    with MirrorServer() as good:
        bad_url = mirror.add_file("org/model", "w.bin", DATA)
        mirror.fault(bad_url, corrupt=True, times=None)
        good_url = good.add_file("org/model", "w.bin", DATA)
        quarantine = tmp_path / "quarantine"
        [result] = fast(quarantine_dir=quarantine).fetch(
            [pinned([bad_url, good_url], tmp_path / "w.bin")])
    assert result.url == good_url and (tmp_path / "w.bin").read_bytes() == DATA
    [bad] = quarantine.iterdir()
    assert bad.name.startswith("w.bin.bad-") and bad.stat().st_size == len(DATA)
    assert bad.read_bytes() != DATA


def test_wrong_bytes_everywhere_name_both_hashes_and_leave_no_file(mirror, tmp_path):
    url = mirror.add_plain("w.bin", DATA)
    mirror.fault(url, corrupt=True, times=None)
    with pytest.raises(TransferError) as caught:
        fast().fetch([pinned([url], tmp_path / "w.bin")])
    [failure] = caught.value.failures
    assert isinstance(failure, IntegrityError)
    [bad] = tmp_path.glob("w.bin.bad-*")
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    text = str(caught.value)
    assert SHA in text and actual in text and url in text and "quarantined at" in text
    assert not (tmp_path / "w.bin").exists()


def test_size_mismatch_is_refused_before_downloading(mirror, tmp_path):
    url = mirror.add_plain("w.bin", DATA)
    with pytest.raises(TransferError, match=f"serves {len(DATA)} bytes, expected 10"):
        fast().fetch([Download([url], tmp_path / "w.bin", size=10)])
    assert leftovers(tmp_path) == []  # not a byte written


# --- retries, timeouts, fallback ----------------------------------------------------------------
def test_500s_are_retried_within_bounds(mirror, tmp_path):
    url = mirror.add_file("org/model", "w.bin", DATA)
    mirror.fault(url, status=500, times=2)
    [result] = fast(retries=2).fetch([pinned([url], tmp_path / "w.bin")])
    assert result.sha256 == SHA
    assert [h.status for h in mirror.requests_for(url)] == [500, 500, 302, 200]


def test_persistent_500s_give_up_after_the_bound_with_a_clear_error(mirror, tmp_path):
    url = mirror.add_file("org/model", "w.bin", DATA)
    mirror.fault(url, status=503, times=None)
    with pytest.raises(TransferError) as caught:
        fast(retries=2).fetch([pinned([url], tmp_path / "w.bin")])
    assert len(mirror.requests_for(url)) == 3
    text = str(caught.value)
    assert "1 of 1 downloads failed" in text and url in text
    assert "gave up after 3 attempts in a row: HTTP 503" in text
    assert leftovers(tmp_path) == []


def test_slow_server_times_out_and_is_retried(mirror, tmp_path):
    url = mirror.add_plain("w.bin", DATA)
    mirror.fault(url, delay=1.5)
    [result] = fast(timeout=0.3).fetch([pinned([url], tmp_path / "w.bin")])
    assert result.sha256 == SHA
    hits = mirror.requests_for(url)
    assert len(hits) == 2 and hits[1].status == 200  # the first one answered too late


def test_404_moves_on_to_the_next_endpoint_and_failures_are_aggregated(mirror, tmp_path):
    with MirrorServer() as second:
        second.add_file("org/model", "w.bin", DATA)
        urls = hf_resolve_urls([mirror.url, second.url], "org/model", "main", "w.bin")
        missing = hf_resolve_urls([mirror.url], "org/model", "main", "nope.bin")
        with pytest.raises(TransferError) as caught:
            fast().fetch([pinned(urls, tmp_path / "w.bin"),
                          Download(missing, tmp_path / "nope.bin", label="nope")])
    assert [r.url for r in caught.value.results] == [urls[1]]  # w.bin arrived from #2
    assert (tmp_path / "w.bin").read_bytes() == DATA
    assert "1 of 2 downloads failed" in str(caught.value)
    assert "nope: failed from all 1 URL(s)" in str(caught.value) and "HTTP 404" in str(caught.value)


def test_parallel_downloads_are_bounded_by_jobs(tmp_path):
    with MirrorServer(redirect=False) as server:
        urls = [server.add_plain(f"f{i}", DATA[:1000 + i]) for i in range(5)]
        for url in urls:
            server.fault(url, delay=0.3)
        results = fast(jobs=2).fetch([Download([u], tmp_path / f"f{i}") for i, u in enumerate(urls)])
    assert [r.size for r in results] == [1000 + i for i in range(5)]
    assert server.max_concurrent == 2


# --- tokens ------------------------------------------------------------------------------------------
def test_gated_file_without_token_says_how_to_get_access(mirror, tmp_path):
    url = mirror.add_file("CompVis/sd", "model.ckpt", DATA, gated=True)
    with pytest.raises(TransferError) as caught:
        Transfer(backoff=0.01, progress=False).fetch([pinned([url], tmp_path / "m", gated=True)])
    [failure] = caught.value.failures
    assert isinstance(failure, GatedError) and GATED_HINT in str(failure)
    assert "HTTP 401: Access to this repo is restricted" in str(failure) and url in str(failure)
    assert len(mirror.requests_for(url)) == 1  # 4xx: not retried

    with pytest.raises(TransferError, match="mark it `gated: true` in the recipe"):
        fast(token=TOKEN).fetch([pinned([url], tmp_path / "m")])  # not marked gated: no token
    assert all("Authorization" not in h.headers for h in mirror.requests_for(url))


def test_token_goes_only_to_gated_files_never_to_the_cdn_and_never_into_logs(
        mirror, tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    gated = mirror.add_file("CompVis/sd", "model.ckpt", DATA, token=TOKEN)
    public = mirror.add_file("openai/clip", "config.json", b"{}")
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's included
    results = fast(token=None).fetch([pinned([gated], tmp_path / "m", gated=True),
                                      Download([public], tmp_path / "c.json")])
    assert results[0].sha256 == SHA
    hops = mirror.requests_for(gated)
    assert hops[0].headers["Authorization"] == f"Bearer {TOKEN}"
    assert hops[1].host.startswith("localhost") and "Authorization" not in hops[1].headers
    assert all("Authorization" not in h.headers for h in mirror.requests_for(public))

    mirror.add_file("CompVis/sd", "other.ckpt", DATA, token="hf_another_token")  # refused
    mirror.fault(gated, status=500, times=None)
    with pytest.raises(TransferError) as caught:
        Transfer(backoff=0.01, retries=1, progress=False).fetch([
            Download([gated], tmp_path / "m2", gated=True),
            Download(hf_resolve_urls([mirror.url], "CompVis/sd", "main", "other.ckpt"),
                     tmp_path / "o", gated=True)])
    assert "the server refused your token" in str(caught.value)
    seen = [str(caught.value), repr(caught.value.failures), caplog.text,
            repr(Transfer(progress=False)), *capsys.readouterr()]
    assert caplog.text and not [text for text in seen if TOKEN in text]


def test_resolve_token_order(monkeypatch, tmp_path):
    assert resolve_token() is None
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text("hf_from_home\n")
    assert resolve_token() == "hf_from_home"
    (tmp_path / "elsewhere").write_text("hf_from_path")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert resolve_token() == "hf_from_path"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert resolve_token() == "hf_from_env"


# --- TLS ---------------------------------------------------------------------------------------------
def test_tls_self_signed_is_rejected_without_the_ca_bundle_and_accepted_with_it(
        tls_mirror, tls_files, tmp_path, monkeypatch):
    url = tls_mirror.add_file("org/model", "w.bin", DATA)
    with pytest.raises(TransferError, match="TLS verification failed") as caught:
        fast().fetch([pinned([url], tmp_path / "w.bin")])
    assert "SDRECIPE_CA_BUNDLE" in str(caught.value)
    assert not (tmp_path / "w.bin").exists()

    [result] = fast(ca_bundle=tls_files.ca).fetch([pinned([url], tmp_path / "w.bin")])
    assert result.sha256 == SHA

    monkeypatch.setenv("SDRECIPE_CA_BUNDLE", str(tls_files.ca))  # the site config route
    from sdrecipe.config import load_config
    [again] = Transfer.from_config(load_config(), progress=False).fetch(
        [pinned([url], tmp_path / "again.bin")])
    assert again.sha256 == SHA

    with pytest.raises(Exception, match="CA bundle .*nope.pem .*does not exist"):
        Transfer(ca_bundle=tmp_path / "nope.pem")


# --- disk space --------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(folder: Path, size: int):
    """A real tmpfs of `size` bytes when we may mount one; else an RLIMIT_FSIZE file size
    limit on this process (writes past it fail with EFBIG, which the downloader treats
    like a full disk). Yields a function that lifts the limit."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if mounted:
        try:
            yield lambda: subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(folder)],
                                         check=True)
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_disk_full_mid_write_leaves_no_final_file_and_a_resumable_part(mirror, tmp_path):
    url = mirror.add_plain("w.bin", DATA)
    mirror.fault(url, no_length=True)  # size unknown up front: the disk fills mid-write
    disk = tmp_path / "small"
    with small_filesystem(disk, 2 * 2**20) as grow:
        with pytest.raises(TransferError) as caught:
            fast().fetch([Download([url], disk / "w.bin")])
        [failure] = caught.value.failures
        assert isinstance(failure, DiskSpaceError) and "resumes" in str(failure)
        assert not (disk / "w.bin").exists()
        kept = (disk / "w.bin.part").stat().st_size
        assert 0 < kept <= 2 * 2**20
        assert DATA.startswith((disk / "w.bin.part").read_bytes())

        grow()
        [result] = fast().fetch([Download([url], disk / "w.bin")])
        assert result.sha256 == SHA and (disk / "w.bin").read_bytes() == DATA
        assert mirror.requests_for(url)[-1].body_bytes == len(DATA) - kept


def test_free_space_is_checked_before_any_byte_is_fetched(mirror, tmp_path):
    url = mirror.add_plain("w.bin", DATA)
    with pytest.raises(DiskSpaceError, match=r"not enough disk space in .*w\.bin.* need"):
        fast().fetch([Download([url], tmp_path / "w.bin", size=2**62)])
    assert mirror.hits == []


def test_two_downloads_to_one_file_are_refused(tmp_path):
    with pytest.raises(Exception, match="two downloads write to the same file"):
        fast().fetch([Download(["http://127.0.0.1:9/a"], tmp_path / "x"),
                      Download(["http://127.0.0.1:9/b"], tmp_path / "x")])



# --- progress ------------------------------------------------------------------------------------
def test_progress_bars_on_a_terminal_and_silence_otherwise(mirror, tmp_path, capsys):
    """The downloader reports through progress.py; the CLI's session draws it on a terminal."""
    url = mirror.add_plain("w.bin", DATA)
    fast(progress=None).fetch([Download([url], tmp_path / "quiet.bin")])
    assert capsys.readouterr() == ("", "")  # not a terminal: nothing

    import pty
    import sys
    controller, terminal = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from sdrecipe import console; from sdrecipe.transfer import Transfer, Download\n"
         "with console.session():\n"
         "    Transfer(token='').fetch([Download([sys.argv[1]], Path(sys.argv[2]), label='w.bin')])",
         url, str(tmp_path / "tty.bin")],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "TERM": "xterm"})
    os.close(terminal)
    screen = b""
    with contextlib.suppress(OSError):  # EIO once the child closed its end
        while chunk := os.read(controller, 65536):
            screen += chunk
    os.close(controller)
    assert child.wait(timeout=60) == 0
    assert b"total (1 files)" in screen and b"w.bin" in screen


def test_the_mirror_answers_head_like_the_hub(mirror):
    """The test mirror itself: HEAD on a resolve URL as huggingface.co answers it."""
    import requests
    url = mirror.add_file("org/model", "w.bin", DATA)
    hop = requests.head(url, allow_redirects=False, timeout=5)
    assert hop.status_code == 302 and hop.headers["X-Repo-Commit"] in url
    assert hop.headers["X-Linked-Etag"] == f'"{SHA}"' and hop.headers["X-Linked-Size"] == str(len(DATA))
    final = requests.head(url, allow_redirects=True, timeout=5)
    assert final.status_code == 200 and final.headers["ETag"] == f'"{SHA}"'
    assert final.headers["Content-Length"] == str(len(DATA)) and final.headers["Accept-Ranges"] == "bytes"
    assert requests.head(url.replace("w.bin", "x.bin"), timeout=5).status_code == 404


def test_a_second_process_on_the_same_file_waits_for_the_first(mirror, tmp_path, caplog):
    """Two jobs sharing a cache (the first a real second process): the second waits for
    the first's lock, says so, and neither writes into the other's part file."""
    url = mirror.add_plain("w.bin", DATA)
    mirror.fault(url, delay=1.5)  # the first holder is slow
    import sys
    first = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from sdrecipe.transfer import Transfer, Download; "
         "Transfer(token='', progress=False).fetch([Download([sys.argv[1]], Path(sys.argv[2]))])",
         url, str(tmp_path / "w.bin")],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    while not mirror.hits:  # the first one holds the lock and is waiting for the server
        assert first.poll() is None
        time.sleep(0.01)
    [result] = fast().fetch([pinned([url], tmp_path / "w.bin")])
    assert first.wait(timeout=30) == 0
    assert result.sha256 == SHA and (tmp_path / "w.bin").read_bytes() == DATA
    assert "another process is downloading" in caplog.text


# --- unreachable endpoints and plain http (issue 10) ----------------------------------------------
def test_token_is_refused_over_plain_http_to_a_remote_host_before_any_connection(
        tmp_path, monkeypatch):
    """192.0.2.1 is TEST-NET-1 (documentation only): the refusal must come before a socket
    is even opened, so nothing leaves the machine."""
    def no_connection(*args, **kwargs):
        pytest.fail(f"a connection was attempted: {args}")
    monkeypatch.setattr(socket, "create_connection", no_connection)
    import urllib3.util.connection
    monkeypatch.setattr(urllib3.util.connection, "create_connection", no_connection)
    urls = hf_resolve_urls(["http://192.0.2.1"], "CompVis/sd", "main", "model.ckpt")
    with pytest.raises(SdrecipeError) as caught:
        fast(token=TOKEN).fetch([Download(urls, tmp_path / "m", gated=True)])
    text = str(caught.value)
    assert "\n" not in text and "refusing to send your Hugging Face token over plain http to " \
        "http://192.0.2.1" in text and "https://" in text and TOKEN not in text
    assert not isinstance(caught.value, TransferError)


def test_token_over_plain_http_to_loopback_is_allowed_and_https_too(mirror, tmp_path):
    url = mirror.add_file("CompVis/sd", "model.ckpt", DATA, token=TOKEN)
    [result] = fast(token=TOKEN).fetch([pinned([url], tmp_path / "m", gated=True)])
    assert result.sha256 == SHA


def test_unreachable_endpoints_fail_fast_with_one_error_and_the_ways_forward(tmp_path):
    """A refused loopback port and a name under the reserved .invalid TLD (resolution fails
    locally): no retries with backoff, one error naming both endpoints and three ways on."""
    closed = free_port()
    endpoints = [f"http://127.0.0.1:{closed}", "http://hub.invalid"]
    downloads = [Download(hf_resolve_urls(endpoints, "org/model", "main", f"f{i}.bin"),
                          tmp_path / f"f{i}.bin") for i in range(11)]
    started = time.monotonic()
    with pytest.raises(TransferError) as caught:
        fast(backoff=2.0, retries=4).fetch(downloads)
    assert time.monotonic() - started < 5  # the backoff alone would take minutes
    text = str(caught.value)
    assert "\n" not in text and "11 of 11 downloads failed" in text
    assert f"http://127.0.0.1:{closed} (connection refused)" in text
    assert "http://hub.invalid (name does not resolve)" in text
    for way in ("HF_ENDPOINT=<mirror>", "fetch --from-bundle", "deploy --smoke"):
        assert way in text
    assert leftovers(tmp_path) == []


def test_an_unreachable_mirror_falls_through_to_the_next_endpoint(mirror, tmp_path):
    endpoints = ["http://hub.invalid", mirror.url]
    mirror.add_file("org/model", "w.bin", DATA)
    started = time.monotonic()
    [result] = fast(backoff=2.0).fetch(
        [pinned(hf_resolve_urls(endpoints, "org/model", "main", "w.bin"), tmp_path / "w.bin")])
    assert time.monotonic() - started < 5
    assert result.url.startswith(mirror.url)


# --- segmented downloads (issue 14) -----------------------------------------------------------------
BIG = os.urandom(4 * 2**20 + 777)  # above the test threshold: 9 pieces of 512 KiB and a tail
BIG_SHA = hashlib.sha256(BIG).hexdigest()
PIECE = 512 * 1024


def segmented(**kw) -> Transfer:
    """Segmented above 1 MiB, 512 KiB pieces, 4 connections (test-sized); the others join
    the first however fast it is (loopback is faster than any real link)."""
    return fast(**{"segment_threshold": 2**20, "piece_size": PIECE, "connections": 4,
                   "fast_connection": float("inf"), **kw})


def big(urls, dest, **kw) -> Download:
    return Download(urls=urls, dest=dest, **{"sha256": BIG_SHA, "size": len(BIG), **kw})


def ranges_asked(server, url) -> list[int]:
    return [int(h.headers["Range"].split("=")[1].split("-")[0])
            for h in server.requests_for(url) if "Range" in h.headers and h.method == "GET"]


def test_a_large_pinned_file_comes_in_parallel_ranges_hashed_once(tmp_path):
    with MirrorServer(rate=4 * 2**20) as server:  # 4 MiB/s per connection
        url = server.add_plain("big.bin", BIG)
        [result] = segmented().fetch([big([url], tmp_path / "big.bin")])
        assert server.max_concurrent == 4
    assert result.sha256 == BIG_SHA and (tmp_path / "big.bin").read_bytes() == BIG
    assert server.bytes_sent(url) == len(BIG)  # every byte once
    assert sorted(ranges_asked(server, url)) == list(range(0, len(BIG), PIECE))
    assert {h.status for h in server.requests_for(url)} == {206}
    assert leftovers(tmp_path) == ["big.bin"]  # no part, no sidecar


def test_a_connection_fast_enough_alone_goes_on_in_order_without_the_others(tmp_path):
    """Uncapped (here: anything above 1 byte/s), the first piece is finished alone and the
    rest comes over one connection, in order: no parallel connections to pay for."""
    with MirrorServer(rate=8 * 2**20) as server:
        url = server.add_plain("big.bin", BIG)
        [result] = segmented(fast_connection=1).fetch([big([url], tmp_path / "big.bin")])
    assert result.sha256 == BIG_SHA and (tmp_path / "big.bin").read_bytes() == BIG
    assert [h.headers["Range"] for h in server.requests_for(url)] == [
        f"bytes=0-{PIECE - 1}", f"bytes={PIECE}-"]
    assert server.max_concurrent == 1 and server.bytes_sent(url) == len(BIG)


def test_small_or_unpinned_files_and_one_connection_stay_one_stream(mirror, tmp_path):
    url = mirror.add_plain("big.bin", BIG)
    segmented().fetch([Download([url], tmp_path / "tofu.bin")])  # no pin: one stream
    segmented(connections=1).fetch([big([url], tmp_path / "one.bin")])
    assert [h.status for h in mirror.requests_for(url)] == [200, 200]


def test_one_segment_that_fails_with_500_is_retried_alone(tmp_path):
    with MirrorServer(rate=8 * 2**20) as server:
        url = server.add_plain("big.bin", BIG)
        server.fault(url, status=500, times=2, on_range=3 * PIECE)
        [result] = segmented().fetch([big([url], tmp_path / "big.bin")])
    assert result.sha256 == BIG_SHA
    asked = ranges_asked(server, url)
    assert asked.count(3 * PIECE) == 3 and len(asked) == len(range(0, len(BIG), PIECE)) + 2
    assert [h.status for h in server.requests_for(url)
            if h.headers.get("Range", "").startswith(f"bytes={3 * PIECE}-")] == [500, 500, 206]
    assert server.bytes_sent(url) == len(BIG)


def test_a_cut_inside_one_segment_resends_only_the_rest_of_it(tmp_path):
    with MirrorServer(rate=8 * 2**20) as server:
        url = server.add_plain("big.bin", BIG)
        server.fault(url, cut_after=100_000, on_range=2 * PIECE)
        [result] = segmented().fetch([big([url], tmp_path / "big.bin")])
    assert result.sha256 == BIG_SHA
    resumed = [h for h in server.requests_for(url)
               if h.headers.get("Range", "").startswith(f"bytes={2 * PIECE + 100_000}-")]
    assert len(resumed) == 1 and resumed[0].status == 206
    assert server.bytes_sent(url) <= len(BIG) * 1.01  # nothing but the cut piece's rest


def test_corrupted_bytes_in_one_segment_are_quarantined_and_the_next_endpoint_used(tmp_path):
    with MirrorServer() as bad, MirrorServer() as good:
        bad_url = bad.add_plain("big.bin", BIG)
        bad.fault(bad_url, corrupt=True, on_range=5 * PIECE, times=None)
        good_url = good.add_plain("big.bin", BIG)
        quarantine = tmp_path / "quarantine"
        [result] = segmented(quarantine_dir=quarantine).fetch(
            [big([bad_url, good_url], tmp_path / "big.bin")])
    assert result.url == good_url and (tmp_path / "big.bin").read_bytes() == BIG
    [kept] = quarantine.iterdir()
    assert kept.stat().st_size == len(BIG) and kept.read_bytes() != BIG
    assert leftovers(tmp_path) == ["big.bin", "quarantine"]


def test_a_server_that_ignores_range_is_fetched_over_one_connection(tmp_path):
    with MirrorServer(ignore_ranges=True) as server:
        url = server.add_plain("big.bin", BIG)
        other = server.add_plain("other.bin", BIG)
        transfer = segmented()
        [result] = transfer.fetch([big([url], tmp_path / "big.bin")])
        assert result.sha256 == BIG_SHA and (tmp_path / "big.bin").read_bytes() == BIG
        assert [h.status for h in server.requests_for(url)] == [200, 200]  # probe, then one
        transfer.fetch([big([other], tmp_path / "other.bin")])  # remembered: no probe
        assert [h.status for h in server.requests_for(other)] == [200]


def test_connections_per_host_are_capped_across_files(tmp_path):
    with MirrorServer(rate=4 * 2**20) as server:
        urls = [server.add_plain(f"b{i}.bin", BIG) for i in range(3)]
        segmented(per_host=3, jobs=3).fetch(
            [big([u], tmp_path / f"b{i}.bin") for i, u in enumerate(urls)])
    assert server.max_concurrent == 3


def test_a_gated_segmented_download_sends_the_token_to_the_hub_host_only(mirror, tmp_path):
    url = mirror.add_file("CompVis/sd", "model.ckpt", BIG, token=TOKEN)
    [result] = segmented(token=TOKEN).fetch([big([url], tmp_path / "m", gated=True)])
    assert result.sha256 == BIG_SHA
    hops = mirror.requests_for(url)
    assert [h.headers.get("Authorization") for h in hops if h.host.startswith("127.0.0.1")] \
        == [f"Bearer {TOKEN}"]  # the resolve hop, once
    pieces = [h for h in hops if h.host.startswith("localhost")]
    assert len(pieces) == len(range(0, len(BIG), PIECE))
    assert all("Authorization" not in h.headers for h in pieces)


def test_a_killed_segmented_download_resumes_only_the_missing_ranges(tmp_path):
    """kill -9 of a real second process once its sidecar records half the file; a new run
    asks only for the ranges the sidecar does not list."""
    import json
    import sys
    dest = tmp_path / "big.bin"
    sidecar = tmp_path / "big.bin.part.json"
    with MirrorServer(rate=2**18) as server:  # 256 KiB/s per connection: ~4 s for the file
        url = server.add_plain("big.bin", BIG)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from sdrecipe.transfer import Transfer, Download; "
             "Transfer(token='', progress=False, segment_threshold=2**20, piece_size=2**18,"
             " connections=4).fetch([Download([sys.argv[1]], Path(sys.argv[2]), "
             "sha256=sys.argv[3], size=int(sys.argv[4]))])", url, str(dest), BIG_SHA, str(len(BIG))],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
        have = 0
        deadline = time.monotonic() + 60
        while have < len(BIG) // 2:
            assert child.poll() is None and time.monotonic() < deadline
            with contextlib.suppress(OSError, ValueError):
                have = sum(b - a for a, b in json.loads(sidecar.read_text()).get("have", []))
            time.sleep(0.02)
        child.kill()
        child.wait()
        before = server.bytes_sent(url)
        [result] = segmented().fetch([big([url], dest)])
        resent = server.bytes_sent(url) - before
    assert result.sha256 == BIG_SHA and dest.read_bytes() == BIG
    assert resent <= len(BIG) * 0.55, f"resent {resent / len(BIG):.0%}"
    assert resent <= len(BIG) - have + PIECE  # at most the ranges the sidecar did not list


def test_progress_learns_unknown_sizes_from_the_response(mirror, tmp_path):
    """A file without a pinned size still gets a true total: its Content-Length."""
    from sdrecipe import progress

    class Recorder(progress.Reporter):
        def __init__(self):
            self.tasks = {}

        def add(self, description, total=None, unit="items"):
            self.tasks[description] = {"total": total, "done": 0}
            return description

        def advance(self, task, amount=1):
            self.tasks[task]["done"] += amount

        def update(self, task, *, completed=None, total=None, description=None):
            if total is not None:
                self.tasks[task]["total"] = total
            if completed is not None:
                self.tasks[task]["done"] = completed

    url = mirror.add_plain("w.bin", DATA)
    small = mirror.add_plain("s.bin", DATA[:1000])
    with progress.reporting(Recorder()) as seen:
        fast(progress=None).fetch([Download([url], tmp_path / "w.bin"),
                                   Download([small], tmp_path / "s.bin", size=1000)])
    assert seen.tasks["total (2 files)"] == {"total": len(DATA) + 1000, "done": len(DATA) + 1000}
    assert seen.tasks["w.bin"] == {"total": len(DATA), "done": len(DATA)}


def test_a_file_of_one_piece_finishes_whether_its_connection_is_fast_or_not(mirror, tmp_path):
    url = mirror.add_plain("big.bin", BIG)
    for fast_connection in (1, float("inf")):
        dest = tmp_path / f"{fast_connection}.bin"
        [result] = segmented(piece_size=len(BIG), fast_connection=fast_connection).fetch(
            [big([url], dest)])
        assert result.sha256 == BIG_SHA and dest.read_bytes() == BIG
    assert [h.status for h in mirror.requests_for(url)] == [206, 206]
