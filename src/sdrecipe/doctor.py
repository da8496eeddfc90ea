"""What is wrong with a deployment, and the fix for each problem (`sdrecipe doctor`).

Each error the seed met by hand (and the ones it would have met next) has one
registered diagnosis here: a small function, decorated with `@diagnosis`, that
looks at the deployment, the built environment or this machine and returns
`Finding`s carrying the exact error text a user would see and the command that
fixes it. The checks look (files, ldd, the env's own metadata); they do not
import torch, so doctor stays fast on a login node.

`detect_profile()` also lives here: it is the same question (what is this
machine?) that the accelerator diagnosis asks.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import SdrecipeError
from .target import Target, recipe_command


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    check: str
    symptom: str  # the error text a user meets, as the seed met it
    cause: str
    fix: str


@dataclass
class DoctorContext:
    """What a diagnosis looks at: the run's target (recipe, deployment, profile, mode) and
    the process environment it would run in (tests pass one of their own)."""

    target: Target
    environ: dict = field(default_factory=lambda: dict(os.environ))

    @property
    def recipe(self):
        return self.target.recipe

    @property
    def deployment(self):
        return self.target.deployment

    @property
    def profile(self) -> str:
        return self.target.profile

    @property
    def smoke(self) -> bool:
        return self.target.smoke

    @property
    def models(self):
        """The weights a run in the target's mode loads: the deployment's, or smoke's."""
        from .models import models_for
        return models_for(self.recipe, self.deployment, self.profile, self.smoke)

    def fetch_fix(self, how: str) -> str:
        """What puts the mode's model files in place: fetch (`how` it helps), or for smoke
        mode its deploy, which generates them."""
        if self.smoke:
            return f"{self.target.command('deploy')}   (its preseed stage makes the tiny stand-ins)"
        return f"{self.target.command('fetch')}   ({how})"

    def lock_command(self) -> str:
        return recipe_command(self.recipe, "lock", "--profile", self.profile)

    def build_command(self, *args) -> str:
        return self.target.command("env build", *args)

    def apply_command(self, *args) -> str:
        return self.target.command("patch apply", "--source", self.deployment.source, *args)

    @property
    def prefix(self) -> Path:
        from .environment.location import env_prefix
        return env_prefix(self.deployment, self.profile)

    @property
    def python(self) -> Path:
        from .environment.location import env_python
        return env_python(self.deployment, self.profile)

    def site_packages(self) -> Path | None:
        found = sorted(self.prefix.glob("lib/python3*/site-packages"))
        return found[0] if found else None

    def activated(self) -> dict:
        """The environment a process inside the env runs with (as the import check's)."""
        from .environment.runtime import offline_run_env
        return offline_run_env(self.deployment, self.profile, self.environ)


@dataclass(frozen=True)
class Diagnosis:
    name: str
    description: str
    func: Callable[[DoctorContext], Iterable[Finding]]


DIAGNOSES: dict[str, Diagnosis] = {}


def diagnosis(name: str, description: str):
    """Register a diagnosis: a function of DoctorContext returning Findings."""
    def register(func):
        DIAGNOSES[name] = Diagnosis(name, description, func)
        return func
    return register


def _finding(check, symptom, cause, fix, severity="error") -> Finding:
    return Finding(severity, check, symptom, cause, fix)


# --- the environment ---------------------------------------------------------------------


@diagnosis("env-built", "the profile's environment exists")
def check_env_built(ctx):
    if not ctx.python.exists():
        yield _finding("env-built", f"{ctx.python}: No such file or directory",
                       f"the {ctx.profile} environment has not been built",
                       ctx.build_command())


@diagnosis("stale-lock", "the lock matches env/ (else the env was built from an old lock)")
def check_stale_lock(ctx):
    from .lock import lock_staleness
    reason = lock_staleness(ctx.recipe, ctx.profile)
    if reason:
        yield _finding("stale-lock", f"lock/{ctx.profile}.conda-lock.yml is stale", reason,
                       f"{ctx.lock_command()}, commit the lock, then {ctx.build_command()}")


def _missing_libraries(library: Path, environ: dict) -> list[str]:
    result = subprocess.run(["ldd", str(library)], capture_output=True, text=True, env=environ)
    return re.findall(r"^\s*(\S+) => not found", result.stdout, re.M)


@diagnosis("shared-libraries", "what `import torch` loads resolves under the activated env (ldd)")
def check_shared_libraries(ctx):
    # Only torch._C and what it needs, as ldd resolves them: libraries torch opens
    # lazily (libcaffe2_nvrtc needs the CUDA driver) are no error on a CPU node.
    site = ctx.site_packages()
    extensions = sorted(site.glob("torch/_C*.so")) if site else []
    environ = ctx.activated()
    missing: dict[str, list[str]] = {}
    for library in extensions:
        for name in _missing_libraries(library, environ):
            missing.setdefault(name, []).append(library.name)
    modules = " ".join(ctx.recipe.profile(ctx.profile).modules)
    for name, users in sorted(missing.items()):
        symptom = f"OSError: {name}: cannot open shared object file: No such file or directory"
        needed_by = f"`import torch` loads torch/{users[0]}, whose dependencies need {name}"
        if name.startswith("libmpi"):
            fix = (f"the lock's conda part installs openmpi=4.1.2, which puts {name} in "
                   f"{ctx.prefix}/lib: build with a conda backend ({ctx.build_command()} "
                   f"without --python) and activate it (source "
                   f"{ctx.prefix}/etc/sdrecipe/activate.sh sets LD_LIBRARY_PATH); with a venv, "
                   f"module load the site's OpenMPI 4")
        elif modules:
            fix = f"module load {modules}, then activate the environment"
        else:
            fix = f"rebuild the environment: {ctx.build_command('--force')}"
        yield _finding("shared-libraries", symptom, needed_by + " and nothing on "
                       "LD_LIBRARY_PATH or the system's library path provides it", fix)


def _distribution_names(site: Path) -> dict[str, Path]:
    """Installed distributions by normalised name -> their dist-info folder."""
    names = {}
    for info in site.glob("*.dist-info"):
        meta = info / "METADATA"
        text = meta.read_text(errors="replace") if meta.is_file() else ""
        found = re.search(r"^Name:\s*(\S+)", text, re.M)
        if found:
            names[re.sub(r"[-_.]+", "-", found.group(1)).lower()] = info
    return names


@diagnosis("clip-package", "`import clip` is OpenAI's CLIP (clip-anytorch), not PyPI's `clip`")
def check_clip_package(ctx):
    site = ctx.site_packages()
    if not site:
        return
    installed = _distribution_names(site)
    if "clip" in installed:
        yield _finding("clip-package", "AttributeError: module 'clip' has no attribute 'load'",
                       f"PyPI's package named 'clip' ({installed['clip'].name}) is an unrelated "
                       f"clipboard tool; upstream needs OpenAI's CLIP",
                       f"{ctx.python} -m pip uninstall -y clip, then "
                       f"{ctx.build_command('--force')} (the lock pins clip-anytorch)")


def _class_names(path: Path) -> set[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return set()
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


def _imported_names(path: Path, module: str) -> set[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return set()
    return {alias.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == module for alias in node.names}


@diagnosis("taming-vectorquantizer", "upstream's taming import matches the installed taming")
def check_taming(ctx):
    site, source = ctx.site_packages(), ctx.deployment.source
    quantize = site / "taming" / "modules" / "vqvae" / "quantize.py" if site else None
    if not quantize or not quantize.is_file():
        return
    wanted = _imported_names(source / "ldm" / "models" / "autoencoder.py",
                             "taming.modules.vqvae.quantize")
    missing = sorted(wanted - _class_names(quantize))
    for name in missing:
        yield _finding("taming-vectorquantizer",
                       f"ImportError: cannot import name '{name}' from "
                       f"'taming.modules.vqvae.quantize'",
                       f"{source}/ldm/models/autoencoder.py imports {name}, which the installed "
                       f"taming-transformers ({quantize}) does not define",
                       f"apply the patch series: {ctx.apply_command()}")


# --- the upstream checkout and its data ----------------------------------------------------------


# Runs in the env's Python before the replayed statements: which imports are stdlib.
_REPLAY_PRELUDE = """\
import importlib.util as _util, sys as _sys, sysconfig as _sysconfig
_STD = tuple(_sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib"))
def _is_std(name):
    spec = _util.find_spec(name.split(".")[0])
    origin = (spec.origin or "") if spec else ""
    return bool(spec) and "-packages" not in origin and (
        origin in ("built-in", "frozen") or origin.startswith(_STD))
"""


def _replay_statement(node, text: str) -> str | None:
    """One top-level statement of the script, made safe to run without its third-party imports."""
    if isinstance(node, ast.Import):
        return "\n".join(f"if _is_std({a.name!r}): {ast.unparse(ast.Import([a]))}"
                         for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return f"if _is_std({node.module or ''!r}): {text}" if node.level == 0 else None
    # sys.path edits and what they use (REPO_ROOT = ...); NameError: it used a skipped import
    return "try:\n" + textwrap.indent(text, "    ") + "\nexcept NameError:\n    pass"


def _ldm_importable_from_script(python: Path, script: Path, environ: dict) -> str | None:
    """Replay the script's top level up to its first `ldm` import; return the error, if any.

    Third-party imports are skipped (so torch is not imported), everything else runs
    as `python scripts/txt2img.py` would run it: sys.path[0] is scripts/.
    """
    source = script.read_text(encoding="utf-8")
    replayed = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ldm":
            replayed.append("if _util.find_spec('ldm') is None: "
                            "raise ModuleNotFoundError(\"No module named 'ldm'\")")
            break
        statement = _replay_statement(node, ast.get_source_segment(source, node) or "")
        if statement:
            replayed.append(statement)
    program = (f"import sys; sys.path[0] = {str(script.parent)!r}; __file__ = {str(script)!r}\n"
               + _REPLAY_PRELUDE + "\n".join(replayed) + "\n")
    result = subprocess.run([str(python), "-c", program], capture_output=True, text=True,
                            cwd=str(script.parent.parent), env=environ)
    if result.returncode != 0:
        return (result.stderr.strip().splitlines() or ["exit %d" % result.returncode])[-1]
    return None


@diagnosis("ldm-import", "scripts/txt2img.py can import the ldm package")
def check_ldm_import(ctx):
    script = ctx.deployment.source / "scripts" / "txt2img.py"
    if not script.is_file() or not ctx.python.exists():
        return
    error = _ldm_importable_from_script(ctx.python, script, ctx.activated())
    if error:
        yield _finding("ldm-import", error,
                       "python puts scripts/ (not the repository root) on sys.path, and the "
                       "sys.path patch of the series is not applied",
                       ctx.apply_command())


@diagnosis("patch-series", "the recipe's patch series is applied to the deployed checkout")
def check_patch_series(ctx):
    source = ctx.deployment.source
    if not (source / ".git").exists() or not ctx.recipe.series(ctx.profile):
        return
    from .patches import tree_state
    try:
        state = tree_state(source, ctx.recipe, ctx.profile)
    except SdrecipeError as exc:
        yield _finding("patch-series", str(exc), "the checkout is not the pinned upstream",
                       f"redeploy the source: {ctx.target.command('fetch')}")
        return
    if state.drifted:
        yield _finding("patch-series", f"patch series is {state.state} on {source}",
                       "edited by hand (neither pristine nor patched): "
                       + ", ".join(state.drifted),
                       f"save your edits (git -C {shlex.quote(str(source))} diff > my.patch), "
                       f"then {ctx.apply_command('--force')}")
    elif state.state != "applied":
        pending = [p.entry.file for p in state.patches if p.state != "applied"]
        yield _finding("patch-series", f"patch series is {state.state} on {source}",
                       "not applied: " + ", ".join(pending) if pending else state.state,
                       ctx.apply_command())


def _missing_model_error(ctx, path: Path, folder: str, repo: str) -> str:
    """What txt2img prints for a missing local model: the patched tree's own error (patch
    0003's `local_model_dir`), or, unpatched, transformers' try of the Hub."""
    source = ctx.deployment.source
    if (source / ".git").exists():
        from .patches import tree_state
        try:
            patched = tree_state(source, ctx.recipe, ctx.profile).state == "applied"
        except SdrecipeError:
            patched = False
        if patched:
            return (f"FileNotFoundError: local model folder {path} is missing: `sdrecipe fetch` "
                    f"places it there, or set SD_MODELS_DIR to the folder that holds {folder}/")
    return f"OSError: We couldn't connect to 'https://huggingface.co' to load this model ({repo})"


def local_hf_models(recipe, profile: str) -> dict[str, str]:
    """Folder under models/ -> the Hub repo upstream loaded it from: each model the
    recipe's artifacts place as a local transformers folder (the ones with a config.json)."""
    from .artifacts import select
    return {Path(f.dest).parent.as_posix(): f.repo for f in select(recipe, profile)
            if f.root == "models" and f.repo and Path(f.dest).name == "config.json"}


@diagnosis("local-hf-models", "the safety checker and CLIP are read from local folders")
def check_local_models(ctx):
    for folder, repo in local_hf_models(ctx.recipe, ctx.profile).items():
        path = ctx.models.models_dir / folder
        if not (path / "config.json").is_file():
            yield _finding("local-hf-models", _missing_model_error(ctx, path, folder, repo),
                           f"{path}/config.json is missing, so the patched upstream has no local "
                           f"copy and transformers tries the Hub (offline here)",
                           ctx.fetch_fix("on a login node with internet or a mirror; or "
                                         "bundle restore for air-gapped sites"))


@diagnosis("kornia-hardnet", "kornia's HardNet checkpoint is preseeded in TORCH_HOME")
def check_hardnet(ctx):
    site = ctx.site_packages()
    if not site or not (site / "kornia").is_dir():
        return
    from .artifacts import select
    # what the recipe preseeds into TORCH_HOME: the checkpoints torch.hub would download
    # (smoke mode has a TORCH_HOME of its own, with a stand-in at the same place)
    for preseed in (f for f in select(ctx.recipe, ctx.profile) if f.root == "torch_home"):
        checkpoint = (ctx.models.torch_home / preseed.dest if ctx.smoke
                      else preseed.target(ctx.deployment))
        if not checkpoint.is_file():
            yield _finding("kornia-hardnet",
                           f"Downloading: \".../{checkpoint.name}\" to {checkpoint} "
                           f"(hangs offline)",
                           f"kornia 0.6 builds HardNet(pretrained=True) at import and "
                           f"{checkpoint} is missing",
                           ctx.fetch_fix("preseeds TORCH_HOME; activation points TORCH_HOME "
                                         "there"))


# --- this machine ------------------------------------------------------------------------------


def _loaded_modules(environ) -> list[str]:
    return [m for m in environ.get("LOADEDMODULES", "").split(":") if m]


@diagnosis("modules", "the profile's Lmod modules are loaded (DTK for dtk-22.10)")
def check_modules(ctx):
    loaded = _loaded_modules(ctx.environ)
    for module in ctx.recipe.profile(ctx.profile).modules:
        if module not in loaded:
            yield _finding("modules", f"module {module} is not loaded "
                           f"(loaded: {', '.join(loaded) or 'none'})",
                           "torch of DTK 22.10 needs the DTK runtime (HIP, rocBLAS, MIOpen) "
                           "that this module puts on the library path",
                           f"module load {module}")


def visible_devices(environ=None) -> dict[str, int]:
    """Accelerators the vendor tools on PATH can see: {"dcu": n, "cuda": n}."""
    environ = os.environ if environ is None else environ
    counts = {}
    # hy-smi is DTK's rocm-smi: both list one `DCU[n]`/`GPU[n]` line per device with --showid.
    for kind, command, pattern in (("dcu", ["hy-smi", "--showid"], r"^\s*(DCU|GPU)\[\d+\]"),
                                   ("dcu", ["rocm-smi", "--showid"], r"^\s*(DCU|GPU)\[\d+\]"),
                                   ("cuda", ["nvidia-smi", "-L"], r"^GPU \d+:")):
        tool = shutil.which(command[0], path=environ.get("PATH"))
        if not tool or counts.get(kind):
            continue
        try:
            out = subprocess.run([tool] + command[1:], capture_output=True, text=True,
                                 timeout=20, env=environ)
        except (OSError, subprocess.TimeoutExpired):
            continue
        ids = {line.split()[0].split(":")[0] for line in out.stdout.splitlines()
               if re.match(pattern, line)} if out.returncode == 0 else set()
        counts[kind] = len(ids)
    return counts


@diagnosis("accelerator", "an accelerator of the profile's kind is visible")
def check_accelerator(ctx):
    kind = ctx.recipe.profile(ctx.profile).accelerator
    if kind == "none":
        return
    tool = "hy-smi or rocm-smi" if kind == "dcu" else "nvidia-smi"
    if not visible_devices(ctx.environ).get(kind):
        gres = "dcu" if kind == "dcu" else "gpu"
        yield _finding("accelerator", f"no {kind.upper()} visible ({tool} lists none or is "
                       f"not on PATH)", "this is a login node, or the job did not request "
                       "accelerators", f"run on a compute node: salloc -p <partition> -N 1 "
                       f"--gres={gres}:1 (or sdrecipe submit)", severity="warning")


def detect_profile(environ=None) -> str:
    """dtk-22.10 when the DTK module is loaded or DCUs are visible, cuda for NVIDIA GPUs, else cpu."""
    environ = os.environ if environ is None else environ
    if any("dtk" in module.lower() for module in _loaded_modules(environ)):
        return "dtk-22.10"
    devices = visible_devices(environ)
    if devices.get("dcu"):
        return "dtk-22.10"
    if devices.get("cuda"):
        return "cuda"
    return "cpu"


# --- running --------------------------------------------------------------------------------------


def diagnose(target: Target, environ=None) -> list[Finding]:
    """Every registered diagnosis' findings for `target`, in the environment `environ`
    (default: this process's)."""
    ctx = DoctorContext(target, dict(os.environ if environ is None else environ))
    findings: list[Finding] = []
    for registered in DIAGNOSES.values():
        findings.extend(registered.func(ctx) or ())
    return findings
