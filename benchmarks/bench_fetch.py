"""Fetch benchmark: sdrecipe's downloader vs curl on loopback (see benchmarks/README.md).

    python benchmarks/bench_fetch.py [--size-mib 1024] [--rounds 5] [--workdir benchmarks/out]

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
started = time.perf_counter()
Transfer(token="", progress=False, retries=2, backoff=0.1).fetch(
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


def fetch_argv(url: str, dest: Path, sha: str, size: int) -> list[str]:
    return [sys.executable, "-c", CHILD.format(src=str(ROOT / "src")), url, str(dest), sha,
            str(size)]


class Nginx:
    """nginx on 127.0.0.1 serving `root` with sendfile; started and stopped by PID."""

    def __init__(self, root: Path, work: Path, port: int = 18931):
        self.root, self.work, self.port = root, work, port

    def __enter__(self):
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.work / "nginx.conf"
        conf.write_text(f"""daemon off; worker_processes 1; pid {self.work}/nginx.pid;
error_log {self.work}/error.log; events {{ worker_connections 64; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {self.work}/tmp; proxy_temp_path {self.work}/tmp;
  fastcgi_temp_path {self.work}/tmp; uwsgi_temp_path {self.work}/tmp; scgi_temp_path {self.work}/tmp;
  server {{ listen 127.0.0.1:{self.port}; root {self.root}; }} }}
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
    contenders = {
        "curl -o": ["curl", "-sS", "-o", str(dest), url],
        "curl -o && sha256sum": ["sh", "-c", f'curl -sS -o "{dest}" "{url}" && sha256sum "{dest}"'],
        "sdrecipe fetch+verify": fetch_argv(url, dest, sha, size)}
    times = {name: [] for name in [*contenders, "sdrecipe fetch+verify (in-process)"]}
    names = list(contenders)
    for round_number in range(rounds):
        shift = round_number % len(names)  # rotate who goes first: no order bias
        for name in names[shift:] + names[:shift]:
            dest.unlink(missing_ok=True)
            os.sync()  # every contender starts with no dirty pages to write back
            wall, _, stdout, cpu = run(contenders[name])
            times[name].append((wall, cpu))
            if name.startswith("sdrecipe"):
                times["sdrecipe fetch+verify (in-process)"].append((float(stdout), None))
    dest.unlink(missing_ok=True)
    return {name: (statistics.median(w for w, _ in values),
                   statistics.median(c for _, c in values) if values[0][1] is not None else None)
            for name, values in times.items()}


def bench_resend(path: Path, sha: str, size: int, out: Path) -> dict:
    results = {}
    with MirrorServer() as hub:
        url = hub.add_plain("big.bin", path)
        hub.fault(url, cut_after=size // 2)
        dest = out / "cut.bin"
        dest.unlink(missing_ok=True)
        run(fetch_argv(url, dest, sha, size))
        hits = hub.requests_for(url)
        results["connection cut at 50%, same run"] = hits[-1].body_bytes / size

        dest.unlink()
        hub.clear_faults()
        child = subprocess.Popen(fetch_argv(url, dest, sha, size), stdout=subprocess.DEVNULL)
        part = dest.with_name(dest.name + ".part")
        while not part.exists() or part.stat().st_size < size // 2:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait()
        kept = part.stat().st_size
        before = len(hub.requests_for(url))
        run(fetch_argv(url, dest, sha, size))
        resent = sum(h.body_bytes for h in hub.requests_for(url)[before:])
        results[f"process killed at {kept / size:.0%}, new run"] = resent / size
        dest.unlink()
    return results


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
    args = parser.parse_args()
    www, out = args.workdir / "www", args.workdir / "dl"
    www.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    size, small = args.size_mib * 2**20, args.small_mib * 2**20
    files = {"big.bin": (make_file(www / "big.bin", size), size),
             "small.bin": (make_file(www / "small.bin", small), small)}
    use_nginx = args.server == "nginx" or (args.server == "auto" and shutil.which("nginx"))
    print(f"machine: {machine()}")
    print("load average before: %.2f %.2f %.2f" % os.getloadavg())
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(out)], capture_output=True,
                            text=True).stdout.strip()
    print(f"downloads written to: {out} ({fstype})")
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
    curl = wall["curl -o"][0]
    print(f"\n## wall time, {args.size_mib} MiB, median of {args.rounds} interleaved rounds")
    print("| contender | wall s | MiB/s | vs curl -o | CPU s (user+sys) |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, (seconds, cpu) in wall.items():
        print(f"| {name} | {seconds:.2f} | {size / 2**20 / seconds:.0f} | {seconds / curl:.2f}x "
              f"| {'' if cpu is None else f'{cpu:.2f}'} |")
    print("\n## bytes resent after a cut at 50% (second request's body / file size)")
    print("| case | resent |\n| --- | ---: |")
    for name, ratio in resend.items():
        print(f"| {name} | {ratio:.1%} |")
    print("\n## peak memory (max RSS of the fetching process)")
    print("| process | max RSS MiB |\n| --- | ---: |")
    for name, kib in memory.items():
        print(f"| {name} | {kib / 1024:.1f} |")


if __name__ == "__main__":
    main()
