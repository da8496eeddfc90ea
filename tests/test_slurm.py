"""`sdrecipe submit` and `sdrecipe salloc` against a real Slurm and Lmod on this machine.

The cluster (munged, slurmctld, slurmd; tests/slurm_cluster.py) and the module
system are real, and so are the generated batch scripts, the activation script
written by the build stage, the polling, log streaming, array splitting and the
batch runner. CI has no upstream checkout and no built environment, so the
payloads are stand-ins (tests/payloads/): `standin_sdrecipe.py` plays `sdrecipe
verify` and writes a report in verify's format, `standin_txt2img.py` plays
upstream's scripts/txt2img.py for the batch runner; the "environment" is a
folder whose python is the Python 3.8 the real one would be.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import env_helpers
from sdrecipe.environment.build import write_activation
from sdrecipe.environment.location import env_python
from sdrecipe.environment.runtime import activation_env
from sdrecipe.layout import Deployment
from sdrecipe.project import load_recipe
from sdrecipe.models import smoke_models

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
PAYLOADS = Path(__file__).resolve().parent / "payloads"
PY38 = Path(env_helpers.PY38)
PROFILE = "dtk-22.10"


def place_standin_models(recipe, deployment) -> None:
    """A fake where the real thing cannot be had here (the gated 4 GB checkpoint): a few
    bytes in place of each model file, stamped as a verified placement of its pin, so a
    submission's integrity proof (hash before unpickle) trusts them as fetch's own."""
    from sdrecipe.artifacts import ArtifactLock, expected, select
    from sdrecipe.placement import write_stamp
    lock = ArtifactLock.for_recipe(recipe)
    for profile in (PROFILE, "cuda"):
        for file in select(recipe, profile):
            target = file.target(deployment, create=True)
            target.write_bytes(b"stand-in")
            pin = expected(file, lock)[0] or hashlib.sha256(b"stand-in").hexdigest()
            write_stamp(file.stamp(deployment), target, pin, "standin", file.key)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A deployment with a stand-in upstream script and an environment whose python is 3.8,
    activated by the build stage's own activation script (which checks the DTK module)."""
    root = tmp_path_factory.mktemp("deploy")
    deployment = Deployment(root)
    scripts = deployment.source / "scripts"
    scripts.mkdir(parents=True)
    shutil.copy(PAYLOADS / "standin_txt2img.py", scripts / "txt2img.py")
    recipe = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")
    place_standin_models(recipe, deployment)
    for profile in (PROFILE, "cuda"):
        prefix = deployment.env_prefix(profile)
        (prefix / "bin").mkdir(parents=True)
        (prefix / "bin" / "python").symlink_to(PY38 if PY38.exists() else Path(sys.executable))
        write_activation(recipe, deployment, profile, prefix)
    return deployment


def cluster_env(cluster, config_dir: Path) -> dict:
    """The environment to run sdrecipe against `cluster`: its SLURM_CONF, a site config
    naming its partition, this checkout's engine, and the verify stand-in as engine."""
    config = config_dir / "config.yaml"
    config.write_text(f"partition: {cluster.partition}\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SDRECIPE_", "STANDIN_", "SLURM_"))}
    python = PY38 if PY38.exists() else Path(sys.executable)
    env.update(cluster.env, SDRECIPE_CONFIG=str(config), PYTHONPATH=str(ROOT / "src"),
               SDRECIPE_ENGINE=f"{python} {PAYLOADS / 'standin_sdrecipe.py'}")
    return env


@pytest.fixture(scope="module")
def slurm_env(slurm_cluster, tmp_path_factory):
    return cluster_env(slurm_cluster, tmp_path_factory.mktemp("config"))


def interruptible():
    """Ctrl-C reaches the child even when the test run itself ignores SIGINT (a shell
    starts background jobs that way, and a child would inherit it: Python then installs
    no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sdrecipe(deployment, *args, env, extra_env=None, background=False):
    argv = [sys.executable, "-m", "sdrecipe", "--deploy-dir", str(deployment.root), *args]
    full_env = dict(env, **(extra_env or {}))
    if background:
        return subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    return subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=120)


def submit_verify(deployment, env, *options, extra_env=None, background=False):
    return sdrecipe(deployment, "submit", "verify", "--profile", PROFILE, *options, env=env,
                    extra_env=extra_env, background=background)


def job_id_from(stdout_line: str) -> str:
    return re.search(r"submitted job (\d+)", stdout_line).group(1)


def wait_for_job_state(job_id: str, env, wanted: str, timeout=15.0) -> str:
    """scontrol's line for the job once it shows `wanted`, or the last one seen: a
    cancelled job shows COMPLETING for a moment while Slurm kills its processes."""
    deadline = time.monotonic() + timeout
    while True:
        state = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env,
                               capture_output=True, text=True).stdout
        if f"JobState={wanted} " in state or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def wait_for_line(stream, pattern: str, timeout=60.0) -> list[str]:
    """Read lines from a child's pipe until one matches; returns what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


@pytest.fixture(scope="module", autouse=True)
def timeout_run(deployment, slurm_env):
    """A 1-minute job that sleeps, started first: Slurm's smallest time limit is a minute
    (and it checks limits every 30 s), so it runs while the other tests do."""
    proc = submit_verify(deployment, slurm_env, "--time", "1", "--ntasks", "1", "--gres", "none",
                         extra_env={"STANDIN_VERIFY": "sleep"}, background=True)
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # without a TTY: leaves the job, which the cluster ends
        proc.communicate(timeout=30)


# --- verify jobs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verify_ok(deployment, slurm_env):
    return submit_verify(deployment, slurm_env, "--smoke")


def test_verify_job_completes_streams_its_log_and_collects_the_report(verify_ok, deployment,
                                                                      slurm_cluster):
    assert verify_ok.returncode == 0, verify_ok.stderr
    out = verify_ok.stdout
    assert re.search(r"job \d+: COMPLETED\n", out)
    assert f" on {slurm_cluster.node} at " in out  # the job's first log line, streamed
    assert "standin: verify ok" in out  # streamed from the job's log
    assert "verify report: OK (2/2 checks, 1 images" in out
    job_dir = Path(re.search(r"submitted job \d+ \((\S+)/job\.sh\)", out).group(1))
    report = json.loads((job_dir / "report" / "report.json").read_text())
    assert report["ok"] and report["settings"] == {"smoke": True}
    script = (job_dir / "job.sh").read_text()
    for option in (f"--partition={slurm_cluster.partition}", "--ntasks=16", "--gres=dcu:2",
                   "--nodes=1"):
        assert f"#SBATCH {option}\n" in script


def test_module_load_happens_inside_the_job(verify_ok, deployment, slurm_env):
    assert "DTK_TEST_LOADED" not in slurm_env  # not inherited from the submitting shell
    out = verify_ok.stdout
    assert "sdrecipe: loaded module compiler/rocm/dtk-22.10.1" in out
    assert "standin: DTK_TEST_LOADED=1" in out
    assert re.search(r"standin: ROCM_PATH=\S+/dtk-22.10.1", out)
    assert f"standin: SDRECIPE_PROFILE={PROFILE}" in out  # the build stage's activation ran
    assert f"standin: cwd={deployment.source}" in out
    assert re.search(r"standin: MIOPEN_USER_DB_PATH=/tmp/\w+-\d+/miopen", out)
    # dcu is a count-only gres here, as on many DCU sites: no device list to pass on
    assert "sdrecipe: HIP_VISIBLE_DEVICES=<not set: Slurm exported no device list" in out


def test_cuda_job_sees_the_gpu_slurm_allocated(deployment, slurm_env, slurm_cluster):
    if not slurm_cluster.gpus:
        pytest.skip("this machine refuses mknod, so the test cluster has no gpu gres")
    done = sdrecipe(deployment, "submit", "verify", "--profile", "cuda", "--gres", "gpu:1",
                    "--ntasks", "1", env=slurm_env)
    assert done.returncode == 0, done.stdout + done.stderr
    allocated = re.search(r"standin: SLURM_JOB_GPUS=(\d)\n", done.stdout).group(1)
    assert f"standin: CUDA_VISIBLE_DEVICES={allocated}\n" in done.stdout
    assert "loaded module" not in done.stdout  # the cuda profile names no module
    assert "standin: MIOPEN_USER_DB_PATH=\n" in done.stdout  # MIOpen is DCU's


def test_failed_job_gives_its_exit_code_and_log_tail(deployment, slurm_env):
    done = submit_verify(deployment, slurm_env, extra_env={"STANDIN_VERIFY": "fail"})
    assert done.returncode == 10, done.stdout + done.stderr
    assert re.search(r"job \d+ failed with exit code 3 on ", done.stderr)
    assert "  | standin: check images failed" in done.stderr  # the log tail
    assert "failed check images: stand-in failure: the image is blank" in done.stdout


def test_impossible_request_is_rejected_with_slurms_reason(deployment, slurm_env):
    done = submit_verify(deployment, slurm_env, "--gres", "dcu:3")
    assert done.returncode == 13, done.stdout + done.stderr
    assert "never started" in done.stderr
    assert "Requested node configuration is not available" in done.stderr


def test_gres_of_the_wrong_kind_is_refused_before_submitting(deployment, slurm_env):
    done = submit_verify(deployment, slurm_env, "--gres", "gpu:1")
    assert done.returncode == 2
    assert "devices are requested as dcu:N" in done.stderr


def test_cancelled_job_is_reported(deployment, slurm_env, slurm_cluster):
    proc = submit_verify(deployment, slurm_env, "--ntasks", "1",
                         extra_env={"STANDIN_VERIFY": "sleep"}, background=True)
    seen = wait_for_line(proc.stdout, r"standin: sleeping")
    job_id = job_id_from("".join(seen))
    subprocess.run(["scancel", job_id], env=slurm_env, check=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 12, out + err
    assert f"job {job_id} was cancelled on {slurm_cluster.node}" in err
    cache = re.search(r"standin: MIOPEN_USER_DB_PATH=(\S+)", "".join(seen)).group(1)
    assert not Path(cache).parent.exists()  # the node-local cache went with the job


def test_interrupt_without_a_tty_leaves_the_job_and_says_how_to_cancel(deployment, slurm_env):
    proc = submit_verify(deployment, slurm_env, "--ntasks", "1",
                         extra_env={"STANDIN_VERIFY": "sleep"}, background=True)
    seen = wait_for_line(proc.stdout, r"standin: sleeping")
    job_id = job_id_from("".join(seen))
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert f"Cancel it with: scancel {job_id}" in err
        state = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm_env,
                               capture_output=True, text=True).stdout
        assert "JobState=RUNNING" in state
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["scancel", job_id], env=slurm_env)


def test_interrupt_in_a_terminal_offers_to_cancel_the_job(deployment, slurm_env):
    """Ctrl-C at a terminal: the question is asked on the TTY and 'y' runs scancel."""
    import pty
    master, slave = pty.openpty()
    argv = [sys.executable, "-m", "sdrecipe", "--deploy-dir", str(deployment.root), "submit",
            "verify", "--profile", PROFILE, "--ntasks", "1"]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            env=dict(slurm_env, STANDIN_VERIFY="sleep"), preexec_fn=interruptible)
    os.close(slave)

    def read_until(pattern, timeout=60.0):
        seen, deadline = "", time.monotonic() + timeout
        while time.monotonic() < deadline and not re.search(pattern, seen):
            if not select.select([master], [], [], 1.0)[0]:
                continue  # nothing yet: look at the clock again rather than block on read
            try:
                seen += os.read(master, 4096).decode(errors="replace")
            except OSError:
                break
        assert re.search(pattern, seen), seen
        return seen

    try:
        job_id = job_id_from(read_until(r"standin: sleeping"))
        proc.send_signal(signal.SIGINT)
        read_until(rf"cancel job {job_id} with scancel\? \[y/N\]")
        os.write(master, b"y\n")
        assert proc.wait(timeout=30) == 130
        state = wait_for_job_state(job_id, slurm_env, "CANCELLED")
        assert "JobState=CANCELLED " in state, state
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_job_over_its_time_limit_times_out(timeout_run):
    out, err = timeout_run.communicate(timeout=150)
    assert timeout_run.returncode == 11, out + err
    assert re.search(r"job \d+ hit its time limit \(00:01:00\) and was stopped", err)
    assert "standin: sleeping" in out


# --- prompt batches ---------------------------------------------------------------------------


PROMPTS = ["a photograph of a cat playing a white ball in a lovely garden",
           "a stylish woman walks down a Tokyo street <neon>",
           "# a comment, not a prompt",
           "",
           "an astronaut riding a horse",
           "a lighthouse in a storm",
           "a bowl of ramen, studio lighting"]


def generate(deployment, env, prompts_file, out, *options, extra_env=None):
    return sdrecipe(deployment, "submit", "generate", "--profile", PROFILE, "--prompts",
                    str(prompts_file), "--out", str(out), "--height", "16", "--width", "24",
                    "--n-samples", "2", "--steps", "5", "--ntasks", "1", "--gres", "dcu:1",
                    *options, env=env, extra_env=extra_env)


def prompt_folders(out: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["prompt"]: json.loads(p.read_text())
            for p in out.glob("*/prompt.json")}


def test_prompt_array_splits_prompts_and_writes_the_gallery(deployment, slurm_env, tmp_path,
                                                            slurm_cluster):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    done = generate(deployment, slurm_env, prompts, out, "--array-tasks", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 of 5 prompts to make (0 already done), over 3 array tasks" in done.stdout
    made = prompt_folders(out)
    assert sorted(made) == sorted(p for p in PROMPTS if p and not p.startswith("#"))
    tasks = {}
    for prompt, sidecar in made.items():
        assert sidecar["seed"] == 42 and sidecar["settings"]["steps"] == 5
        assert sidecar["settings"]["H"] == 16 and sidecar["node"]
        assert set(sidecar["timing"]) == {"model_load_s", "sampling_s", "total_s"}
        assert sidecar["images"] == ["00000.png", "00001.png"]
        tasks.setdefault(sidecar["job"]["array_task"], set()).add(sidecar["index"])
    # Deterministic split: every 3rd prompt from the task's index on, in file order.
    assert tasks == {0: {1, 6}, 1: {2, 7}, 2: {5}}
    logs = sorted(out.glob("jobs/generate-*/slurm-*_*.out"))
    assert len(logs) == 3
    for log in logs:  # the model is loaded once per task, however many prompts it has
        assert log.read_text().count("Loading model from") == 1
    page = (out / "gallery.html").read_text()
    assert "5 of 5 prompts done" in page
    thumbnails = re.findall(r'<img alt="\S+" src="(thumbnails/[^"]+\.jpg)" loading="lazy" '
                            r'width="24" height="16">', page)
    assert len(thumbnails) == 10 and all((out / t).is_file() for t in thumbnails)
    assert "<nav>" not in page  # one page: nothing to page through
    assert "a stylish woman walks down a Tokyo street &lt;neon&gt;" in page
    assert "comment" not in page
    assert f"gallery: {out / 'gallery.html'} (5 of 5 prompts done)" in done.stdout


def test_resubmitted_array_skips_finished_prompts(deployment, slurm_env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue whale CRASH\na green frog\n")
    out = tmp_path / "out"
    first = generate(deployment, slurm_env, prompts, out, "--array-tasks", "2",
                     extra_env={"STANDIN_TXT2IMG_FAIL": "CRASH"})
    assert first.returncode == 10, first.stdout + first.stderr
    assert "1 prompts failed (2); resubmit to retry them" in first.stderr
    assert sorted(prompt_folders(out)) == ["a green frog", "a red fox"]
    assert "2 of 3 prompts done" in (out / "gallery.html").read_text()
    finished = {p: s["finished"] for p, s in prompt_folders(out).items()}
    time.sleep(1)  # so a redone prompt would get a different "finished" time

    second = generate(deployment, slurm_env, prompts, out)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "1 of 3 prompts to make (2 already done), over 1 array tasks" in second.stdout
    made = prompt_folders(out)
    assert sorted(made) == ["a blue whale CRASH", "a green frog", "a red fox"]
    assert {p: made[p]["finished"] for p in finished} == finished  # not redone
    assert not list(out.glob("*.partial-*"))
    assert "3 of 3 prompts done" in (out / "gallery.html").read_text()

    third = generate(deployment, slurm_env, prompts, out)
    assert third.returncode == 0
    assert "all 3 prompts" in third.stdout and "submitted job" not in third.stdout


def test_a_batch_still_running_is_not_submitted_twice(deployment, slurm_env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a slow snail\n")
    out = tmp_path / "out"
    first = generate(deployment, slurm_env, prompts, out, "--no-wait",
                     extra_env={"STANDIN_TXT2IMG_SLEEP": "600"})
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = job_id_from(first.stdout)
    assert f"rerun this command to write {out / 'gallery.html'}" in first.stdout
    again = generate(deployment, slurm_env, prompts, out)
    assert again.returncode == 2
    assert f"job {job_id} of this batch ({out}) is still queued or running" in again.stderr
    subprocess.run(["scancel", job_id], env=slurm_env, check=True)
    wait_for_job_state(job_id, slurm_env, "CANCELLED")  # until Slurm has ended it
    finished = generate(deployment, slurm_env, prompts, out)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "1 of 1 prompts to make" in finished.stdout
    assert sorted(prompt_folders(out)) == ["a slow snail"]



def test_generate_after_a_verify_job_runs_only_once_it_passed(deployment, slurm_env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat after the verify\n")
    passing = submit_verify(deployment, slurm_env, "--ntasks", "1", "--gres", "none", "--no-wait",
                            extra_env={"STANDIN_VERIFY_DELAY": "4"})
    verify_id = job_id_from(passing.stdout)
    chained = generate(deployment, slurm_env, prompts, tmp_path / "out", "--after", verify_id,
                       "--no-wait")
    assert chained.returncode == 0, chained.stdout + chained.stderr
    chained_id = job_id_from(chained.stdout)
    held = subprocess.run(["scontrol", "show", "job", "-o", chained_id], env=slurm_env,
                          capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{verify_id}" in held and "JobState=PENDING" in held, held
    verified = wait_for_job_state(verify_id, slurm_env, "COMPLETED", timeout=60)
    made = wait_for_job_state(chained_id, slurm_env, "COMPLETED", timeout=60)
    assert "JobState=COMPLETED" in made, made
    end = re.search(r"EndTime=(\S+)", verified).group(1)
    assert re.search(r"StartTime=(\S+)", made).group(1) >= end  # ISO times sort as text
    assert sorted(prompt_folders(tmp_path / "out")) == ["a cat after the verify"]

    failing = submit_verify(deployment, slurm_env, "--ntasks", "1", "--gres", "none", "--no-wait",
                            extra_env={"STANDIN_VERIFY": "fail", "STANDIN_VERIFY_DELAY": "2"})
    never = generate(deployment, slurm_env, prompts, tmp_path / "out2", "--after",
                     job_id_from(failing.stdout))
    assert never.returncode == 13, never.stdout + never.stderr
    assert "never started (CANCELLED: DependencyNeverSatisfied)" in never.stderr
    assert not list((tmp_path / "out2").glob("*/prompt.json"))
    bad = generate(deployment, slurm_env, prompts, tmp_path / "out3", "--after", "12; rm -rf")
    assert bad.returncode == 2 and "expected a Slurm job id" in bad.stderr


def test_a_thousand_prompts_spread_over_the_array_with_a_paged_gallery_updated_live(
        deployment, slurm_env, tmp_path):
    """1,000 prompts over 4 tasks run one at a time (--max-running 1): each task loads the
    model once; the gallery is written while later tasks still run, and in the end is
    10 pages of 100 prompts whose thumbnails are files loaded lazily."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {n}: a lighthouse in a storm\n" for n in range(1000)))
    out = tmp_path / "out"
    proc = sdrecipe(deployment, "submit", "generate", "--profile", PROFILE, "--prompts",
                    str(prompts), "--out", str(out), "--height", "32", "--width", "32",
                    "--n-samples", "1", "--steps", "5", "--ntasks", "1", "--gres", "dcu:1",
                    "--array-tasks", "4", "--max-running", "1", "--quiet", env=slurm_env,
                    background=True)
    partial_gallery = None
    while proc.poll() is None and partial_gallery is None:
        page = out / "gallery.html"
        text = page.read_text() if page.is_file() else ""
        if "of 1000 prompts done" in text and "1000 of 1000" not in text:
            partial_gallery = text
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout + stderr
    assert partial_gallery, "the gallery was only written at the end"
    # written once a task had ended (250 prompts each), while the next one was running
    assert 250 <= int(re.search(r"(\d+) of 1000 prompts done", partial_gallery).group(1)) < 1000
    assert "1000 of 1000 prompts to make (0 already done), over 4 array tasks" in stdout
    assert len(list(out.glob("*/prompt.json"))) == 1000
    logs = sorted(out.glob("jobs/generate-*/slurm-*_*.out"))
    assert len(logs) == 4
    for log in logs:
        text = log.read_text()
        assert text.count("Loading model from") == 1 and ": 250 prompts, 0 already done" in text
    pages = [out / "gallery.html"] + [out / f"gallery-{n}.html" for n in range(2, 11)]
    assert not (out / "gallery-11.html").exists()
    for number, page in enumerate(pages, 1):
        text = page.read_text()
        assert "1000 of 1000 prompts done" in text
        assert text.count("<section>") == 100 and text.count('loading="lazy"') == 100
        assert f"<b>{(number - 1) * 100 + 1}–{number * 100}</b>" in text  # where you are
        assert "data:image" not in text and page.stat().st_size < 100_000
    assert len(list((out / "thumbnails").glob("*/*.jpg"))) == 1000

# --- interactive ------------------------------------------------------------------------------


def test_salloc_runs_a_command_on_the_node_with_the_module_and_environment(deployment,
                                                                          slurm_env):
    done = sdrecipe(deployment, "salloc", "--profile", PROFILE, "--ntasks", "1", "--run", "--",
                    "bash", "-c", 'echo "module=$DTK_TEST_LOADED profile=$SDRECIPE_PROFILE '
                                  'cwd=$PWD node=$SLURMD_NODENAME"', env=slurm_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"module=1 profile={PROFILE} cwd={deployment.source} node=" in done.stdout


# What a command run by `salloc --run` prints about itself: its task, and its step as
# Slurm sees it (CPUs, tasks, the gres it holds; count-only dcu exports no variable).
WHO_AM_I = ('echo "task=$SLURM_PROCID of $SLURM_STEP_NUM_TASKS visible=$CUDA_VISIBLE_DEVICES"; '
            'scontrol show step "$SLURM_JOB_ID.$SLURM_STEP_ID" -o')


def test_salloc_runs_the_command_once_with_all_of_the_recipes_allocation(deployment, slurm_env):
    """The recipe's dtk-22.10 resources (-n 16 --gres=dcu:2): one process, not 16, and that
    one step holds both DCUs and all 16 CPUs."""
    done = sdrecipe(deployment, "salloc", "--profile", PROFILE, "--run", "--", "bash", "-c",
                    WHO_AM_I, env=slurm_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--ntasks=16 --gres=dcu:2" in done.stderr  # the allocation keeps the recipe's
    assert re.findall(r"task=\d+", done.stdout) == ["task=0"], done.stdout
    step = re.search(r"StepId=\S+ .*", done.stdout).group(0)
    assert " Tasks=1 " in step and " CPUs=16 " in step
    assert re.search(r"TresPerNode=\S*gres:dcu:2", step), step
    printed = sdrecipe(deployment, "salloc", "--profile", PROFILE, env=slurm_env)
    assert "salloc --job-name=sdrecipe-dtk-22.10 --partition=sdtest --nodes=1 --ntasks=16 " \
           "--gres=dcu:2" in printed.stdout
    assert "srun --nodes=1 --ntasks=1 --cpus-per-task=16 --pty bash -l\n" in printed.stdout
    assert "module load compiler/rocm/dtk-22.10.1" in printed.stdout


def test_salloc_command_sees_every_gpu_of_the_allocation(deployment, slurm_env, slurm_cluster):
    if not slurm_cluster.gpus:
        pytest.skip("this machine refuses mknod, so the test cluster has no gpu gres")
    done = sdrecipe(deployment, "salloc", "--profile", "cuda", "--ntasks", "16", "--gres",
                    "gpu:2", "--run", "--", "bash", "-c", WHO_AM_I, env=slurm_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.findall(r"task=.*", done.stdout) == ["task=0 of 1 visible=0,1"], done.stdout


# --- with the real upstream (where a checkout is available) ------------------------------


@pytest.fixture(scope="module")
def smoke_deployment(slurm_env, tmp_path_factory, upstream):
    """A real `sdrecipe deploy --profile cpu --smoke` (upstream from $SDRECIPE_UPSTREAM, env
    built as a venv of Python 3.8): the real txt2img.py on tiny models. Set
    $SDRECIPE_SLURM_SMOKE_DEPLOY to a folder to keep it between runs (deploy is idempotent)."""
    root = Path(os.environ.get("SDRECIPE_SLURM_SMOKE_DEPLOY")
                or tmp_path_factory.mktemp("smoke-deploy"))
    python = PY38 if PY38.exists() else Path(sys.executable)
    done = subprocess.run([sys.executable, "-m", "sdrecipe", "--deploy-dir", str(root), "deploy",
                           "--profile", "cpu", "--smoke", "--python", str(python)],
                          env=dict(slurm_env, SDRECIPE_UPSTREAM=str(upstream)), capture_output=True,
                          text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Deployment(root.resolve())


@pytest.mark.upstream
def test_real_verify_smoke_runs_as_a_job(smoke_deployment, slurm_env):
    env = {k: v for k, v in slurm_env.items() if k != "SDRECIPE_ENGINE"}  # the real sdrecipe
    done = sdrecipe(smoke_deployment, "submit", "verify", "--profile", "cpu", "--smoke",
                    "--cpus-per-task", "2", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "verify report: OK" in done.stdout
    report = next(smoke_deployment.jobs.glob("verify-cpu-*/report/report.json"))
    assert json.loads(report.read_text())["ok"]


@pytest.mark.upstream
def test_real_upstream_prompt_array_matches_standalone_txt2img(smoke_deployment, slurm_env,
                                                                tmp_path):
    """Each prompt's image is byte for byte what upstream's txt2img.py makes alone, also for
    a prompt that is not the first its task runs (the model is loaded once per task)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple on a table\na castle on a hill\na small boat at sea\n")
    out = tmp_path / "out"
    done = sdrecipe(smoke_deployment, "submit", "generate", "--profile", "cpu", "--smoke",
                    "--prompts", str(prompts), "--out", str(out), "--array-tasks", "2",
                    "--height", "256", "--width", "256", "--steps", "5", "--n-samples", "1",
                    "--cpus-per-task", "1", env=slurm_env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    made = prompt_folders(out)
    boat = made["a small boat at sea"]
    assert boat["job"]["array_task"] == 0 and boat["timing"]["model_load_s"] == 0  # 2nd of task 0
    models = smoke_models(load_recipe(ROOT / "recipe" / "stable-diffusion.yaml"), smoke_deployment, "cpu")
    alone = tmp_path / "alone"
    env = {**os.environ, **activation_env(smoke_deployment, "cpu"),
           "SD_MODELS_DIR": str(models.models_dir), "TORCH_HOME": str(models.torch_home)}
    subprocess.run([str(env_python(smoke_deployment, "cpu")), "scripts/txt2img.py",
                    "--prompt", "a small boat at sea", "--outdir", str(alone), "--seed", "42",
                    "--ddim_steps", "5", "--n_samples", "1", "--n_iter", "1", "--H", "256",
                    "--W", "256", "--scale", "7.5", "--precision", "full", "--plms", "--skip_grid",
                    "--config", str(models.config), "--ckpt", str(models.ckpt)],
                   cwd=smoke_deployment.source, env=env, check=True, capture_output=True)
    folder = next(out.glob("a-small-boat-at-sea-*"))
    assert (alone / "samples" / "00000.png").read_bytes() == (folder / "00000.png").read_bytes()


# --- requeue ------------------------------------------------------------------------------


RUN_SPECIFIC = ("timing", "node", "job", "finished")  # a sidecar's facts about the run itself


def batch_outputs(out: Path) -> dict:
    """Every prompt folder's files, byte for byte, with the sidecar minus the facts about
    the run that made it (when, where, which job, how long)."""
    outputs = {}
    for folder in sorted(p for p in out.iterdir() if (p / "prompt.json").is_file()):
        sidecar = json.loads((folder / "prompt.json").read_text())
        outputs[folder.name] = ({k: v for k, v in sidecar.items() if k not in RUN_SPECIFIC},
                                {f.name: f.read_bytes() for f in sorted(folder.iterdir())
                                 if f.name != "prompt.json"})
    return outputs


def test_requeued_array_task_skips_finished_prompts_and_makes_the_same_bytes(
        deployment, slurm_env, tmp_path):
    """`scontrol requeue` of an array task in the middle of a prompt: the task starts over,
    keeps the prompts it had finished, drops the half-made one and makes it again; the
    batch ends byte-identical to an undisturbed run of the same prompts."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {n}\n" for n in range(8)))
    calm, disturbed = tmp_path / "calm", tmp_path / "disturbed"
    sleepy = {"STANDIN_TXT2IMG_SLEEP": "1.5"}
    undisturbed = generate(deployment, slurm_env, prompts, calm, "--array-tasks", "2",
                           extra_env=sleepy)
    assert undisturbed.returncode == 0, undisturbed.stdout + undisturbed.stderr
    proc = sdrecipe(deployment, "submit", "generate", "--profile", PROFILE, "--prompts",
                    str(prompts), "--out", str(disturbed), "--height", "16", "--width", "24",
                    "--n-samples", "2", "--steps", "5", "--ntasks", "1", "--gres", "dcu:1",
                    "--array-tasks", "2", env=slurm_env, extra_env=sleepy, background=True)
    job_id = job_id_from("".join(wait_for_line(proc.stdout, r"submitted job")))
    deadline = time.monotonic() + 60
    while not (disturbed_done := [json.loads(p.read_text()) for p in
                                  disturbed.glob("*/prompt.json")
                                  if json.loads(p.read_text())["job"]["array_task"] == 0]) \
            or not list(disturbed.glob("*.partial-*")):
        assert time.monotonic() < deadline, "task 0 never got a prompt done and one under way"
        time.sleep(0.1)
    before = {s["prompt"]: s["finished"] for s in disturbed_done}
    task = f"{job_id}_0"
    subprocess.run(["scontrol", "requeue", task], env=slurm_env, check=True)
    # Slurm holds a requeued job back for 120 s (Reason=BeginTime), then waits for its next
    # scheduling pass: the restart under test starts at once when an admin says so.
    assert "Reason=BeginTime" in wait_for_job_state(task, slurm_env, "PENDING", timeout=60)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], env=slurm_env,
                   check=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    log = next(disturbed.glob(f"jobs/generate-*/slurm-{job_id}_0.out")).read_text()
    assert f"task 0 of 2: 4 prompts, {len(before)} already done" in log  # the requeued run
    after = prompt_folders(disturbed)
    assert {p: after[p]["finished"] for p in before} == before  # finished prompts not redone
    assert after[next(iter(before))]["job"]["array_task"] == 0
    assert not list(disturbed.glob("*.partial-*"))
    assert batch_outputs(disturbed) == batch_outputs(calm)
    assert len(batch_outputs(calm)) == 8
