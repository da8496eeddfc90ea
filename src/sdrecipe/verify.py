"""Verify: run upstream's txt2img.py once, judge the result, write a report.

The seed waited minutes for "Enjoy." and looked at six images by eye. Here a short,
recipe-configured sample (1 image, fixed seed, PLMS, few steps; `verify:` section of
the recipe, per profile, plus `smoke:` settings) runs the REAL upstream script inside
the built environment, from a scratch working directory outside the repo, with
`HF_HUB_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1` and, where the machine allows it, no
network at all (`unshare -n`, else `unshare -rn`): a deployment that passes needs
nothing from outside. Each check is a small function returning a `CheckResult`;
any failed check fails the verify stage (exit 1) and the log tail is shown.

Report folder (default `<deploy>/reports/<profile>/{sample,smoke}/`):
    report.json   the contract below (the slurm stage reads and writes the same format)
    report.html   self-contained: inline thumbnails, settings, timings, provenance
    samples/*.png the images txt2img wrote
    txt2img.log   the full console output (stdout and stderr, one line per tqdm update),
                  each line prefixed with the seconds since the process started

report.json (all keys always present; paths relative to the report folder):
    {"ok": bool,                      every check passed
     "profile": str,                  dtk-22.10 | cuda | cpu
     "smoke": bool,                   tiny random models instead of the real weights
     "prompt": str,
     "settings": {"seed", "steps", "height", "width", "scale", "precision", "sampler",
                  "n_samples", "network"},   network: how the run was isolated
     "checks": [{"name": str, "ok": bool, "message": str}, ...],
     "images": ["samples/00000.png", ...],
     "timings": {"startup_s", "model_load_s", "sampling_s", "denoise_s", "total_s"},
                 seconds or null when the marker line was never printed; plus
                 "integrity_s" when the model files were proven first (the "integrity"
                 check: hash before unpickle, stages/verify.prove_models)
     "provenance": {"upstream_commit", "patches": [{"file", "sha256", "state"}],
                    "lock_hash", "recipe_sha256", "runtime": {"python", "torch",
                    "transformers", "diffusers", "device", "backend"}, "models": str},
     "log": "txt2img.log",
     "created": ISO-8601 UTC time}

Timings are wall-clock times between console lines as the engine receives them
(the child runs unbuffered): startup = process start to "Loading model from"
(imports + loading the safety checker), model_load = that to "Creating invisible
watermark encoder" (torch.load, instantiate, to device), sampling = that to
"Enjoy." (text encoding, PLMS, decoding, safety check, watermark, saving),
denoise = first to last "PLMS Sampler" progress update (the denoising loop alone).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from .environment.location import env_python
from .environment.runtime import network_isolation, offline_run_env, payload_path
from .errors import SdrecipeError
from .models import MODELS_ENV, Models, models_for
from .schema import Node

COMPLETION_LINE = "Enjoy."
REPORT_MARK = ".sdrecipe-report"  # written before samples/: this folder is verify's
REPLACEMENT_IMAGE = "assets/rick.jpeg"  # what upstream's txt2img shows instead of a flagged sample
# Below these, an image carries no picture (0..255 grey levels). A watermarked
# constant image still has a standard deviation under 2.
MIN_STDDEV = 4.0
MAX_REPLACEMENT_DIFF = 12.0  # mean absolute difference to the resized replacement image
MARKERS = {"load": "Loading model from", "sample": "Creating invisible watermark encoder",
           "denoise": "PLMS Sampler", "done": COMPLETION_LINE}


# --- the recipe's `verify:` section ---------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """What one verification sample runs with."""
    prompt: str
    seed: int
    steps: int
    height: int
    width: int
    scale: float
    precision: str  # txt2img --precision: full | autocast
    sampler: str = "plms"
    n_samples: int = 1

    def txt2img_settings(self) -> dict:
        """These settings in the payload's terms (`txt2img_batch.txt2img_args`), one pass."""
        return {"seed": self.seed, "steps": self.steps, "n_samples": self.n_samples, "n_iter": 1,
                "H": self.height, "W": self.width, "scale": self.scale,
                "precision": self.precision, "sampler": self.sampler}


@dataclass(frozen=True)
class VerifySpec:
    base: Sample
    profiles: dict  # profile -> dict of overrides
    smoke: dict  # overrides for --smoke

    def sample(self, profile: str, smoke: bool = False) -> Sample:
        chosen = replace(self.base, **self.profiles.get(profile, {}))
        return replace(chosen, **self.smoke) if smoke else chosen


_OVERRIDES = ("size", "steps", "precision", "scale")


def _overrides(node: Node) -> dict:
    node.keys(optional=_OVERRIDES)
    out = {}
    if node.has("size"):
        size = node.get("size", int)
        # f=8 latents, two UNet levels, and imwatermark refuses images under 256x256
        if size.value < 256 or size.value % 64:
            raise size.error("expected a multiple of 64, at least 256 "
                             "(txt2img's watermark step refuses smaller images)")
        out["height"] = out["width"] = size.value
    if node.has("steps"):
        steps = node.get("steps", int)
        if not 1 <= steps.value <= 1000:
            raise steps.error("expected 1 to 1000 sampling steps")
        out["steps"] = steps.value
    if node.has("precision"):
        precision = node.get("precision", str)
        if precision.value not in ("full", "autocast"):
            raise precision.error("expected full or autocast (txt2img --precision)")
        out["precision"] = precision.value
    if node.has("scale"):
        scale = node.get("scale")
        if isinstance(scale.value, bool) or not isinstance(scale.value, (int, float)):
            raise scale.error(f"expected a number (guidance scale), got {scale.value!r}")
        out["scale"] = float(scale.value)
    return out


def parse_section(node: Node, recipe) -> VerifySpec:
    """Parse the recipe's `verify:` section (wired in by project.load_recipe).

        verify:
          prompt: a photograph of a cat ...      # required
          seed: 42                               # required
          defaults: {size: 512, steps: 20, precision: autocast, scale: 7.5}
          profiles:                              # optional overrides per recipe profile
            cpu: {size: 256, steps: 10, precision: full}
          smoke: {size: 256, steps: 5, precision: full}   # overrides for --smoke

    size: square image side, a multiple of 64 and at least 256 (txt2img's watermark);
    steps: PLMS steps, 1-1000; precision: txt2img --precision, full or autocast;
    scale: guidance scale. One image per run, always.
    """
    node.keys(required=("prompt", "seed"), optional=("defaults", "profiles", "smoke"))
    defaults = _overrides(node.get("defaults")) if node.has("defaults") else {}
    base = Sample(prompt=node.text("prompt"), seed=node.get("seed", int).value,
                  steps=defaults.get("steps", 10), height=defaults.get("height", 512),
                  width=defaults.get("width", 512), scale=defaults.get("scale", 7.5),
                  precision=defaults.get("precision", "autocast"))
    profiles = {}
    if node.has("profiles"):
        for name, item in node.get("profiles").entries():
            if name not in recipe.profiles:
                raise item.error(f"unknown profile (the recipe defines: {', '.join(recipe.profiles)})")
            profiles[name] = _overrides(item)
    smoke = _overrides(node.get("smoke")) if node.has("smoke") else {}
    return VerifySpec(base=base, profiles=profiles, smoke=smoke)


def verify_spec(recipe) -> VerifySpec:
    spec = recipe.sections.get("verify")
    if spec is None:
        raise SdrecipeError(f"{recipe.path}: no 'verify:' section: add one with prompt, seed "
                            "and per-profile steps/size (see docs/deploy.md, 'Verify')")
    return spec


# --- checks -----------------------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    message: str


def check_exit_code(code: int) -> CheckResult:
    if code == 0:
        return CheckResult("exit-code", True, "txt2img exited with 0")
    why = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
    return CheckResult("exit-code", False, f"txt2img {why}; see the log tail")


def check_completion(log_text: str) -> CheckResult:
    if COMPLETION_LINE in log_text:
        return CheckResult("completion", True, f"printed its completion message {COMPLETION_LINE!r}")
    return CheckResult("completion", False,
                       f"never printed its completion message {COMPLETION_LINE!r}: it stopped early")


def check_images(paths: list[Path], sample: Sample) -> CheckResult:
    """The right number of PNGs, each of the requested size."""
    from PIL import Image
    if len(paths) != sample.n_samples:
        return CheckResult("images", False, f"expected {sample.n_samples} PNG(s), found {len(paths)}")
    for path in paths:
        with Image.open(path) as image:
            if image.size != (sample.width, sample.height):
                return CheckResult("images", False,
                                   f"{path.name} is {image.size[0]}x{image.size[1]}, "
                                   f"expected {sample.width}x{sample.height}")
    return CheckResult("images", True,
                       f"{len(paths)} PNG(s) of {sample.width}x{sample.height}")


def check_not_blank(paths: list[Path]) -> CheckResult:
    """A black, white or constant image means the pipeline produced nothing."""
    from PIL import Image, ImageStat
    for path in paths:
        with Image.open(path) as image:
            stat = ImageStat.Stat(image.convert("L"))
        mean, stddev = stat.mean[0], stat.stddev[0]
        if stddev < MIN_STDDEV:
            kind = "black" if mean < 8 else "white" if mean > 247 else "constant"
            hint = (" (a black image is what the safety checker leaves when it flags a sample "
                    f"and {REPLACEMENT_IMAGE} cannot be read)") if kind == "black" else ""
            return CheckResult("not-blank", False,
                               f"{path.name} is {kind}: mean {mean:.1f}, standard deviation "
                               f"{stddev:.2f} < {MIN_STDDEV}{hint}")
    return CheckResult("not-blank", True, f"{len(paths)} image(s) carry a picture")


def check_not_replacement(paths: list[Path], replacement: Path) -> CheckResult:
    """Upstream swaps a flagged sample for assets/rick.jpeg; that proves nothing about the model."""
    from PIL import Image, ImageChops, ImageStat
    if not replacement.is_file():
        return CheckResult("not-replacement", True,
                           f"{replacement} is absent, so no sample can have been replaced by it")
    with Image.open(replacement) as reference:
        reference = reference.convert("RGB")
        for path in paths:
            with Image.open(path) as image:
                image = image.convert("RGB")
                resized = reference.resize(image.size)
                diff = sum(ImageStat.Stat(ImageChops.difference(image, resized)).mean) / 3
            if diff < MAX_REPLACEMENT_DIFF:
                return CheckResult("not-replacement", False,
                                   f"WARNING: {path.name} is the safety checker's replacement "
                                   f"image {REPLACEMENT_IMAGE} (mean difference {diff:.1f}): the "
                                   "NSFW filter flagged the sample; change the verify prompt or seed")
    return CheckResult("not-replacement", True,
                       f"no image is the safety checker's replacement image {REPLACEMENT_IMAGE}")


def check_timings(timings: dict) -> CheckResult:
    missing = [k for k in ("model_load_s", "sampling_s") if timings.get(k) is None]
    if missing:
        return CheckResult("timings", False,
                           f"could not measure {', '.join(missing)}: txt2img did not print its "
                           "stage lines (see the log)")
    return CheckResult("timings", True,
                       f"model load {timings['model_load_s']:.1f} s, "
                       f"sampling {timings['sampling_s']:.1f} s")


# --- running the sample -----------------------------------------------------------

@dataclass
class Run:
    code: int
    lines: list  # (seconds since start, text)
    runtime: dict
    total_s: float

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def timed_text(self) -> str:
        """The log as written to txt2img.log: each line with its arrival time in seconds."""
        return "\n".join(f"[{seconds:7.2f}s] {line}" for seconds, line in self.lines)


def run_logged(command: list[str], env: dict, cwd: Path, on_line=None) -> Run:
    """Run `command`, timestamping each console line (tqdm's \\r updates count as lines)."""
    start = time.monotonic()
    lines, pending, since = [], b"", 0.0  # since: when the unfinished line began to arrive
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    while True:
        chunk = proc.stdout.read1(65536)
        now = time.monotonic() - start
        if not pending:
            since = now
        pending += chunk
        *complete, pending = re.split(rb"[\r\n]", pending)
        for index, raw in enumerate(complete):
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                lines.append((since if index == 0 else now, line))
                if on_line:
                    on_line(line)
        if complete:
            since = now
        if not chunk:
            break
    if pending.strip():
        lines.append((since, pending.decode("utf-8", "replace").rstrip()))
    code = proc.wait()
    runtime = {}
    for _, line in lines:
        if line.startswith("SDRECIPE-RUNTIME "):
            runtime = json.loads(line.split(" ", 1)[1])
    return Run(code, lines, runtime, time.monotonic() - start)


def stage_timings(run: Run) -> dict:
    def first(marker):
        return next((t for t, line in run.lines if marker in line), None)

    def last(marker):
        return next((t for t, line in reversed(run.lines) if marker in line), None)

    load, sample, done = first(MARKERS["load"]), first(MARKERS["sample"]), first(MARKERS["done"])
    denoise = (first(MARKERS["denoise"]), last(MARKERS["denoise"]))

    def span(a, b):
        return round(b - a, 2) if a is not None and b is not None else None

    return {"startup_s": span(0.0, load), "model_load_s": span(load, sample),
            "sampling_s": span(sample, done), "denoise_s": span(*denoise),
            "total_s": round(run.total_s, 2)}


def txt2img_command(source: Path, python: Path, sample: Sample, outdir: Path,
                    config: Path, ckpt: Path) -> list[str]:
    """The sample as upstream's command line, spelt by the same function as batch jobs'."""
    from .payload.txt2img_batch import txt2img_args
    return [str(python), "-u", str(payload_path("run_txt2img.py")),
            str(source / "scripts" / "txt2img.py"), "--prompt", sample.prompt,
            "--outdir", str(outdir)] + txt2img_args(sample.txt2img_settings(),
                                                    {"config": str(config), "ckpt": str(ckpt)})


def sample_environment(deployment, profile: str, models: Models) -> dict:
    env = offline_run_env(deployment, profile)
    env["PYTHONUNBUFFERED"] = "1"
    env[MODELS_ENV] = str(models.models_dir)
    if models.torch_home is not None:
        env["TORCH_HOME"] = str(models.torch_home)
    return env


def report_dir(deployment, profile: str, smoke: bool) -> Path:
    return deployment.reports(profile) / ("smoke" if smoke else "sample")


def verify(target, out: Path | None = None, on_line=None,
           integrity: tuple[CheckResult, float] | None = None) -> dict:
    """Run the sample and write the report; returns the report.json data. `on_line` sees
    each console line as it arrives (the CLI shows sampling progress from it). `integrity`:
    the check that proved the model files before this run, and its seconds."""
    from . import report
    recipe, deployment, profile, smoke = (target.recipe, target.deployment, target.profile,
                                          target.smoke)
    sample = verify_spec(recipe).sample(profile, smoke)
    out = Path(out) if out else report_dir(deployment, profile, smoke)
    ours = (out / "report.json").exists() or (out / REPORT_MARK).exists()
    if (out / "samples").exists() and not ours:
        raise SdrecipeError(f"{out} has a samples/ folder but no report.json: not a verify report "
                            "folder, and verify replaces samples/; choose another --out")
    models = models_for(recipe, deployment, profile, smoke)
    python = env_python(deployment, profile)
    for needed in (deployment.source / "scripts" / "txt2img.py", models.ckpt, models.config, python):
        if not needed.is_file():
            raise SdrecipeError(f"{needed} is missing: run {target.command('deploy')} first")
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_MARK).touch()  # an interrupted run's samples/ are ours to replace next time
    shutil.rmtree(out / "samples", ignore_errors=True)  # txt2img numbers after what it finds
    prefix, network = network_isolation()
    command = prefix + txt2img_command(deployment.source, python, sample, out, models.config,
                                       models.ckpt)
    with tempfile.TemporaryDirectory(prefix="sdrecipe-verify-") as scratch:  # cwd outside the repo
        run = run_logged(command, sample_environment(deployment, profile, models), Path(scratch),
                         on_line)
    (out / "txt2img.log").write_text(run.timed_text + "\n", encoding="utf-8")
    images = sorted((out / "samples").glob("*.png"))
    timings = stage_timings(run)
    checks = [integrity[0]] if integrity else []
    if integrity:
        timings["integrity_s"] = integrity[1]
    checks += [check_exit_code(run.code), check_completion(run.text), check_images(images, sample)]
    if images:
        checks += [check_not_blank(images),
                   check_not_replacement(images, deployment.source / REPLACEMENT_IMAGE)]
    checks.append(check_timings(timings))
    data = {"ok": all(c.ok for c in checks), "profile": profile, "smoke": smoke,
            "prompt": sample.prompt,
            "settings": {k: v for k, v in asdict(sample).items() if k != "prompt"} | {"network": network},
            "checks": [asdict(c) for c in checks],
            "images": [p.relative_to(out).as_posix() for p in images],
            "timings": timings,
            "provenance": report.provenance(recipe, deployment, profile, run.runtime,
                                            models.description),
            "log": "txt2img.log",
            "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}
    report.write(out, data)
    return data
