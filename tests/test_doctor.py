"""`sdrecipe doctor`: each diagnosis against the broken state it names, then the fixed state.

Every test builds the broken state for real (a shared library linked against a
libmpi that is gone, PyPI's real `clip` and `taming-transformers==0.0.1`
installed into a site-packages, a git checkout with the series not applied,
Lmod modules loaded or not) and checks the message and the fix; then repairs it
and checks the finding is gone. Environments here are bare folders with the
layout of a built env, not full builds: the full build is tested in test_env.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from env_helpers import DTK_MODULE, PY38, bash_environ, dtk_module_tree, lmod
from sdrecipe import doctor
from sdrecipe.config import Config
from sdrecipe.doctor import detect_profile
from sdrecipe.layout import Deployment
from sdrecipe.project import load_recipe
from sdrecipe.target import Target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def recipe():
    return load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")


def env_skeleton(deployment: Deployment, profile: str) -> Path:
    """An environment folder with a built env's layout: bin/python and site-packages."""
    prefix = deployment.env_prefix(profile)
    site = prefix / "lib" / "python3.8" / "site-packages"
    site.mkdir(parents=True)
    (prefix / "bin").mkdir()
    (prefix / "bin" / "python").symlink_to(PY38)
    return site


def target(recipe, deployment, profile, smoke=False) -> Target:
    """What the CLI hands doctor (no diagnosis reads the site config)."""
    return Target(recipe, deployment, profile, Config({}, None), smoke)


def run_check(name, recipe, deployment, profile, environ=None, smoke=False):
    ctx = doctor.DoctorContext(target(recipe, deployment, profile, smoke),
                               dict(os.environ if environ is None else environ))
    return list(doctor.DIAGNOSES[name].func(ctx))


def pip_target(site: Path, *requirements):
    """Install real PyPI packages (no deps) into a bare site-packages, for Python 3.8."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", "--python-version", "3.8", "--target", str(site),
                    *requirements], check=True)


def test_libmpi_not_found_is_found_by_ldd_and_fixed_by_the_env_lib(recipe, tmp_path):
    deployment = Deployment(tmp_path / "deploy")
    site = env_skeleton(deployment, "dtk-22.10")
    torch_lib = site / "torch" / "lib"
    torch_lib.mkdir(parents=True)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "mpi.c").write_text("int MPI_Init(int *c, char ***v) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libmpi.so.40", "-o",
                    str(stub / "libmpi.so.40"), str(stub / "mpi.c")], check=True)
    (stub / "libmpi.so").symlink_to("libmpi.so.40")
    # torch's layout: _C*.so -> lib/libtorch_cpu.so (rpath $ORIGIN/lib) -> libmpi.so.40
    (stub / "cpu.c").write_text("int MPI_Init(int *c, char ***v);\n"
                                "int start(void) { return MPI_Init(0, 0); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(torch_lib / "libtorch_cpu.so"),
                    str(stub / "cpu.c"), "-L", str(stub), "-lmpi"], check=True)
    (stub / "c.c").write_text("int start(void);\nint init(void) { return start(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o",
                    str(site / "torch" / "_C.cpython-38-x86_64-linux-gnu.so"), str(stub / "c.c"),
                    "-L", str(torch_lib), "-ltorch_cpu", "-Wl,-rpath,$ORIGIN/lib"], check=True)
    # A library torch opens only on demand, needing the CUDA driver: not an error.
    (stub / "nvrtc.c").write_text("int cuInit(unsigned f);\nint go(void) { return cuInit(0); }\n")
    (stub / "cuda.c").write_text("int cuInit(unsigned f) { return 0; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(stub / "libcuda.so"), str(stub / "cuda.c")], check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(torch_lib / "libcaffe2_nvrtc.so"),
                    str(stub / "nvrtc.c"), "-L", str(stub), "-lcuda"], check=True)
    environ = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}

    findings = run_check("shared-libraries", recipe, deployment, "dtk-22.10", environ)
    assert len(findings) == 1
    assert findings[0].symptom == ("OSError: libmpi.so.40: cannot open shared object file: "
                                   "No such file or directory")
    assert "_C.cpython-38-x86_64-linux-gnu.so" in findings[0].cause
    assert "openmpi=4.1.2" in findings[0].fix and "activate" in findings[0].fix

    # What the conda part's openmpi does: libmpi.so.40 in <prefix>/lib, on LD_LIBRARY_PATH.
    shutil.copy(stub / "libmpi.so.40", deployment.env_prefix("dtk-22.10") / "lib")
    assert run_check("shared-libraries", recipe, deployment, "dtk-22.10", environ) == []


TXT2IMG_HEAD = """import argparse, os, sys, glob
import cv2
import torch
from omegaconf import OmegaConf
from contextlib import contextmanager, nullcontext
x = torch.zeros(1)
{patch}
from ldm.util import instantiate_from_config
"""


def test_no_module_named_ldm_until_the_syspath_patch(recipe, tmp_path):
    """scripts/txt2img.py is a stand-in with upstream's import header (no upstream needed)."""
    deployment = Deployment(tmp_path / "deploy")
    env_skeleton(deployment, "cpu")
    source = deployment.source
    (source / "ldm").mkdir(parents=True)
    (source / "ldm" / "__init__.py").write_text("")
    (source / "ldm" / "util.py").write_text("def instantiate_from_config(c): return c\n")
    (source / "scripts").mkdir()
    script = source / "scripts" / "txt2img.py"
    script.write_text(TXT2IMG_HEAD.format(patch=""))

    findings = run_check("ldm-import", recipe, deployment, "cpu")
    assert [f.symptom for f in findings] == ["ModuleNotFoundError: No module named 'ldm'"]
    assert f"patch apply --profile cpu --source {source}" in findings[0].fix

    # The seed's hand fix, and the series' patch (a name defined first, then used).
    for patch in ('sys.path.append(os.path.join(os.path.dirname(__file__), ".."))',
                  "REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))\n"
                  "sys.path.insert(0, REPO_ROOT)"):
        script.write_text(TXT2IMG_HEAD.format(patch=patch))
        assert run_check("ldm-import", recipe, deployment, "cpu") == [], patch


def test_vectorquantizer2_missing_from_taming_0_0_1(recipe, tmp_path):
    deployment = Deployment(tmp_path / "deploy")
    site = env_skeleton(deployment, "cpu")
    pip_target(site, "taming-transformers==0.0.1")
    autoencoder = deployment.source / "ldm" / "models" / "autoencoder.py"
    autoencoder.parent.mkdir(parents=True)
    autoencoder.write_text("import torch\nfrom taming.modules.vqvae.quantize import "
                           "VectorQuantizer2 as VectorQuantizer\n")

    findings = run_check("taming-vectorquantizer", recipe, deployment, "cpu")
    assert [f.symptom for f in findings] == [
        "ImportError: cannot import name 'VectorQuantizer2' from 'taming.modules.vqvae.quantize'"]
    assert " patch apply --profile cpu --source " in findings[0].fix

    # The series' patch: import the class that taming 0.0.1 has.
    autoencoder.write_text("from taming.modules.vqvae.quantize import VectorQuantizer\n")
    assert run_check("taming-vectorquantizer", recipe, deployment, "cpu") == []


def test_pypi_clip_is_the_wrong_package(recipe, tmp_path):
    deployment = Deployment(tmp_path / "deploy")
    site = env_skeleton(deployment, "cpu")
    pip_target(site, "clip==0.2.0")

    findings = run_check("clip-package", recipe, deployment, "cpu")
    assert [f.symptom for f in findings] == ["AttributeError: module 'clip' has no attribute 'load'"]
    assert "clipboard" in findings[0].cause and "clip-anytorch" in findings[0].fix

    shutil.rmtree(site)
    site.mkdir()
    pip_target(site, "clip-anytorch==2.6.0")
    assert run_check("clip-package", recipe, deployment, "cpu") == []


def test_missing_local_hf_models_mean_a_hub_connection_error(recipe, tmp_path):
    deployment = Deployment(tmp_path / "deploy")
    findings = run_check("local-hf-models", recipe, deployment, "cpu")
    assert len(findings) == 2
    assert all("We couldn't connect to 'https://huggingface.co'" in f.symptom for f in findings)
    assert {"CompVis/stable-diffusion-safety-checker" in f.symptom for f in findings} == {True, False}
    assert all(f.fix.startswith(f"`sdrecipe --deploy-dir {deployment.root} fetch --profile cpu")
               for f in findings)

    folders = doctor.local_hf_models(recipe, "cpu")  # derived from the recipe's artifacts
    assert folders == {"stable-diffusion-safety-checker": "CompVis/stable-diffusion-safety-checker",
                       "clip-vit-large-patch14": "openai/clip-vit-large-patch14"}
    for folder in folders:
        (deployment.models / folder).mkdir(parents=True)
        (deployment.models / folder / "config.json").write_text("{}")
    assert run_check("local-hf-models", recipe, deployment, "cpu") == []


def test_kornia_downloads_hardnet_without_the_preseed(recipe, tmp_path):
    deployment = Deployment(tmp_path / "deploy")
    site = env_skeleton(deployment, "cpu")
    (site / "kornia").mkdir()

    findings = run_check("kornia-hardnet", recipe, deployment, "cpu")
    assert len(findings) == 1
    assert "checkpoint_liberty_with_aug.pth" in findings[0].symptom
    assert str(deployment.torch_home) in findings[0].cause
    assert findings[0].fix.startswith(f"`sdrecipe --deploy-dir {deployment.root} fetch "
                                      "--profile cpu")

    # where kornia 0.6's torch.hub.load_state_dict_from_url looks
    checkpoint = deployment.torch_home / "hub/checkpoints/checkpoint_liberty_with_aug.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    assert run_check("kornia-hardnet", recipe, deployment, "cpu") == []


def test_smoke_mode_is_diagnosed_against_smokes_own_models(recipe, tmp_path):
    """After `deploy --smoke` the tiny stand-ins live in <deploy>/smoke/ and the real
    folders stay empty: a smoke target is checked there, and its fix is smoke's deploy."""
    deployment = Deployment(tmp_path / "deploy")

    def hub_errors(smoke):
        return [f for f in doctor.diagnose(target(recipe, deployment, "cpu", smoke))
                if f.check == "local-hf-models"]

    assert len(hub_errors(smoke=True)) == 2
    assert all(str(deployment.smoke / "models") in f.cause
               and f.fix.startswith(f"`sdrecipe --deploy-dir {deployment.root} deploy --profile cpu "
                                    "--smoke") for f in hub_errors(smoke=True))
    for folder in doctor.local_hf_models(recipe, "cpu"):  # what the smoke generator writes
        (deployment.smoke / "models" / folder).mkdir(parents=True)
        (deployment.smoke / "models" / folder / "config.json").write_text("{}")
    assert hub_errors(smoke=True) == []
    assert len(hub_errors(smoke=False)) == 2  # the real models are still missing

    site = env_skeleton(deployment, "cpu")
    (site / "kornia").mkdir()
    findings = run_check("kornia-hardnet", recipe, deployment, "cpu", smoke=True)
    assert [str(deployment.smoke / "torch-home") in f.cause for f in findings] == [True]
    standin = deployment.smoke / "torch-home/hub/checkpoints/checkpoint_liberty_with_aug.pth"
    standin.parent.mkdir(parents=True)
    standin.write_bytes(b"random weights")
    assert run_check("kornia-hardnet", recipe, deployment, "cpu", smoke=True) == []


def lmod_environ(tmp_path: Path, *load) -> dict:
    """The environment after real Lmod `module load` from a stand-in DTK module tree."""
    tree = dtk_module_tree(tmp_path / "site-modules")
    return bash_environ(lmod(f"module use {tree}\n" + "".join(f"module load {m}\n" for m in load)))


def test_dtk_module_not_loaded(recipe, tmp_path):
    environ = lmod_environ(tmp_path)
    findings = run_check("modules", recipe, Deployment(tmp_path / "d"), "dtk-22.10", environ)
    assert [f.fix for f in findings] == [f"module load {DTK_MODULE}"]
    assert findings[0].symptom.startswith(f"module {DTK_MODULE} is not loaded")

    loaded = lmod_environ(tmp_path, DTK_MODULE)
    assert run_check("modules", recipe, Deployment(tmp_path / "d"), "dtk-22.10", loaded) == []
    assert detect_profile(loaded) == "dtk-22.10"


def fake_tool(folder: Path, name: str, output: str):
    """A stand-in for a vendor tool (hy-smi, nvidia-smi): no accelerators on this machine."""
    folder.mkdir(exist_ok=True)
    tool = folder / name
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    tool.chmod(0o755)


def test_no_accelerator_visible_and_profile_detection(recipe, tmp_path):
    """hy-smi and nvidia-smi are stand-ins printing their real output format."""
    bare = {"PATH": "/usr/bin:/bin"}
    findings = run_check("accelerator", recipe, Deployment(tmp_path / "d"), "dtk-22.10", bare)
    assert [f.severity for f in findings] == ["warning"]
    assert "no DCU visible" in findings[0].symptom and "--gres=dcu:1" in findings[0].fix
    assert detect_profile(bare) == "cpu"

    tools = tmp_path / "tools"
    fake_tool(tools, "hy-smi", "============ System Management Interface ============\n"
                               "DCU[0]\t\t: Device ID: 0x66a1\n"
                               "DCU[1]\t\t: Device ID: 0x66a1\n"
                               "=============== End of SMI Log ======================")
    with_dcu = {"PATH": f"{tools}:/usr/bin:/bin"}
    assert run_check("accelerator", recipe, Deployment(tmp_path / "d"), "dtk-22.10", with_dcu) == []
    assert doctor.visible_devices(with_dcu) == {"dcu": 2}
    assert detect_profile(with_dcu) == "dtk-22.10"

    (tools / "hy-smi").unlink()
    fake_tool(tools, "nvidia-smi", "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-0000)")
    assert detect_profile(with_dcu) == "cuda"
    assert run_check("accelerator", recipe, Deployment(tmp_path / "d"), "cuda", with_dcu) == []


def test_unapplied_patch_series(tmp_path):
    from patch_fixtures import build_template, git
    from sdrecipe.patches import apply_series
    template = build_template(tmp_path / "template")
    recipe = load_recipe(template["project"] / "recipe" / "test.yaml")
    deployment = Deployment(tmp_path / "deploy")
    deployment.root.mkdir()
    git(deployment.root, "clone", "-q", str(template["upstream"]), str(deployment.source))

    findings = run_check("patch-series", recipe, deployment, "cpu")
    assert len(findings) == 1
    assert findings[0].symptom == f"patch series is pristine on {deployment.source}"
    assert "0001-main-syspath.patch" in findings[0].cause
    assert findings[0].fix == (f"`sdrecipe --recipe {recipe.path.resolve()} --deploy-dir "
                               f"{deployment.root} patch apply --profile cpu --source "
                               f"{deployment.source}`")  # runs as printed, for this deployment

    apply_series(deployment.source, recipe, "cpu")
    assert run_check("patch-series", recipe, deployment, "cpu") == []

    # one character edited in a patched file: "edited by hand", not "not applied"
    patched = git(deployment.source, "diff", "--name-only", "HEAD").split()[0]
    edited = deployment.source / patched
    edited.write_text(edited.read_text().replace("\n", " \n", 1))
    [finding] = run_check("patch-series", recipe, deployment, "cpu")
    assert "edited by hand" in finding.cause and "not applied" not in finding.cause
    assert edited.relative_to(deployment.source).as_posix() in finding.cause
    assert finding.fix.endswith(f"patch apply --profile cpu --source {deployment.source} --force`")


def test_stale_lock(tmp_path):
    project = tmp_path / "project"
    for folder in ("recipe", "env", "lock", "patches"):
        shutil.copytree(ROOT / folder, project / folder)
    recipe = load_recipe(project / "recipe" / "stable-diffusion.yaml")
    deployment = Deployment(tmp_path / "deploy")
    assert run_check("stale-lock", recipe, deployment, "cpu") == []

    base = project / "env" / "environment.yaml"
    base.write_text(base.read_text().replace("einops==0.3.0", "einops==0.4.1"))
    findings = run_check("stale-lock", recipe, deployment, "cpu")
    assert [f.symptom for f in findings] == ["lock/cpu.conda-lock.yml is stale"]
    assert "content hash" in findings[0].cause
    assert findings[0].fix.startswith(f"`sdrecipe --recipe {recipe.path.resolve()} lock --profile cpu`")


def test_doctor_command_reports_and_fails(tmp_path):
    """The CLI runs every diagnosis; an empty deployment has errors with fixes, exit 1."""
    result = subprocess.run([str(ROOT / "scripts" / "sdrecipe"), "--deploy-dir", str(tmp_path),
                             "doctor", "--profile", "cpu"], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "[env-built]" in result.stdout
    assert f"--deploy-dir {tmp_path} env build --profile cpu`\n" in result.stdout  # one line, whole
    assert "[local-hf-models]" in result.stdout


@pytest.mark.upstream
def test_missing_local_models_quote_what_the_patched_tree_prints(recipe, tmp_path, upstream):
    """With the series applied, upstream no longer tries the Hub: patch 0003 raises its own
    FileNotFoundError, and that is what doctor says a user would see."""
    from sdrecipe.patches import apply_series
    from sdrecipe.source import ensure_source
    deployment = Deployment(tmp_path / "deploy")
    ensure_source(recipe, deployment.source, "cpu", local=upstream)
    apply_series(deployment.source, recipe, "cpu")
    findings = run_check("local-hf-models", recipe, deployment, "cpu")
    assert len(findings) == 2
    for finding in findings:
        assert finding.symptom.startswith("FileNotFoundError: local model folder "
                                          f"{deployment.models}/")
        assert "is missing: `sdrecipe fetch` places it there" in finding.symptom
