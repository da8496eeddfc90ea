"""A deploy interrupted anywhere leaves state that does not lie, and the next deploy repairs it.

One real smoke deployment (the pinned upstream from $SDRECIPE_UPSTREAM, the cpu env as a
venv of Python 3.8) is damaged so that one stage must run again: the environment
removed (env rebuild), a tiny model file deleted (preseed), the report deleted
(verify). The deploy that repairs it is interrupted with SIGINT (Ctrl-C, sent to its
process group as a terminal does) or SIGKILL (the whole group, as a killed job):
- at fixed points: right after the stage marked its record in progress, and right
  before it writes the complete record (its work done), held there by the test hook
  SDRECIPE_TEST_HOLD;
- at random moments (seeded; the seed is printed).
After every interruption `status` may call a stage done only if its work is whole, checked
independently of the records: every locked pip package importable-installed in the env,
the tiny models byte-identical to the first deployment's, a passing report with its
image. Then the next deploy completes and verifies.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import required_or_skip
from env_helpers import PY38

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("SDRECIPE_TEST_SEED", time.time_ns() % 100_000))

pytestmark = [pytest.mark.slow, pytest.mark.upstream]


def environ(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDRECIPE_")}
    return {**env, "PYTHONPATH": str(ROOT / "src"), **extra}


def sdrecipe(world, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(world["recipe"]),
                           "--deploy-dir", str(world["deploy"]), *args],
                          capture_output=True, text=True, env=environ(), timeout=900)


def file_hashes(root: Path) -> dict:
    import hashlib
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, upstream):
    if not Path(PY38).is_file():
        required_or_skip(f"no Python 3.8 at {PY38} (set SDRECIPE_TEST_PY38)")
    base = tmp_path_factory.mktemp("interrupt")
    for name in ("recipe", "patches", "lock", "env"):
        shutil.copytree(ROOT / name, base / "project" / name)
    found = {"recipe": base / "project" / "recipe" / "stable-diffusion.yaml",
             "deploy": base / "deploy"}
    first = sdrecipe(found, "deploy", "--profile", "cpu", "--smoke", "--python", PY38,
                     "--source", str(upstream))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    found["models"] = file_hashes(found["deploy"] / "smoke")
    print(f"\ninterruption moments seeded with SDRECIPE_TEST_SEED={SEED}")
    return found


# --- the truth, checked without the records ------------------------------------------------------

def env_whole(deploy: Path) -> bool:
    """Every package of the cpu lock's pip layer (and venv stand-ins) is installed."""
    python = deploy / "envs" / "cpu" / "bin" / "python"
    if not python.exists():
        return False
    listed = subprocess.run([str(python), "-c", "import importlib.metadata as m, json; "
                             "print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        return False
    from packaging.utils import canonicalize_name
    installed = {canonicalize_name(n) for n in json.loads(listed.stdout)}
    from sdrecipe.lock import load_lock
    from sdrecipe.project import load_recipe
    lock = load_lock(load_recipe(ROOT / "recipe" / "stable-diffusion.yaml"), "cpu")
    return {canonicalize_name(p.name) for p in lock.pip + lock.venv} <= installed


def preseed_whole(world) -> bool:
    folder = world["deploy"] / "smoke"
    return folder.is_dir() and file_hashes(folder) == world["models"]


def verify_whole(world) -> bool:
    folder = world["deploy"] / "reports" / "cpu" / "smoke"
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return report["ok"] and all((folder / image).is_file() for image in report["images"])


def assert_status_is_honest(world, when: str):
    result = sdrecipe(world, "status", "--profile", "cpu", "--smoke", "--format", "json")
    found = {s["stage"]: s["state"] for s in json.loads(result.stdout)["stages"]}
    whole = {"env": lambda: env_whole(world["deploy"]), "preseed": lambda: preseed_whole(world),
             "verify": lambda: verify_whole(world) and env_whole(world["deploy"])
             and preseed_whole(world)}
    lies = [stage for stage, check in whole.items() if found[stage] == "done" and not check()]
    assert not lies, f"{when}: status says {lies} done, but the work is not whole: {found}"
    return found


def assert_next_deploy_repairs(world, when: str):
    again = sdrecipe(world, "deploy", "--profile", "cpu", "--smoke")
    assert again.returncode == 0, f"{when}: the next deploy failed:\n" + again.stdout[-3000:] \
        + again.stderr[-3000:]
    found = assert_status_is_honest(world, f"{when}, repaired")
    assert set(found.values()) <= {"done", "skipped"} and found["verify"] == "done", found
    assert env_whole(world["deploy"]) and preseed_whole(world) and verify_whole(world)


# --- interrupting -----------------------------------------------------------------------------

DAMAGE = {
    "env": lambda deploy: shutil.rmtree(deploy / "envs" / "cpu"),
    "preseed": lambda deploy: (deploy / "smoke" / "models" / "clip-vit-large-patch14"
                               / "vocab.json").unlink(),
    "verify": lambda deploy: shutil.rmtree(deploy / "reports" / "cpu" / "smoke"),
}
# How long each stage takes to run here (the env: a venv and 66 wheels from pip's cache).
RUNS_FOR_S = {"env": 8.0, "preseed": 2.5, "verify": 3.0}  # env: uv from warm caches


def start_deploy(world, hold: str | None = None) -> subprocess.Popen:
    """The deploy in its own process group with SIGINT restored: a child that a
    non-interactive shell (or pytest) starts may otherwise ignore it."""
    return subprocess.Popen(
        [sys.executable, "-m", "sdrecipe", "--recipe", str(world["recipe"]), "--deploy-dir",
         str(world["deploy"]), "deploy", "--profile", "cpu", "--smoke"],
        env=environ(**({"SDRECIPE_TEST_HOLD": hold} if hold else {})), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 300) -> None:
    """Read the deploy's output (raw: a buffered reader would hide lines from select)
    until a line holds `text`."""
    import select
    deadline, seen = time.monotonic() + timeout, b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            if any(text.encode() in line for line in seen.splitlines()):
                return
    raise AssertionError(f"never saw {text!r}; the deploy printed:\n{seen.decode()[-3000:]}")


def interrupt(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the deploy's whole process group; wait until every member is gone."""
    with_children = proc.pid
    try:
        os.killpg(with_children, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # fail this test only: no deploy left holding the lock
        os.killpg(with_children, signal.SIGKILL)
        proc.wait()
        raise
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(with_children, 0)
        except ProcessLookupError:
            return
        if sig == signal.SIGINT and time.monotonic() > deadline - 50:
            os.killpg(with_children, signal.SIGKILL)  # a child that outlived Ctrl-C
        time.sleep(0.2)


SIGNALS = {"SIGINT": signal.SIGINT, "SIGKILL": signal.SIGKILL}


def test_the_reported_scenario_ctrl_c_during_an_env_rebuild(world):
    """rm -rf the env, deploy, Ctrl-C 3 s into the env rebuild (uv is installing and
    compiling then: the build takes 7-10 s here): env is not done, and deploy rebuilds it."""
    DAMAGE["env"](world["deploy"])
    proc = start_deploy(world)
    wait_for_line(proc, "env        ")
    time.sleep(3)
    interrupt(proc, signal.SIGINT)
    found = assert_status_is_honest(world, "Ctrl-C 3 s into the env rebuild")
    assert found["env"] != "done" and found["verify"] != "done", found
    again = sdrecipe(world, "deploy", "--profile", "cpu", "--smoke")
    assert "complete in 0." not in again.stdout and "env        " in again.stdout
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_next_deploy_repairs(world, "after the scenario")


@pytest.mark.parametrize("signame", SIGNALS)
@pytest.mark.parametrize("point", ["begin", "finish"])
@pytest.mark.parametrize("stage", ["env", "preseed", "verify"])
def test_interrupted_at_a_fixed_point(world, stage, point, signame):
    DAMAGE[stage](world["deploy"])
    proc = start_deploy(world, hold=f"{stage}:{point}")
    wait_for_line(proc, f"test hold at {stage}:{point}")
    interrupt(proc, SIGNALS[signame])
    when = f"{signame} at {stage}:{point}"
    found = assert_status_is_honest(world, when)
    assert found[stage] != "done" and found["verify"] != "done", f"{when}: {found}"
    assert_next_deploy_repairs(world, when)


@pytest.mark.parametrize("moment", range(3))
@pytest.mark.parametrize("stage", ["env", "preseed", "verify"])
def test_interrupted_at_a_random_moment(world, stage, moment):
    rng = random.Random(f"{SEED}-{stage}-{moment}")
    signame = ("SIGINT", "SIGKILL")[moment % 2]
    delay = rng.uniform(0.2, RUNS_FOR_S[stage])
    DAMAGE[stage](world["deploy"])
    proc = start_deploy(world)
    wait_for_line(proc, f"{stage:<10} ")  # the stage's first line: it is about to run
    time.sleep(delay)
    interrupt(proc, SIGNALS[signame])
    when = f"{signame} {delay:.2f} s into {stage} (seed {SEED})"
    assert_status_is_honest(world, when)
    assert_next_deploy_repairs(world, when)
