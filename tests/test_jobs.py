"""The Slurm stage's pure parts: recipe section, resources, scontrol parsing, verdicts, prompt plans.

No cluster here (tests/test_slurm.py drives the real one); these pin the rules
that decide what is submitted and what exit code a user gets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sdrecipe import batch, gallery, slurm
from sdrecipe.config import Config
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.project import load_recipe
from sdrecipe.watch import judge

RECIPE = Path(__file__).resolve().parents[1] / "recipe" / "stable-diffusion.yaml"


def recipe_with_slurm(tmp_path, section: str):
    """A copy of the shipped recipe whose slurm: section is `section`."""
    root = tmp_path / "project"
    shutil.copytree(RECIPE.parents[1] / "recipe", root / "recipe")
    path = root / "recipe" / "stable-diffusion.yaml"
    text = path.read_text()
    path.write_text(text[:text.index("\nslurm:\n")] + "\nslurm:\n" + section)
    return path


def test_seed_resources_are_the_dtk_profile_defaults():
    recipe = load_recipe(RECIPE)
    config = Config({"partition": "kshdtest", "account": None, "qos": None}, None)
    resources = slurm.resolve_resources(recipe, "dtk-22.10", config, {})
    assert resources.options() == ["--partition=kshdtest", "--nodes=1", "--ntasks=16",
                                   "--gres=dcu:2", "--time=01:00:00"]
    cpu = slurm.resolve_resources(recipe, "cpu", config, {"time": "10", "qos": "debug"})
    assert "--time=10" in cpu.options() and "--qos=debug" in cpu.options()
    assert not any(o.startswith("--gres") for o in cpu.options())
    no_devices = slurm.resolve_resources(recipe, "dtk-22.10", config, {"gres": "none"})
    assert no_devices.gres is None


@pytest.mark.parametrize("section, message", [
    ("  dtk-22.10: {gres: \"gpu:2\"}\n", "devices are requested as dcu:N"),
    ("  cpu: {gres: \"dcu:1\"}\n", "no accelerator: leave gres out"),
    ("  cuda: {time: \"1 hour\"}\n", "expected a Slurm time limit"),
    ("  cuda: {ntasks: 0}\n", "must be at least 1"),
    ("  cuda: {partition: kshdtest}\n", "partition is site configuration"),
    ("  cuda: {nodes: 1, mem: 4G}\n", "unknown field"),
    ("  rocm: {}\n", "unknown profile"),
])
def test_bad_slurm_section_names_the_line(tmp_path, section, message):
    path = recipe_with_slurm(tmp_path, section)
    line = path.read_text().splitlines().index(section.rstrip("\n")) + 1
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert message in str(info.value)
    assert f"{path}:{line}:" in str(info.value)


def test_bad_time_option_is_refused():
    recipe = load_recipe(RECIPE)
    with pytest.raises(SdrecipeError, match="--time 'soon'"):
        slurm.resolve_resources(recipe, "cpu", Config({"partition": None, "account": None,
                                                       "qos": None}, None), {"time": "soon"})


def test_scontrol_fields_keep_values_with_spaces():
    line = ("JobId=7 ArrayJobId=5 ArrayTaskId=2 JobName=a b JobState=PENDING "
            "Reason=ReqNodeNotAvail, UnavailableNodes:n1 Dependency=(null) "
            "StdOut=/home/u/my jobs/slurm-5_2.out TRES=cpu=1,node=1")
    fields = slurm.parse_scontrol(line)
    assert fields["Reason"] == "ReqNodeNotAvail, UnavailableNodes:n1"
    assert fields["StdOut"] == "/home/u/my jobs/slurm-5_2.out"
    assert fields["TRES"] == "cpu=1,node=1" and fields["JobName"] == "a b"


def task(job_id, state, started=True, exit_code="0:0", reason="None"):
    return slurm.TaskState(job_id=job_id, state=state, reason=reason, exit_code=exit_code,
                           log=None, nodes="n1" if started else None, time_limit="00:01:00")


def test_verdicts_follow_the_job_state():
    assert judge("1", [task("1", "COMPLETED")])[0] == 0
    code, lines = judge("1", [task("1", "FAILED", exit_code="3:0")])
    assert code == 10 and "failed with exit code 3 on n1" in lines[0]
    assert judge("1", [task("1", "TIMEOUT")])[0] == 11
    assert judge("1", [task("1", "CANCELLED")])[0] == 12
    code, lines = judge("1", [task("1", "CANCELLED", started=False, reason="BadConstraints")])
    assert code == 13 and "never started (CANCELLED: BadConstraints)" in lines[0]
    assert judge("1", [task("1", "OUT_OF_MEMORY")])[0] == 14
    assert judge("1", [task("1", "NODE_FAIL")])[0] == 15
    # An array: the most severe ending decides, every bad task is named.
    code, lines = judge("5", [task("5_0", "COMPLETED"), task("5_1", "CANCELLED"),
                              task("5_2", "FAILED", exit_code="1:0")])
    assert code == 10 and any("5_1 was cancelled" in line for line in lines)


def test_follow_hands_on_state_changes_and_whole_log_lines(tmp_path, monkeypatch):
    """follow() prints nothing: each new state goes to on_status, each new whole line of the
    log to on_line (a tqdm bar as its last redraw), the unfinished last line at the end."""
    from sdrecipe import watch
    log = tmp_path / "slurm-7.out"
    log.write_text("")
    steps = [("RUNNING", "loading\nPLMS 1/3\rPLMS 3/3\npart"), ("RUNNING", "ial end"),
             ("COMPLETED", "")]
    now = [0.0]

    def query(job_id):
        state = steps[0][0]
        return [slurm.TaskState(job_id, state, "None", "0:0", str(log), "n1")]

    def sleep(_):  # the job moves on while follow() waits; every round polls Slurm again
        _, text = steps.pop(0)
        with log.open("a") as handle:
            handle.write(text)
        now[0] += 100

    monkeypatch.setattr(slurm, "query", query)
    statuses, lines = [], []
    tasks = watch.follow("7", on_status=statuses.append, on_line=lines.append,
                         clock=lambda: now[0], sleep=sleep)
    assert [t.state for t in tasks] == ["COMPLETED"]
    assert statuses == ["sdrecipe: job 7: RUNNING on n1", "sdrecipe: job 7: COMPLETED"]
    assert lines == ["loading", "PLMS 3/3", "partial end"]


def test_prompt_folders_survive_edits_but_not_new_settings(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n# skipped\n\na dog\na cat\n")
    first = batch.plan(prompts, batch.DEFAULT_SETTINGS)
    assert [(e.index, e.prompt) for e in first] == [(1, "a cat"), (4, "a dog")]  # deduplicated
    prompts.write_text("a new one\na dog\na cat\n")
    second = {e.prompt: e.folder for e in batch.plan(prompts, batch.DEFAULT_SETTINGS)}
    assert {e.prompt: e.folder for e in first}.items() <= second.items()
    more_steps = dict(batch.DEFAULT_SETTINGS, steps=80)
    assert batch.plan(prompts, more_steps)[2].folder != second["a cat"]


def test_an_empty_prompt_file_is_an_error_naming_it(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only comments\n\n")
    with pytest.raises(SdrecipeError, match=f"{prompts}: no prompts"):
        batch.plan(prompts, batch.DEFAULT_SETTINGS)


def test_gallery_thumbnails_are_files_loaded_lazily_linking_to_the_full_size_images(tmp_path):
    """The prompt folder is made here as the in-job runner leaves it (images + sidecar),
    at full upstream size, so the page's weight is what a real batch would give."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red <fox>\na blue whale\n")
    entries = batch.plan(prompts, batch.DEFAULT_SETTINGS)
    done = tmp_path / entries[0].folder
    done.mkdir()
    names = [f"{i:05}.png" for i in range(3)]
    for name in names:  # noise: compresses no better than a real sample
        Image.frombytes("RGB", (512, 512), os.urandom(512 * 512 * 3)).save(done / name)
    (done / "prompt.json").write_text(json.dumps({
        "prompt": "a red <fox>", "index": 1, "images": names, "seed": 42, "node": "n1",
        "settings": batch.DEFAULT_SETTINGS, "timing": {"total_s": 3.5}, "job": {"id": "7"}}))
    path, made = gallery.write_gallery(entries, tmp_path, "batch <1>")
    page = path.read_text()
    assert made == 1 and "1 of 2 prompts done" in page and "<title>batch &lt;1&gt;</title>" in page
    assert "a red &lt;fox&gt;" in page and "line 2: not made yet" in page
    links = re.findall(r'<a href="([^"]+)"><img alt="[^"]+" src="([^"]+)" loading="lazy" '
                       r'width="160" height="160">', page)
    assert [href for href, _ in links] == [f"{entries[0].folder}/{name}" for name in names]
    for _, thumbnail in links:
        assert thumbnail.startswith("thumbnails/") and thumbnail.endswith(".jpg")
        with Image.open(tmp_path / thumbnail) as image:
            assert (image.format, image.size) == ("JPEG", (160, 160))
    assert "data:image" not in page and not list(tmp_path.glob("thumbnails/*/.*.tmp"))
    thumbnails = sum((tmp_path / t).stat().st_size for _, t in links)
    assert thumbnails < sum((done / name).stat().st_size for name in names) / 10
    first = (tmp_path / links[0][1]).stat().st_mtime_ns
    gallery.write_gallery(entries, tmp_path, "batch <1>")
    assert (tmp_path / links[0][1]).stat().st_mtime_ns == first  # made once, then kept


def test_gallery_pages_hold_a_hundred_prompts_each_and_link_each_other(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {n}\n" for n in range(250)))
    entries = batch.plan(prompts, batch.DEFAULT_SETTINGS)
    path, made = gallery.write_gallery(entries, tmp_path, "big")
    pages = [path, tmp_path / "gallery-2.html", tmp_path / "gallery-3.html"]
    assert made == 0 and not (tmp_path / "gallery-4.html").exists()
    for number, page in enumerate(pages, 1):
        text = page.read_text()
        assert "0 of 250 prompts done" in text
        assert text.count('<section class="missing">') == (100 if number < 3 else 50)
        links = set(re.findall(r'<a href="(gallery[^"]*\.html)">', text))
        assert links == {p.name for p in pages} - {page.name}
    assert "<b>201–250</b>" in pages[2].read_text() and "prompt 249" in pages[2].read_text()


def sdrecipe_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDRECIPE_")}
    env.update(PYTHONPATH=str(RECIPE.parents[1] / "src"), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sdrecipe", *args], capture_output=True,
                          text=True, env=env, timeout=60)


@pytest.mark.parametrize("profile, expected, absent", [
    ("dtk-22.10", ["#SBATCH --gres=dcu:2", "#SBATCH --ntasks=16",
                   "module load compiler/rocm/dtk-22.10.1", "export HIP_VISIBLE_DEVICES=",
                   "MIOPEN_USER_DB_PATH"], ["CUDA_VISIBLE_DEVICES=\""]),
    ("cuda", ["#SBATCH --gres=gpu:1", "export CUDA_VISIBLE_DEVICES="], ["module load", "MIOPEN"]),
    ("cpu", ["#SBATCH --cpus-per-task=8"], ["--gres", "VISIBLE_DEVICES", "module load"]),
])
def test_dry_run_prints_a_valid_script_for_each_profile(tmp_path, profile, expected, absent):
    done = sdrecipe_cli("--deploy-dir", str(tmp_path), "submit", "verify", "--profile", profile,
                        "--dry-run", env_extra={"SDRECIPE_PARTITION": "kshdtest",
                                                "SDRECIPE_CONFIG": str(tmp_path / "none.yaml")})
    assert done.returncode == 0, done.stderr
    assert "environment is not built" in done.stderr  # noted, not fatal, in a dry run
    script = done.stdout
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=sdrecipe-verify-")
    assert "#SBATCH --partition=kshdtest" in script
    for text in expected:
        assert text in script
    for text in absent:
        assert text not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "jobs").exists()  # a dry run writes nothing


def test_submitting_without_a_built_environment_says_what_to_run(tmp_path):
    (tmp_path / "stable-diffusion").mkdir()
    done = sdrecipe_cli("--deploy-dir", str(tmp_path), "submit", "verify", "--profile", "cpu")
    assert done.returncode == 2
    assert "the cpu environment is not built" in done.stderr
    assert f"sdrecipe --deploy-dir {tmp_path} env build --profile cpu`" in done.stderr


def test_job_folders_made_in_the_same_second_are_distinct(tmp_path):
    """Two submissions at once (the verify and timeout jobs of the Slurm tests did this)
    must not write their scripts, logs and reports into one folder."""
    from concurrent.futures import ThreadPoolExecutor

    from sdrecipe.jobs import _new_folder
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: _new_folder(tmp_path / "jobs", "verify-cpu"), range(8)))
    assert len(set(folders)) == 8 and all(f.is_dir() for f in folders)
