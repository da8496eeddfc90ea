"""Fetch benchmark: sdrecipe's downloader vs curl, wget and aria2c on loopback
(see benchmarks/README.md).

    python benchmarks/bench_fetch.py [--size-mib 1024] [--rounds 5] [--workdir benchmarks/out]
        [--capped-mib 512 --rate 25m]

0. a server capping each connection (nginx `limit_rate`, like mirrors and proxies do):
   `wget` (one connection), `aria2c -x 8 -s 8` and sdrecipe (8 connections), paired
   rounds, medians. Needs nginx and aria2 (apt packages nginx, aria2).
1. wall time, fetch + verify of one file, median over `rounds` interleaved rounds:
   `curl -o` alone, `curl -o && sha256sum`, and `python -m sdrecipe.transfer`-style
   fetch (a fresh Python process calling `Transfer.fetch` with the sha256 pinned,
   so imports and process start are counted like curl's). All three download the
   same file from the same server: nginx (sendfile) when installed, else the test
   mirror (tests/mirror_server.py, also sendfile).
2. bytes resent after a cut at 50%: (a) the server drops the connection at half
   the file, the downloader resumes in the same run; (b) the downloading process
   is killed at half the file and a new process resumes from the .part.
3. peak memory (max RSS of the fetching process) at two file sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from mirror_server import MirrorServer  # noqa: E402

CHILD = """
import sys, time
sys.path.insert(0, {src!r})
from pathlib import Path
from sdrecipe.transfer import Download, Transfer
url, dest, sha, size = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
connections = int(sys.argv[5])
started = time.perf_counter()
Transfer(token="", progress=False, retries=2, backoff=0.1, connections=connections).fetch(
    [Download([url], dest, sha256=sha, size=size)])
print(time.perf_counter() - started)
"""


def make_file(path: Path, size: int) -> str:
    """Random bytes (incompressible), written once and reused; returns the sha256."""
    digest = hashlib.sha256()
    if not path.exists() or path.stat().st_size != size:
        with open(path, "wb") as f:
            for _ in range(size // 2**20):
                f.write(os.urandom(2**20))
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def run(argv: list[str]) -> tuple[float, int, str, float]:
    """Wall seconds, peak RSS (KiB), stdout, and CPU seconds (user+sys, with children)."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE)
    out = child.stdout.read().decode()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"{argv[0]} failed with {child.returncode}")
    return wall, usage.ru_maxrss, out, usage.ru_utime + usage.ru_stime


def fetch_argv(url: str, dest: Path, sha: str, size: int, connections: int = 8) -> list[str]:
    return [sys.executable, "-c", CHILD.format(src=str(ROOT / "src")), url, str(dest), sha,
            str(size), str(connections)]


class Nginx:
    """nginx on 127.0.0.1 serving `root` with sendfile; started and stopped by PID."""

    def __init__(self, root: Path, work: Path, port: int = 18931, limit_rate: str | None = None):
        self.root, self.work, self.port, self.limit_rate = root, work, port, limit_rate

    def __enter__(self):
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(f"""daemon off; worker_processes 1; pid {self.work}/nginx.pid;
error_log {self.work}/error.log; events {{ worker_connections 64; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {self.work}/tmp; proxy_temp_path {self.work}/tmp;
  fastcgi_temp_path {self.work}/tmp; uwsgi_temp_path {self.work}/tmp; scgi_temp_path {self.work}/tmp;
  server {{ listen 127.0.0.1:{self.port}; root {self.root};
    {f"limit_rate {self.limit_rate};" if self.limit_rate else ""} }} }}
""")
        self.process = subprocess.Popen([shutil.which("nginx"), "-c", str(conf), "-p", str(self.work)])
        for _ in range(100):
            if subprocess.run(["curl", "-sf", "-o", "/dev/null", f"{self.url}/"],
                              capture_output=True).returncode in (0, 22):
                return self
            time.sleep(0.05)
        raise SystemExit("nginx did not start")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def bench_wall(url: str, sha: str, size: int, out: Path, rounds: int) -> dict:
    """Median (wall s, CPU s) per contender; rounds interleave the contenders."""
    dest = out / "wall.bin"
    return paired_rounds({
        "curl -o": ["curl", "-sS", "-o", str(dest), url],
        "curl -o && sha256sum": ["sh", "-c", f'curl -sS -o "{dest}" "{url}" && sha256sum "{dest}"'],
        "sdrecipe fetch+verify, 8 connections": fetch_argv(url, dest, sha, size),
        "sdrecipe fetch+verify, 1 connection": fetch_argv(url, dest, sha, size, 1)},
        dest, rounds)


def bench_capped(url: str, sha: str, size: int, out: Path, rounds: int) -> dict:
    """The same, against a per-connection cap: one connection vs eight."""
    dest = out / "capped.bin"
    return paired_rounds({
        "wget (1 connection)": ["wget", "-q", "-O", str(dest), url],
        "aria2c -x 8 -s 8": ["aria2c", "-q", "-x", "8", "-s", "8", "--file-allocation=falloc",
                             "--allow-overwrite=true", "--auto-file-renaming=false",
                             "-d", str(out), "-o", dest.name, url],
        "sdrecipe fetch+verify, 8 connections": fetch_argv(url, dest, sha, size)},
        dest, rounds)


def paired_rounds(contenders: dict, dest: Path, rounds: int) -> dict:
    """Median (wall s, CPU s) per contender; each round runs all of them, rotating who goes
    first (no order bias), each into a just-deleted `dest` after `sync`."""
    times = {name: [] for name in contenders}
    for name in [n for n in contenders if n.startswith("sdrecipe")]:
        times[f"{name} (inside fetch)"] = []
    names = list(contenders)
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            dest.unlink(missing_ok=True)
            os.sync()  # every contender starts with no dirty pages to write back
            wall, _, stdout, cpu = run(contenders[name])
            times[name].append((wall, cpu))
            if name.startswith("sdrecipe"):
                times[f"{name} (inside fetch)"].append((float(stdout), None))
    dest.unlink(missing_ok=True)
    return {name: (statistics.median(w for w, _ in values),
                   statistics.median(c for _, c in values) if values[0][1] is not None else None)
            for name, values in times.items()}


def bench_resend(path: Path, sha: str, size: int, out: Path) -> dict:
    """Body bytes the resuming request(s) fetch / file size, one stream and segmented:
    a connection cut at half the file (segmented: halfway into the piece at 50%), and a
    SIGKILL once half the file is on disk (segmented: once the sidecar lists half)."""
    results = {}
    dest = out / "cut.bin"
    part = dest.with_name(dest.name + ".part")
    sidecar = part.with_name(part.name + ".json")
    piece = 16 << 20
    with MirrorServer(rate=100 << 20) as hub:  # capped per connection, so 8 join in
        url = hub.add_plain("big.bin", path)
        for connections, label in ((1, "1 connection"), (8, "8 connections")):
            dest.unlink(missing_ok=True)
            if connections == 1:
                hub.fault(url, cut_after=size // 2)
            else:
                hub.fault(url, cut_after=piece // 2, on_range=size // 2)
            before = hub.bytes_sent(url)
            run(fetch_argv(url, dest, sha, size, connections))
            results[f"{label}: connection cut at 50%, same run: all bytes sent"] = \
                (hub.bytes_sent(url) - before) / size
            hub.clear_faults()

            dest.unlink()
            child = subprocess.Popen(fetch_argv(url, dest, sha, size, connections),
                                     stdout=subprocess.DEVNULL)
            while on_disk(part, sidecar) < size // 2:
                if child.poll() is not None:
                    raise SystemExit("the download ended before it could be killed at 50%")
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
            child.wait()
            kept = on_disk(part, sidecar)
            before = hub.bytes_sent(url)
            run(fetch_argv(url, dest, sha, size, connections))
            resent = hub.bytes_sent(url) - before
            results[f"{label}: process killed at {kept / size:.0%}, new run"] = resent / size
            dest.unlink()
    return results


def on_disk(part: Path, sidecar: Path) -> int:
    """Bytes of the part a resume can keep: the ranges a segmented part's sidecar lists,
    else the size of a part written in order."""
    import json
    try:
        meta = json.loads(sidecar.read_text())
        return sum(b - a for a, b in meta["have"]) if "have" in meta else part.stat().st_size
    except (OSError, ValueError, KeyError):
        return 0


def bench_memory(url_of, files: dict, out: Path) -> dict:
    _, baseline, _, _ = run([sys.executable, "-c",
                          f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
                          "import sdrecipe.transfer"])
    results = {"import only (baseline)": baseline}
    for name, (sha, size) in files.items():
        dest = out / "mem.bin"
        dest.unlink(missing_ok=True)
        _, rss, _, _ = run(fetch_argv(url_of(name), dest, sha, size))
        results[f"fetch {size // 2**20} MiB"] = rss
        dest.unlink()
    return results


def print_wall(title: str, wall: dict, size: int, baseline: str) -> None:
    reference = wall[baseline][0]
    print(f"\n## {title}")
    print(f"| contender | wall s | MiB/s | vs {baseline} | CPU s (user+sys) |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, (seconds, cpu) in wall.items():
        print(f"| {name} | {seconds:.2f} | {size / 2**20 / seconds:.0f} | "
              f"{seconds / reference:.2f}x | {'' if cpu is None else f'{cpu:.2f}'} |")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]
    return (f"{os.cpu_count()} x {cpu}, {mem / 2**20:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, curl {curl}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--small-mib", type=int, default=256, help="second size for memory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument("--server", choices=("auto", "nginx", "mirror"), default="auto")
    parser.add_argument("--capped-mib", type=int, default=512,
                        help="file size for the per-connection cap benchmark (0: skip it)")
    parser.add_argument("--rate", default="25m", help="nginx limit_rate per connection")
    parser.add_argument("--only", choices=("capped", "unlimited"), help="run one part only")
    args = parser.parse_args()
    www, out = args.workdir / "www", args.workdir / "dl"
    www.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    size, small = args.size_mib * 2**20, args.small_mib * 2**20
    print(f"machine: {machine()}")
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(out)], capture_output=True,
                            text=True).stdout.strip()
    print(f"downloads written to: {out} ({fstype})")
    if args.capped_mib and args.only != "unlimited":
        capped_size = args.capped_mib * 2**20
        capped_sha = make_file(www / "capped.bin", capped_size)
        with Nginx(www, args.workdir / "nginx-capped", port=18932, limit_rate=args.rate) as server:
            capped = bench_capped(f"{server.url}/capped.bin", capped_sha, capped_size, out,
                                  args.rounds)
        print_wall(f"per-connection cap {args.rate}B/s (nginx limit_rate), {args.capped_mib} "
                   f"MiB, median of {args.rounds} paired rounds", capped, capped_size,
                   "wget (1 connection)")
        if args.only == "capped":
            return
    files = {"big.bin": (make_file(www / "big.bin", size), size),
             "small.bin": (make_file(www / "small.bin", small), small)}
    use_nginx = args.server == "nginx" or (args.server == "auto" and shutil.which("nginx"))
    server = Nginx(www, args.workdir / "nginx") if use_nginx else MirrorServer()
    with server:
        if not use_nginx:
            for name in files:
                server.add_plain(name, www / name)
        print(f"server: {'nginx (sendfile)' if use_nginx else 'tests/mirror_server.py (sendfile)'}")
        sha = files["big.bin"][0]
        wall = bench_wall(f"{server.url}/big.bin", sha, size, out, args.rounds)
        memory = bench_memory(lambda name: f"{server.url}/{name}", files, out)
    resend = bench_resend(www / "big.bin", sha, size, out)

    print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    print_wall(f"wall time, {args.size_mib} MiB, median of {args.rounds} interleaved rounds",
               wall, size, "curl -o")
    print("\n## bytes sent after a fault at 50%, / file size (cut: all the run sent, 100% = "
          "nothing twice; kill: what the new run fetched)")
    print("| case | resent |\n| --- | ---: |")
    for name, ratio in resend.items():
        print(f"| {name} | {ratio:.1%} |")
    print("\n## peak memory (max RSS of the fetching process)")
    print("| process | max RSS MiB |\n| --- | ---: |")
    for name, kib in memory.items():
        print(f"| {name} | {kib / 1024:.1f} |")


if __name__ == "__main__":
    main()
