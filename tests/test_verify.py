"""verify's checks, timings, recipe section and report, on images and logs made here.

Each check gets the broken input it exists for (a black, a constant, a wrong-size
image, the replacement image, a log without the completion line, a failed exit)
and must fail naming that reason; a picture-like image passes. The timing parser
runs a real child process that prints txt2img's stage lines. The end-to-end run
of the real upstream txt2img.py is in test_deploy.py (it needs an upstream checkout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw

from sdrecipe import report, verify
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.layout import Deployment
from sdrecipe.project import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = verify.Sample(prompt="a cat", seed=42, steps=5, height=256, width=256, scale=7.5,
                       precision="full")


def picture(path: Path, size=(256, 256), seed=0) -> Path:
    """A busy, picture-like image (what even tiny random models produce)."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (90, 120, 160))
    draw = ImageDraw.Draw(image)
    for _ in range(300):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        draw.ellipse((x, y, x + rng.randrange(4, 40), y + rng.randrange(4, 40)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    image.save(path)
    return path


def flat(path: Path, colour, size=(256, 256)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


# --- checks -------------------------------------------------------------------------

def test_a_picture_passes_every_image_check(tmp_path):
    images = [picture(tmp_path / "00000.png")]
    reference = picture(tmp_path / "rick.jpeg", size=(300, 400), seed=7)
    assert verify.check_images(images, SAMPLE).ok
    assert verify.check_not_blank(images).ok
    assert verify.check_not_replacement(images, reference).ok


@pytest.mark.parametrize("colour, word", [((0, 0, 0), "black"), ((255, 255, 255), "white"),
                                          ((128, 128, 128), "constant")])
def test_blank_and_constant_images_fail(tmp_path, colour, word):
    result = verify.check_not_blank([flat(tmp_path / "00000.png", colour)])
    assert not result.ok
    assert f"00000.png is {word}" in result.message


def test_a_black_image_points_at_the_safety_checker(tmp_path):
    result = verify.check_not_blank([flat(tmp_path / "00000.png", (0, 0, 0))])
    assert "safety checker" in result.message


def test_a_nearly_constant_image_with_a_watermark_like_ripple_still_fails(tmp_path):
    """The invisible watermark perturbs pixels by a level or two: still no picture."""
    rng = random.Random(1)
    image = Image.new("L", (256, 256))
    image.putdata([128 + rng.choice((-2, -1, 0, 1, 2)) for _ in range(256 * 256)])
    image.convert("RGB").save(tmp_path / "00000.png")
    assert not verify.check_not_blank([tmp_path / "00000.png"]).ok


def test_wrong_size_and_wrong_count_fail(tmp_path):
    small = picture(tmp_path / "00000.png", size=(128, 256))
    result = verify.check_images([small], SAMPLE)
    assert not result.ok and "is 128x256, expected 256x256" in result.message
    result = verify.check_images([], SAMPLE)
    assert not result.ok and "expected 1 PNG(s), found 0" in result.message
    two = [picture(tmp_path / "a.png"), picture(tmp_path / "b.png")]
    assert "found 2" in verify.check_images(two, SAMPLE).message


def replacement_cases():
    """The real assets/rick.jpeg when an upstream checkout is given, else a stand-in."""
    cases = ["stand-in"]
    upstream = os.environ.get("SDRECIPE_UPSTREAM")
    if upstream and (Path(upstream) / verify.REPLACEMENT_IMAGE).is_file():
        cases.append("upstream")
    return cases


@pytest.mark.parametrize("which", replacement_cases())
def test_the_safety_checkers_replacement_image_fails_with_a_warning_naming_it(tmp_path, which):
    """txt2img resizes rick.jpeg to the sample size and watermarks it; detect that."""
    if which == "upstream":
        reference = Path(os.environ["SDRECIPE_UPSTREAM"]) / verify.REPLACEMENT_IMAGE
    else:
        reference = picture(tmp_path / "rick.png", size=(500, 375), seed=3)
        reference = reference.rename(tmp_path / "rick.jpeg")
    with Image.open(reference) as ref:
        sample = ref.convert("RGB").resize((256, 256))
    # a light perturbation, like the watermark and the PNG round trip
    noise = Image.merge("RGB", [Image.effect_noise((256, 256), 2)] * 3)
    ImageChops.add(sample, noise, offset=-128).save(tmp_path / "00000.png")
    result = verify.check_not_replacement([tmp_path / "00000.png"], reference)
    assert not result.ok
    assert result.message.startswith("WARNING") and "assets/rick.jpeg" in result.message
    other = picture(tmp_path / "00001.png", seed=11)
    assert verify.check_not_replacement([other], reference).ok


def test_completion_line_and_exit_code():
    assert verify.check_completion("...\nYour samples are ready\n \nEnjoy.\n").ok
    missing = verify.check_completion("Loading model from x\nTraceback (most recent call last):")
    assert not missing.ok and "'Enjoy.'" in missing.message
    assert verify.check_exit_code(0).ok
    assert "exited with 1" in verify.check_exit_code(1).message
    assert "killed by signal 9" in verify.check_exit_code(-9).message


def test_timings_check_fails_when_a_stage_line_is_missing():
    assert verify.check_timings({"model_load_s": 1.0, "sampling_s": 2.0}).ok
    result = verify.check_timings({"model_load_s": None, "sampling_s": 2.0})
    assert not result.ok and "model_load_s" in result.message


# --- the command line ---------------------------------------------------------------

def upstream_txt2img_parser() -> argparse.ArgumentParser:
    """The options of upstream's scripts/txt2img.py at the pinned commit that a sample
    uses, declared as its argparse declares them (it builds its parser inside main());
    without abbreviations, so `--dpm` cannot pass for `--dpm_solver` by luck."""
    parser = argparse.ArgumentParser(prog="txt2img.py", allow_abbrev=False)
    for flag in ("--skip_grid", "--plms", "--dpm_solver"):
        parser.add_argument(flag, action="store_true")
    for flag, kind in (("--prompt", str), ("--outdir", str), ("--ddim_steps", int),
                       ("--n_iter", int), ("--H", int), ("--W", int), ("--n_samples", int),
                       ("--scale", float), ("--config", str), ("--ckpt", str), ("--seed", int)):
        parser.add_argument(flag, type=kind)
    parser.add_argument("--precision", choices=["full", "autocast"])
    return parser


@pytest.mark.parametrize("sampler, plms, dpm_solver", [("plms", True, False),
                                                        ("ddim", False, False),  # the default
                                                        ("dpm", False, True)])
def test_the_sample_is_a_command_line_upstreams_txt2img_accepts(tmp_path, sampler, plms,
                                                                dpm_solver):
    sample = dataclasses.replace(SAMPLE, sampler=sampler)
    command = verify.txt2img_command(tmp_path / "sd", Path("/env/bin/python"), sample,
                                     tmp_path / "out", tmp_path / "v1.yaml", tmp_path / "m.ckpt")
    assert command[:2] == ["/env/bin/python", "-u"] and command[2].endswith("run_txt2img.py")
    assert command[3] == str(tmp_path / "sd" / "scripts" / "txt2img.py")
    parsed = upstream_txt2img_parser().parse_args(command[4:])  # exits on an unknown option
    assert (parsed.plms, parsed.dpm_solver) == (plms, dpm_solver)
    assert (parsed.prompt, parsed.seed, parsed.ddim_steps, parsed.H, parsed.W) == \
        ("a cat", 42, 5, 256, 256)
    assert (parsed.n_samples, parsed.n_iter, parsed.scale, parsed.precision) == (1, 1, 7.5, "full")
    assert parsed.skip_grid and parsed.outdir == str(tmp_path / "out")
    assert (parsed.config, parsed.ckpt) == (str(tmp_path / "v1.yaml"), str(tmp_path / "m.ckpt"))


def test_a_failed_verify_prints_the_logs_tail_once_and_a_pass_prints_none(tmp_path, capsys):
    from sdrecipe.commands.verify import show_report
    from sdrecipe.environment.runtime import TAIL_LINES, tail_lines
    lines = [f"line {n}" for n in range(100)]
    assert tail_lines("\n".join(lines) + "\n\n  \n") == lines[-TAIL_LINES:]
    assert tail_lines("only\n", 5) == ["only"] and tail_lines("a\nb", 0) == []
    (tmp_path / "txt2img.log").write_text("\n".join(lines) + "\n")
    failed = {"ok": False, "checks": [{"name": "completion", "ok": False, "message": "no Enjoy."}]}
    (tmp_path / "report.json").write_text(json.dumps(failed))
    show_report(tmp_path)
    err = capsys.readouterr().err
    assert f"last {TAIL_LINES} lines of {tmp_path / 'txt2img.log'}" in err
    assert "line 99" in err and f"line {99 - TAIL_LINES}\n" not in err
    (tmp_path / "report.json").write_text(json.dumps({"ok": True, "checks": []}))
    show_report(tmp_path)
    assert capsys.readouterr().err == ""


# --- timings from a real child process ------------------------------------------------

def test_stage_timings_come_from_line_arrival_times(tmp_path):
    """A child that prints txt2img's stage lines with pauses; tqdm-style \\r updates count."""
    script = tmp_path / "fake_stages.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        time.sleep(0.3); print("Loading model from /x/model.ckpt", flush=True)
        time.sleep(0.4); print("Creating invisible watermark encoder (see ...)...", flush=True)
        for i in range(3):
            sys.stderr.write("\\rPLMS Sampler: %d/3" % i); sys.stderr.flush(); time.sleep(0.2)
        sys.stderr.write("\\rPLMS Sampler: 3/3\\n"); sys.stderr.flush()
        time.sleep(0.1); print("Your samples are ready\\n \\nEnjoy.", flush=True)
        print('SDRECIPE-RUNTIME {"device": "cpu"}', flush=True)
    """))
    run = verify.run_logged([sys.executable, "-u", str(script)], dict(os.environ), tmp_path)
    timings = verify.stage_timings(run)
    assert run.code == 0 and run.runtime == {"device": "cpu"}
    assert 0.25 <= timings["startup_s"] < 1.5
    assert 0.35 <= timings["model_load_s"] < 1.5
    assert 0.7 <= timings["sampling_s"] < 2.5
    assert 0.5 <= timings["denoise_s"] <= timings["sampling_s"]
    assert sum(1 for _, line in run.lines if line.startswith("PLMS Sampler")) == 4
    assert "[" in run.timed_text.splitlines()[0] and "s] Loading model" in run.timed_text


# --- the recipe section ----------------------------------------------------------------

def recipe_with_verify(tmp_path, section: str) -> Path:
    text = (ROOT / "recipe" / "stable-diffusion.yaml").read_text()
    start = text.index("\nverify:")
    end = text.find("\n\n", start + 1)
    text = text[:start] + "\n" + section.strip("\n") + "\n" + (text[end:] if end > 0 else "")
    (tmp_path / "recipe").mkdir()
    path = tmp_path / "recipe" / "stable-diffusion.yaml"
    path.write_text(text)
    return path


def test_the_shipped_recipe_has_per_profile_and_smoke_samples():
    spec = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml").sections["verify"]
    smoke = spec.sample("cpu", smoke=True)
    assert smoke.n_samples == 1 and smoke.sampler == "plms" and smoke.steps <= 10
    assert smoke.width >= 256 and smoke.height >= 256  # imwatermark's minimum
    assert spec.sample("dtk-22.10").seed == spec.sample("cpu").seed


def test_a_too_small_size_is_refused_naming_file_line_and_why(tmp_path):
    path = recipe_with_verify(tmp_path, """
verify:
  prompt: a cat
  seed: 1
  smoke: {size: 64, steps: 5}
""")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert f"{path}:" in message and "verify.smoke.size" in message and "watermark" in message


def test_an_unknown_profile_in_verify_is_refused(tmp_path):
    path = recipe_with_verify(tmp_path, """
verify:
  prompt: a cat
  seed: 1
  profiles:
    rocm: {steps: 5}
""")
    with pytest.raises(RecipeError, match="verify.profiles.rocm: unknown profile"):
        load_recipe(path)


# --- the report ---------------------------------------------------------------------------

def test_report_json_keeps_the_contract_and_the_html_is_self_contained(tmp_path):
    (tmp_path / "samples").mkdir()
    picture(tmp_path / "samples" / "00000.png")
    checks = [verify.check_exit_code(0), verify.check_completion("Enjoy.")]
    data = {"ok": True, "profile": "cpu", "smoke": True, "prompt": "a <cat> & a ball",
            "settings": {"seed": 42, "steps": 5, "height": 256, "width": 256},
            "checks": [{"name": c.name, "ok": c.ok, "message": c.message} for c in checks],
            "images": ["samples/00000.png"],
            "timings": {"startup_s": 2.0, "model_load_s": 0.5, "sampling_s": 3.0,
                        "denoise_s": 2.0, "total_s": 6.0},
            "provenance": {"upstream_commit": "21f890f9" * 5, "upstream_pinned": "21f890f9" * 5,
                           "patches": [{"file": "0001-x.patch", "sha256": "ab" * 32,
                                        "state": "applied"}],
                           "lock_hash": "cd" * 32, "recipe_sha256": "ef" * 32,
                           "runtime": {"device": "cpu", "torch": "1.11.0"}, "models": "smoke"},
            "log": "txt2img.log", "created": "2026-01-01T00:00:00+00:00"}
    report.write(tmp_path, data)
    assert json.loads((tmp_path / "report.json").read_text()) == data
    page = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in page
    assert "a &lt;cat&gt; &amp; a ball" in page
    assert "0001-x.patch" in page and "ab" * 32 in page and "1.11.0" in page
    assert "PASSED" in page
    for remote in ("http://", "https://", "src=\"/", "<link", "<script"):
        assert remote not in page.replace("https://github.com/ShieldMnt", "")


# --- refusals before running anything --------------------------------------------------------

def smoke_target(tmp_path):
    """The committed recipe's cpu profile in smoke mode, deployed (or not) under tmp_path."""
    from sdrecipe.config import Config
    from sdrecipe.target import Target
    return Target(load_recipe(ROOT / "recipe" / "stable-diffusion.yaml"),
                  Deployment(tmp_path / "deploy"), "cpu", Config({}, None), smoke=True)


def test_verify_never_empties_a_folder_that_is_not_a_report(tmp_path):
    out = tmp_path / "my-pictures"
    (out / "samples").mkdir(parents=True)
    picture(out / "samples" / "holiday.png")
    with pytest.raises(SdrecipeError, match="not a verify report folder"):
        verify.verify(smoke_target(tmp_path), out=out)
    assert (out / "samples" / "holiday.png").is_file()


def test_verify_before_deploy_says_what_to_run(tmp_path):
    with pytest.raises(SdrecipeError, match=r"run `\S*sdrecipe --deploy-dir \S+ deploy --profile "
                                            r"cpu --smoke` first"):
        verify.verify(smoke_target(tmp_path))


def test_sampling_progress_follows_txt2imgs_sampler_lines():
    """verify shows the denoising loop live: each tqdm line of the sampler moves one task."""
    from sdrecipe.progress import Reporter, Task, reporting
    from sdrecipe.stages.verify import SamplingProgress

    class Recorder(Reporter):
        def __init__(self):
            self.updates = []

        def update(self, task, **changes):
            self.updates.append(changes)

    with reporting(Recorder()) as seen, Task("txt2img") as task:
        follow = SamplingProgress(task)
        for line in ["Loading model from m.ckpt", "data:   0%|          | 0/1 [00:00<?, ?it/s]",
                     "PLMS Sampler:   0%|          | 0/5 [00:00<?, ?it/s]",
                     "PLMS Sampler:  40%|####      | 2/5 [00:01<00:01,  2.00it/s]",
                     "DDIM Sampler: 100%|##########| 5/5 [00:02<00:00,  2.10it/s]"]:
            follow(line)
    assert seen.updates == [
        {"description": "PLMS Sampler", "completed": 0, "total": 5},
        {"description": "PLMS Sampler", "completed": 2, "total": 5},
        {"description": "DDIM Sampler", "completed": 5, "total": 5}]


def test_an_interrupted_verify_leaves_a_folder_the_next_verify_may_replace(tmp_path):
    """Verify marks its report folder before it replaces samples/: the samples an interrupted
    run left are replaced next time, a folder of someone's pictures never is."""
    out = tmp_path / "deploy" / "reports" / "cpu" / "smoke"
    (out / "samples").mkdir(parents=True)
    (out / verify.REPORT_MARK).touch()
    with pytest.raises(SdrecipeError, match=r"is missing: run `\S*sdrecipe --deploy-dir"):
        verify.verify(smoke_target(tmp_path), out=out)
