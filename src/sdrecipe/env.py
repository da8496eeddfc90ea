"""`sdrecipe env build`: create a profile's environment from its lock, with no solver run.

The seed took most of its half-day here: `conda env create` from a half-pinned
file, a hand-installed `openmpi`, platform wheels pip-installed over the conda
torch, `LD_LIBRARY_PATH` exported by hand. This module replays the lock instead:

1. the conda part, by the first backend available: micromamba, mamba or conda
   (given the lock's explicit URL list, as `conda-lock install` does), else
   py-rattler (`rattler.install` of the locked records: no conda needed); or a
   plain venv of `--python PATH` on machines without conda (the pip layer and
   platform wheels are then all there is);
2. the platform wheels (DTK builds of torch and torchvision) from the site's
   wheel folder, sha256-checked against the lock, recorded there on first sight;
3. the pip layer, `pip install --require-hashes --no-deps` from the lock: pip
   never resolves, so it cannot swap the DTK torch for a PyPI one;
4. activation scripts and an Lmod modulefile (`activation.py`);
5. the import check (`payload/import_check.py`), run offline inside the env.

A stamp over the lock, the wheel hashes, the backend and the interpreter makes a
second run a no-op; any change rebuilds the environment from scratch.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from filelock import FileLock

from . import activation
from .config import load_config
from .errors import SdrecipeError
from .files import atomic_write_text, file_digest, sha256_file

PAYLOAD = Path(__file__).parent / "payload"
CONDA_TOOLS = ("micromamba", "mamba", "conda")
STAMP_VERSION = 1


@dataclass(frozen=True)
class LocalFile:
    """A file pip installs (platform wheel or pip-layer file), on disk, with its sha256."""
    path: Path
    sha256: str


@dataclass(frozen=True)
class CheckResult:
    python: str
    rows: list[dict]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row["ok"] for row in self.rows)

    @property
    def failed(self) -> str:
        return ", ".join(row["name"] for row in self.rows if not row["ok"])


# --- where things are ----------------------------------------------------------------


def _record_path(deployment, profile: str) -> Path:
    return deployment.state / f"env-{profile}.json"


def env_record(deployment, profile: str) -> dict | None:
    """What the last build of `profile` in this deployment wrote (prefix, backend, check)."""
    path = _record_path(deployment, profile)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SdrecipeError(f"{path}: unreadable build record ({exc}); "
                            f"rebuild with: sdrecipe env build --profile {profile} --force") from exc


def env_prefix(deployment, profile: str) -> Path:
    """The environment's folder: the one last built (even with --prefix), else the default."""
    record = env_record(deployment, profile)
    return Path(record["prefix"]) if record else deployment.env_prefix(profile)


def env_python(deployment, profile: str) -> Path:
    """The environment's interpreter (conda and venv alike keep it in bin/)."""
    return env_prefix(deployment, profile) / "bin" / "python"


def _is_conda_prefix(prefix: Path) -> bool:
    return (prefix / "conda-meta").is_dir()


def activation_env(deployment, profile: str, base: dict | None = None) -> dict[str, str]:
    """The variables activation sets, composed with `base` (default: os.environ).

    Use `{**os.environ, **activation_env(d, p)}` to run a process inside the env.
    """
    table = activation.variables(deployment, profile, env_prefix(deployment, profile))
    return activation.apply(table, os.environ if base is None else base)


def activation_script(deployment, profile: str) -> Path:
    """The bash file to `source` to activate the environment (any backend)."""
    return env_prefix(deployment, profile) / "etc" / "sdrecipe" / "activate.sh"


def modulefile_path(deployment, profile: str) -> Path:
    return deployment.modulefiles / "sdrecipe" / f"{profile}.lua"


# --- the lock, as this module reads it -----------------------------------------------


def find_platform_wheels(recipe, profile: str, lock, wheel_dir: Path) -> list[LocalFile]:
    """Locate each platform wheel of the lock, check (or first record) its sha256."""
    from . import lock as lock_module
    wheels = []
    for entry in lock.platform_wheels:
        name = unquote(entry.filename)  # the lock keeps it as its file:// URL spells it
        if "/" in name or name.startswith("."):
            raise SdrecipeError(f"{lock.path}: platform wheel {name!r} must be a plain file name")
        # The seed's site keeps them in <folder>/pytorch/: look one level down too.
        candidates = [wheel_dir / name] + sorted(wheel_dir.glob(f"*/{name}"))
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise SdrecipeError(
                f"platform wheel {name} not found in the wheel folder {wheel_dir} (nor one "
                f"folder below it). Copy it there, or point sdrecipe at the folder that has it: "
                f"export SDRECIPE_WHEEL_DIR=/path/to/dtk-22.10 (or wheel_dir: in the config file)")
        actual = sha256_file(path)
        if entry.sha256 is None:
            lock_module.record_wheel_hash(recipe, profile, entry.filename, actual, path=path)
            print(f"recorded sha256 of {name} in {lock.path} (first sight): {actual}\n"
                  f"  commit it: git add {lock.path}", file=sys.stderr)
        elif entry.sha256 != actual:
            raise SdrecipeError(
                f"platform wheel {path} has sha256 {actual}, but {lock.path} pins {entry.sha256}. "
                f"The file changed since it was locked: restore the original, or if the site "
                f"replaced it on purpose, delete its sha256 from the lock and rebuild to record "
                f"the new one")
        wheels.append(LocalFile(path, actual))
    return wheels


def fetch_pip_files(lock, venv: bool, cache_dir: Path) -> list[LocalFile]:
    """Every file of the pip layer in the download cache, sha256-checked on arrival.

    Through the one downloader (`transfer.py`), into `<cache>/pip/<sha256>/<file>`: a
    second build, CI, or a bundle for an air-gapped site reuses them, and pip then
    installs local files (pip's own HTTP cache does not keep them on every site).
    """
    from .transfer import Download, Transfer
    packages = lock.pip + (lock.venv if venv else ())
    files, downloads = [], []
    for package in packages:
        name = unquote(package.url.rsplit("/", 1)[-1].split("#", 1)[0])
        if "/" in name or name.startswith("."):
            raise SdrecipeError(f"{lock.path}: {package.url} does not end in a file name")
        path = cache_dir / package.sha256 / name
        if not path.is_file():
            downloads.append(Download(urls=[package.url], dest=path, sha256=package.sha256,
                                      label=name))
        files.append(LocalFile(path, package.sha256))
    if downloads:
        print(f"downloading {len(downloads)} of {len(files)} pip-layer files into {cache_dir}",
              file=sys.stderr)
        Transfer.from_config(load_config()).fetch(downloads)
    return files


# pip installs only the local, already sha256-checked files it is given: it never
# contacts an index (--no-index), never resolves (--no-deps), and builds an sdist with
# the environment's own setuptools (--no-build-isolation) instead of fetching unpinned,
# unhashed build requirements. So this step works on an offline node.
PIP_INSTALL = ("-m", "pip", "install", "--no-index", "--require-hashes", "--no-deps",
               "--no-build-isolation", "--no-input", "--disable-pip-version-check")


def requirements_text(lock, files: list[LocalFile]) -> str:
    """Local files, each with its locked sha256, as a pip requirements file."""
    header = (f"# generated by sdrecipe from {lock.path}; installed with pip install "
              f"{' '.join(PIP_INSTALL[3:])} -r <this file>\n")
    return header + "".join(f"{f.path} --hash=sha256:{f.sha256}\n" for f in files)


def install_pip_files(prefix: Path, lock, files: list[LocalFile]):
    """Wheels first (the lock's setuptools and wheel among them), then the sdists built with them.

    One pip call would build the sdists before installing anything, i.e. with whatever
    setuptools the interpreter shipped; two calls build them with the locked one.
    """
    wheels = [f for f in files if f.path.name.endswith(".whl")]
    sdists = [f for f in files if not f.path.name.endswith(".whl")]
    folder = prefix / "etc" / "sdrecipe"
    folder.mkdir(parents=True, exist_ok=True)
    for name, chosen, what in (("requirements.txt", wheels, "the platform and pip-layer wheels"),
                               ("requirements-sdist.txt", sdists, "the pip-layer sdists")):
        if chosen:
            (folder / name).write_text(requirements_text(lock, chosen))
            _run([prefix / "bin" / "python", *PIP_INSTALL, "-r", folder / name],
                 f"installing {what}",
                 fix=f"every file pip was given is local and matched {lock.path}; the log "
                     f"above names the package that failed")


# --- backends --------------------------------------------------------------------------


def choose_backend(python: str | None) -> str:
    if python:
        return "venv"
    for tool in CONDA_TOOLS:
        if shutil.which(tool):
            return tool
    return "rattler"


RUN_TAIL_LINES = 25


def _run(cmd: list, what: str, fix: str):
    """Run a build step, its output shown as it comes; on failure, raise with the step,
    the command, the last lines of its output and `fix` (what to do next)."""
    command = " ".join(str(c) for c in cmd)
    print("+ " + command, file=sys.stderr)
    tail = collections.deque(maxlen=RUN_TAIL_LINES)
    try:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
    except OSError as exc:
        raise SdrecipeError(f"{what} failed: cannot run {command} ({exc})\n{fix}") from exc
    with proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
    if proc.returncode != 0:
        raise SdrecipeError(f"{what} failed (exit {proc.returncode}): {command}\n"
                            f"--- last {len(tail)} lines of its output ---\n" + "\n".join(tail)
                            + f"\n---\n{fix}")


def _python_version(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SdrecipeError(f"--python {python}: cannot run it ({exc})") from exc
    return out.stdout.strip()


def check_python(python: str, lock):
    """The venv's interpreter must be the one the lock was resolved for (3.8)."""
    have = _python_version(python)
    if lock.python_version and have != lock.python_version:
        raise SdrecipeError(f"--python {python} is Python {have}, but {lock.path} is locked for "
                            f"Python {lock.python_version}: pass a Python "
                            f"{lock.python_version} interpreter")


@dataclass(frozen=True)
class CondaFile:
    """A locked conda package archive, on local disk, its sha256 (or md5) checked."""
    package: object  # lock.CondaPackage
    path: Path


def _check_digest(path: Path, package, lock) -> None:
    """sha256 where the lock has it; md5 (conda-lock always writes it) only where the
    channel listed no sha256. Streamed: conda archives (pytorch) are gigabytes."""
    kind = "sha256" if package.sha256 else "md5"
    wanted = getattr(package, kind)
    if not wanted:
        raise SdrecipeError(f"{lock.path}: {package.url} has neither sha256 nor md5; "
                            f"relock it: sdrecipe lock --profile {lock.profile}")
    actual = file_digest(path, kind)
    if actual != wanted:
        raise SdrecipeError(f"{package.url}: {kind} {actual} does not match the lock's {wanted}; "
                            f"the channel's file changed since it was locked")


def fetch_conda_packages(lock, cache_dir: Path) -> list[CondaFile]:
    """Bring every locked conda archive into the cache, checked, before any installer sees it.

    http(s) goes through the one downloader (`transfer.py`: CA bundle, resume, sha256 in
    one pass); file:// channels (mirrors on a shared filesystem) are read in place.
    """
    from urllib.parse import urlparse
    from urllib.request import url2pathname
    from .transfer import Download, Transfer
    files, downloads = [], []
    for package in lock.conda:
        url = urlparse(package.url)
        if url.scheme == "file":
            path = Path(url2pathname(url.path))
            if not path.is_file():
                raise SdrecipeError(f"{package.url}: no such file (locked in {lock.path})")
        else:
            path = cache_dir / (package.sha256 or package.md5) / package.url.rsplit("/", 1)[-1]
            if not path.is_file():
                downloads.append(Download(urls=[package.url], dest=path, sha256=package.sha256,
                                          label=path.name))
        files.append(CondaFile(package, path))
    if downloads:
        Transfer.from_config(load_config()).fetch(downloads)
    for conda_file in files:
        _check_digest(conda_file.path, conda_file.package, lock)
    return files


def explicit_text(lock, files: list[CondaFile]) -> str:
    """The conda part in conda's @EXPLICIT format, pointing at the checked local archives."""
    lines = ["# generated by sdrecipe from " + str(lock.path), "@EXPLICIT"]
    lines += [f"{f.path.as_uri()}#{f.package.md5}" for f in files]
    return "\n".join(lines) + "\n"


def create_conda(tool: str, prefix: Path, lock, files: list[CondaFile], workdir: Path):
    explicit = workdir / "conda-explicit.txt"
    explicit.write_text(explicit_text(lock, files))
    _run([tool, "create", "--yes", "--prefix", prefix, "--file", explicit],
         f"creating the conda environment with {tool}",
         fix=f"every archive in {explicit} is local and matched {lock.path}; if {tool} itself "
             f"is the problem, put another of {', '.join(CONDA_TOOLS)} first on PATH, or "
             f"uninstall them all to use py-rattler")


def rattler_records(files: list[CondaFile]) -> list:
    """The locked packages as py-rattler records, built from the lock (no solve, no repodata)."""
    import rattler
    records = []
    for conda_file in files:
        package = conda_file.package
        subdir = package.url.rsplit("/", 2)[-2]
        record = rattler.PackageRecord(
            name=package.name, version=package.version, build=rattler.BuildString(package.build),
            build_number=package.build_number, subdir=subdir, depends=list(package.depends),
            sha256=bytes.fromhex(package.sha256) if package.sha256 else None,
            md5=bytes.fromhex(package.md5) if package.md5 else None)
        url = conda_file.path.as_uri()
        records.append(rattler.RepoDataRecord(record, conda_file.path.name, url,
                                              url.rsplit("/", 2)[0]))
    return records


def create_rattler(prefix: Path, lock, files: list[CondaFile], cache_dir: Path):
    try:
        import rattler
    except ImportError as exc:
        raise SdrecipeError("no conda, mamba or micromamba on PATH and py-rattler is not "
                            "installed: pip install py-rattler, or pass --python PATH to build "
                            "a venv instead") from exc
    print(f"+ py-rattler install of {len(files)} locked packages into {prefix}", file=sys.stderr)
    records = rattler_records(files)
    try:
        asyncio.run(rattler.install(records, target_prefix=prefix, cache_dir=cache_dir,
                                    show_progress=sys.stderr.isatty()))
    except Exception as exc:  # py-rattler raises its own exception types per failure
        raise SdrecipeError(f"py-rattler could not install the conda part of {lock.path}: "
                            f"{exc}") from exc


# --- activation files ---------------------------------------------------------------------


def write_activation(recipe, deployment, profile: str, prefix: Path):
    """The bash file, the conda hooks (conda prefixes) and the modulefile, from one table."""
    profile_info = recipe.profile(profile)
    table = activation.variables(deployment, profile, prefix)
    modules = profile_info.modules
    script = prefix / "etc" / "sdrecipe" / "activate.sh"
    script.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(script, activation.bash_script(table, profile, modules, _is_conda_prefix(prefix)))
    if _is_conda_prefix(prefix):
        on, off = activation.conda_hooks(table, profile, modules)
        for folder, text in (("activate.d", on), ("deactivate.d", off)):
            hook = prefix / "etc" / "conda" / folder / "sdrecipe.sh"
            hook.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(hook, text)
    module = modulefile_path(deployment, profile)
    module.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(module, activation.modulefile(table, profile, modules, profile_info.description))
    return script, module


# --- the import check -----------------------------------------------------------------------


def network_isolation() -> tuple[list[str], str]:
    """The command prefix that takes the network away from a process run inside the env,
    and how it did (for reports): `unshare -n` (root), else `unshare -rn` (an unprivileged
    user namespace), else nothing but the offline variables of `offline_run_env`."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return [], "not isolated: unshare(1) is not installed; offline variables only"
    for flags in (["-n"], ["-rn"]):
        probe = subprocess.run([unshare, *flags, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [unshare, *flags], f"no network (unshare {' '.join(flags)})"
    reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "refused"
    return [], f"not isolated: unshare refused ({reason}); offline variables only"


def offline_run_env(deployment, profile: str, base: dict | None = None) -> dict[str, str]:
    """The whole environment of a process run inside the env with nothing from outside:
    `base` (default: os.environ) activated (which sets HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE), and no user site-packages shadowing the env's own."""
    base = dict(os.environ if base is None else base)
    return {**base, **activation_env(deployment, profile, base), "PYTHONNOUSERSITE": "1"}


def import_check(deployment, profile: str) -> CheckResult:
    """Run the import check in the environment, activated, offline."""
    python = env_python(deployment, profile)
    if not python.exists():
        raise SdrecipeError(f"no environment for {profile} at {python.parent.parent}: "
                            f"run ./scripts/build-env.sh --profile {profile}")
    isolation, _ = network_isolation()  # the payload also blocks sockets itself
    result = subprocess.run(isolation + [str(python), str(PAYLOAD / "import_check.py")],
                            env=offline_run_env(deployment, profile), capture_output=True,
                            text=True)
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SdrecipeError(f"the import check could not run under {python} (exit "
                            f"{result.returncode}): {result.stderr.strip()[-2000:]}") from None
    return CheckResult(report["python"], report["rows"])


def print_check(result: CheckResult, profile: str):
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"import check: {profile} (Python {result.python}, offline)")
    for column in ("", "module", "version", "detail"):
        table.add_column(column, overflow="fold")
    for row in result.rows:
        mark = "[green]ok[/green]" if row["ok"] else "[red]FAIL[/red]"
        table.add_row(mark, row["name"], row["version"], row["detail"])
    Console(stderr=False).print(table)


# --- build ------------------------------------------------------------------------------------


def _stamp(lock, wheels: list[LocalFile], backend: str, python: str | None, deployment) -> str:
    inputs = {"version": STAMP_VERSION, "lock": sha256_file(lock.path),
              "wheels": sorted(w.sha256 for w in wheels), "backend": backend,
              "python": str(Path(python).resolve()) if python else None,
              "deployment": str(deployment.root)}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _owner_mark(prefix: Path) -> Path:
    """Written beside a prefix before sdrecipe creates it: a half-built env is still ours."""
    return prefix.parent / f".{prefix.name}.sdrecipe"


def _clear_prefix(prefix: Path):
    """Remove a previous build, but only one sdrecipe made: never a user's folder."""
    if prefix.exists():
        if _owner_mark(prefix).exists() or (prefix / "etc" / "sdrecipe").is_dir():
            shutil.rmtree(prefix)
        elif any(prefix.iterdir()):
            raise SdrecipeError(f"{prefix} exists, is not empty and was not built by sdrecipe: "
                                f"choose another --prefix or remove it yourself")
    _owner_mark(prefix).write_text("sdrecipe builds the environment next to this file\n")


def _load_lock(recipe, profile: str, backend: str):
    """The profile's lock; a conda part not locked yet is solved once and written into it."""
    from .lock import load_lock, lock_conda_part, lock_staleness
    lock = load_lock(recipe, profile)
    stale = lock_staleness(recipe, profile)
    if stale:
        print(f"warning: {stale}. Building the lock as committed.", file=sys.stderr)
    if backend != "venv" and not lock.conda:
        print(f"{lock.path} has no conda part yet: solving it once from env/ ...", file=sys.stderr)
        try:
            lock_conda_part(recipe, profile)
        except SdrecipeError as exc:
            raise SdrecipeError(f"{exc}\nOr build without conda: a venv of a Python "
                                f"{lock.python_version} interpreter, ./scripts/build-env.sh "
                                f"--profile {profile} --python /path/to/python{lock.python_version}"
                                ) from exc
        lock = load_lock(recipe, profile)
        print(f"wrote the conda part into {lock.path}; commit it so builds stay solver-free:\n"
              f"  git add {lock.path} && git commit -m 'lock: conda part of {profile}'",
              file=sys.stderr)
    return lock


@dataclass(frozen=True)
class Built:
    prefix: Path
    backend: str
    rebuilt: bool  # False: the stamp matched and nothing was done


def build_env(recipe, deployment, profile: str, prefix: Path | None = None,
              python: str | None = None, force: bool = False) -> Built:
    """Build the environment of `profile`, or confirm it is up to date (a no-op).

    Raises SdrecipeError naming the failing step. The import check is separate
    (`import_check`), so callers choose how to report it.
    """
    recipe.profile(profile)
    prefix = Path(prefix).expanduser().absolute() if prefix else deployment.env_prefix(profile)
    backend = choose_backend(python)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    deployment.state.mkdir(parents=True, exist_ok=True)
    with FileLock(str(prefix.parent / f".{prefix.name}.build.lock")):
        lock = _load_lock(recipe, profile, backend)
        wheel_dir = Path(load_config().get("wheel_dir")).expanduser()
        wheels = find_platform_wheels(recipe, profile, lock, wheel_dir)
        if any(entry.sha256 is None for entry in lock.platform_wheels):
            from .lock import load_lock
            lock = load_lock(recipe, profile)  # re-read: the hashes were just recorded
        stamp = _stamp(lock, wheels, backend, python, deployment)
        stamp_file = prefix / "etc" / "sdrecipe" / "stamp"
        if not force and stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
            print(f"the {profile} environment at {prefix} is up to date (lock, wheels and "
                  f"backend unchanged): nothing to do", file=sys.stderr)
            _write_record(deployment, profile, prefix, backend, stamp)
            return Built(prefix, backend, rebuilt=False)
        # Everything is downloaded and checked before the old environment is touched.
        cache = Path(load_config().get("cache_dir")).expanduser()
        if backend == "venv":
            check_python(python, lock)
        conda_files = [] if backend == "venv" else fetch_conda_packages(lock, cache / "conda-pkgs")
        pip_files = fetch_pip_files(lock, backend == "venv", cache / "pip")
        _clear_prefix(prefix)
        if backend == "venv":
            _run([python, "-m", "venv", prefix], "creating the venv",
                 fix=f"{python} must have its venv module and ensurepip (Debian/Ubuntu "
                     f"system Pythons: apt install python{lock.python_version}-venv)")
        elif backend == "rattler":
            create_rattler(prefix, lock, conda_files, cache / "conda-pkgs" / "rattler")
        else:
            with tempfile.TemporaryDirectory(prefix="sdrecipe-env-") as work:
                create_conda(backend, prefix, lock, conda_files, Path(work))
        install_pip_files(prefix, lock, wheels + pip_files)
        write_activation(recipe, deployment, profile, prefix)
        stamp_file.write_text(stamp + "\n")
        _write_record(deployment, profile, prefix, backend, stamp)
        print(f"built the {profile} environment at {prefix} ({backend})", file=sys.stderr)
    return Built(prefix, backend, rebuilt=True)


def _write_record(deployment, profile, prefix, backend, stamp, check_ok=None):
    """Remember where the env is (for --prefix builds) and whether its last check passed."""
    path = _record_path(deployment, profile)
    old = env_record(deployment, profile) or {}
    if check_ok is None and old.get("stamp") == stamp:
        check_ok = old.get("check_ok")
    atomic_write_text(path, json.dumps({"prefix": str(prefix), "backend": backend, "stamp": stamp,
                                        "check_ok": check_ok}, indent=2) + "\n")


# --- CLI ----------------------------------------------------------------------------------------


def _usage(deployment, profile: str) -> str:
    return (f"activate:  source {activation_script(deployment, profile)}\n"
            f"or:        module use {modulefile_path(deployment, profile).parent.parent}; "
            f"module load sdrecipe/{profile}")


def import_check_and_record(deployment, profile: str) -> CheckResult:
    """The import check, its outcome remembered in the build record (doctor, deploy read it)."""
    result = import_check(deployment, profile)
    record = env_record(deployment, profile)
    if record:
        _write_record(deployment, profile, Path(record["prefix"]), record["backend"],
                      record["stamp"], check_ok=result.ok)
    return result


def build_and_check(recipe, deployment, profile: str, prefix: Path | None = None,
                    python: str | None = None, force: bool = False,
                    check: bool = True) -> tuple[Built, CheckResult | None]:
    """Build (or confirm) the environment, then run the import check unless `check` is
    False or it already passed on this very build. The check result is None when skipped."""
    built = build_env(recipe, deployment, profile, prefix=prefix, python=python, force=force)
    record = env_record(deployment, profile) or {}
    if not check or (not built.rebuilt and record.get("check_ok")):
        return built, None
    return built, import_check_and_record(deployment, profile)


def build_command(ctx) -> int:
    args, profile = ctx.args, ctx.profile()
    _, result = build_and_check(ctx.recipe, ctx.deployment, profile, prefix=args.prefix,
                                python=args.python, force=args.force)
    if result is None:
        print(f"import check passed after the last build (rerun: sdrecipe env check "
              f"--profile {profile})\n" + _usage(ctx.deployment, profile))
        return 0
    return _report_check(ctx.deployment, profile, result)


def check_command(ctx) -> int:
    profile = ctx.profile()
    return _report_check(ctx.deployment, profile, import_check_and_record(ctx.deployment, profile))


def _report_check(deployment, profile: str, result: CheckResult) -> int:
    print_check(result, profile)
    print(_usage(deployment, profile))
    if not result.ok:
        print(f"import check failed for: {result.failed}; for the fix, run: sdrecipe doctor "
              f"--profile {profile}", file=sys.stderr)
        return 1
    return 0
