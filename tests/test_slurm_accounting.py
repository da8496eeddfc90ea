"""How jobs ended, read from a real accounting database once the controller forgot them.

A second test cluster (tests/slurm_cluster.py with accounting=True): a private
MariaDB, slurmdbd on loopback, the cluster registered by sacctmgr, memory confined
by cgroups where the machine has them, and `MinJobAge=2`, so a finished job soon
leaves `scontrol` and its end state exists only in `sacct`. The jobs are real
`sdrecipe submit verify --no-wait` submissions whose payload is the stand-in of
tests/test_slurm.py; each ends one way: completed, failed, cancelled, out of
memory, timed out, lost to a node failure. Then the engine's poller, `sdrecipe
jobs` and the exit codes are checked against them.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from conftest import running_slurm_cluster
from sdrecipe import watch
from test_slurm import PROFILE, cluster_env, deployment, job_id_from, sdrecipe  # noqa: F401

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def accounting_cluster():
    yield from running_slurm_cluster("slurm-wlm slurmdbd mariadb-server munge lmod",
                                     accounting=True, min_job_age=2)


@pytest.fixture(scope="module")
def acct_env(accounting_cluster, tmp_path_factory):
    return cluster_env(accounting_cluster, tmp_path_factory.mktemp("acct-config"))


def submit(deployment, env, behaviour, *options):  # noqa: F811 -- the imported fixture
    done = sdrecipe(deployment, "submit", "verify", "--profile", PROFILE, "--ntasks", "1",
                    "--gres", "none", "--no-wait", *options, env=env,
                    extra_env={"STANDIN_VERIFY": behaviour})
    assert done.returncode == 0, done.stdout + done.stderr
    return job_id_from(done.stdout)


def forgotten(job_id, env) -> bool:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env,
                           capture_output=True, text=True)
    return "Invalid job id" in shown.stderr


def wait_until_forgotten(job_ids, env, timeout=200.0):
    deadline = time.monotonic() + timeout
    while not all(forgotten(j, env) for j in job_ids):
        assert time.monotonic() < deadline, f"scontrol still shows some of {job_ids}"
        time.sleep(1)


def wait_for_log_line(deployment, job_id, text, timeout=60.0):  # noqa: F811
    deadline = time.monotonic() + timeout
    while True:
        logs = [p.read_text() for p in deployment.jobs.glob(f"verify-*/slurm-{job_id}.out")]
        if any(text in log for log in logs):
            return
        assert time.monotonic() < deadline, f"job {job_id} never logged {text!r}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def ended(deployment, acct_env, accounting_cluster):  # noqa: F811
    """One job per way of ending, all finished and purged from the controller."""
    jobs = {"TIMEOUT": submit(deployment, acct_env, "sleep", "--time", "1"),
            "COMPLETED": submit(deployment, acct_env, "ok"),
            "FAILED": submit(deployment, acct_env, "fail"),
            "CANCELLED": submit(deployment, acct_env, "sleep")}
    if accounting_cluster.oom_enforced:
        jobs["OUT_OF_MEMORY"] = submit(deployment, acct_env, "oom", "--sbatch-arg=--mem=20M")
    wait_for_log_line(deployment, jobs["CANCELLED"], "standin: sleeping")
    subprocess.run(["scancel", jobs["CANCELLED"]], env=acct_env, check=True)
    wait_until_forgotten(list(jobs.values()), acct_env)  # the time limit takes 60-90 s
    # A node failure kills whatever runs on the node, so it comes last, alone.
    jobs["NODE_FAIL"] = submit(deployment, acct_env, "sleep", "--sbatch-arg=--no-requeue")
    wait_for_log_line(deployment, jobs["NODE_FAIL"], "standin: sleeping")
    subprocess.run(["scontrol", "update", f"nodename={accounting_cluster.node}", "state=down",
                    "reason=sdrecipe test: node failure"], env=acct_env, check=True)
    wait_until_forgotten([jobs["NODE_FAIL"]], acct_env)
    deadline = time.monotonic() + 60  # ReturnToService=2: back once slurmd answers
    while not accounting_cluster._node_idle():
        assert time.monotonic() < deadline, "the node did not come back after the failure"
        time.sleep(1)
    return jobs


def test_end_states_and_exit_codes_come_from_sacct(ended, acct_env, monkeypatch,
                                                   accounting_cluster):
    for name, value in acct_env.items():
        monkeypatch.setenv(name, value)
    codes = {}
    for expected, job_id in ended.items():
        assert forgotten(job_id, acct_env)  # so only the accounting database can answer
        tasks = watch.follow(job_id, on_status=lambda line: None)  # returns at once: ended
        assert [t.state for t in tasks] == [expected], (job_id, tasks)
        codes[expected], lines = watch.judge(job_id, tasks)
        if expected == "FAILED":
            assert f"job {job_id} failed with exit code 3 on {accounting_cluster.node}" in lines[0]
        if expected == "TIMEOUT":
            assert "hit its time limit (00:01:00)" in lines[0]
    expected_codes = {"COMPLETED": 0, "FAILED": 10, "TIMEOUT": 11, "CANCELLED": 12,
                      "OUT_OF_MEMORY": 14, "NODE_FAIL": 15}
    if not accounting_cluster.oom_enforced:  # no cgroup v1 memory controller on this machine:
        del expected_codes["OUT_OF_MEMORY"]  # Slurm cannot mark a job OUT_OF_MEMORY here
    assert codes == expected_codes


def test_jobs_lists_the_deployments_jobs_with_their_end_state(ended, deployment, acct_env):  # noqa: F811
    done = sdrecipe(deployment, "jobs", env=acct_env)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert done.stdout.splitlines()[0].split() == ["JOB", "KIND", "PROFILE", "STATE", "ELAPSED",
                                                   "REPORT/GALLERY"]
    for state, job_id in ended.items():
        job, kind, profile, shown, elapsed, where = rows[job_id]
        assert (kind, profile, shown) == ("verify", PROFILE, state)
        assert re.fullmatch(r"\d\d:\d\d:\d\d", elapsed)
        wrote_report = state in ("COMPLETED", "FAILED")  # the others were stopped before
        page = "report/report.html" if wrote_report else "report"
        assert where.endswith(page) and "/jobs/verify-dtk-22.10-" in where
    assert rows[ended["TIMEOUT"]][4] >= "00:01:00"
