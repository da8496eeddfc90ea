"""Slurm jobs of a deployment, prepared here and run by `sdrecipe submit` and `sdrecipe salloc`
(commands/submit.py, commands/salloc.py).

A job is a folder of its own under the deployment: the batch script from
`slurm.batch_script`, the files its payload reads and, once submitted, its id.
`prepare_verify` makes the job that runs `sdrecipe verify`; `plan_batch` and
`prepare_generate` the array job over the prompts of a prompt file not done yet.
After the job, `collect_report` reads the verify report and `write_gallery` the
batch's `gallery.html`. `interactive` is a job's interactive equivalent. Nothing
here prints: the commands show what these return, and follow the job
(`watch.follow`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import batch, gallery, slurm
from .errors import SdrecipeError
from .payload import txt2img_batch as runner

log = logging.getLogger("sdrecipe.jobs")

JOB_ID_FILE = "job_id"
SUBMITTED = "submitted.jsonl"  # in <deploy>/jobs/: one line per job submitted, for `sdrecipe jobs`


# --- a job -------------------------------------------------------------------------------------


@dataclass
class PreparedJob:
    """A job ready to submit: its folder, what its script runs, the files it reads, and where
    its results will be (the verify report's folder, or the batch's output folder)."""

    folder: Path
    spec: slurm.JobSpec
    results: Path
    kind: str  # verify or generate
    files: dict[Path, str] = field(default_factory=dict)

    @property
    def script(self) -> Path:
        return self.folder / "job.sh"

    def batch_script(self) -> str:
        return slurm.batch_script(self.spec)

    def log_hint(self, job_id: str) -> str:
        """The job's log file(s), for `tail -f`."""
        return self.spec.output.replace("%j", job_id).replace("%A", job_id).replace("%a", "*")

    def log_of(self, task_id: str) -> str:
        """The log file of one job or array task ("12" or "12_3")."""
        job_id, _, index = task_id.partition("_")
        return self.spec.output.replace("%j", job_id).replace("%A", job_id).replace("%a", index)


def submit(job: PreparedJob, deployment) -> str:
    """Write the job's files and script, submit it, keep its id in its folder (a rerun of a
    batch looks for jobs still running) and add it to the deployment's list of jobs;
    returns the id."""
    for path, text in job.files.items():
        path.write_text(text)
    job.script.write_text(job.batch_script())
    job_id = slurm.sbatch(job.script)
    (job.folder / JOB_ID_FILE).write_text(job_id + "\n")
    entry = {"id": job_id, "kind": job.kind, "profile": job.spec.profile,
             "folder": str(job.folder), "results": str(job.results),
             "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    deployment.jobs.mkdir(parents=True, exist_ok=True)
    with open(deployment.jobs / SUBMITTED, "a", encoding="utf-8") as handle:  # one short
        handle.write(json.dumps(entry) + "\n")  # O_APPEND write per job: no lost lines
    return job_id


@dataclass(frozen=True)
class JobRow:
    """One submitted job as `sdrecipe jobs` lists it."""

    id: str
    kind: str
    profile: str
    state: str  # Slurm's, e.g. COMPLETED, or "3 COMPLETED, 1 FAILED" over an array
    elapsed: str
    results: str  # the report or gallery page, else the folder it will be in


def _results_page(entry: dict) -> str:
    results = Path(entry["results"])
    page = results / ("report.html" if entry["kind"] == "verify" else gallery.GALLERY)
    return str(page if page.is_file() else results)


def _state_summary(tasks) -> str:
    if tasks is None:
        return "UNKNOWN (forgotten by Slurm; no accounting to ask)"
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.state] = counts.get(task.state, 0) + 1
    if len(tasks) == 1:
        return tasks[0].state
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))


def submitted_jobs(deployment, profile: str | None = None) -> list[JobRow]:
    """The deployment's jobs, oldest first, with their state from Slurm (scontrol while
    it remembers them, then sacct) and the longest task's elapsed time."""
    path = deployment.jobs / SUBMITTED
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a line cut short by a full disk: skip it, keep the others
            continue
        if profile and entry.get("profile") != profile:
            continue
        tasks = slurm.query(entry["id"])
        elapsed = max((t.elapsed for t in tasks or () if t.elapsed), default="",
                      key=slurm.seconds_of)
        rows.append(JobRow(entry["id"], entry["kind"], entry.get("profile", ""),
                           _state_summary(tasks), elapsed or "-", _results_page(entry)))
    return rows


def discard(job: PreparedJob) -> None:
    """Remove the (empty) folder prepared for a job not submitted, and the jobs folder it
    may have made: a dry run leaves nothing behind."""
    job.folder.rmdir()
    with contextlib.suppress(OSError):
        job.folder.parent.rmdir()


def job_resources(target, overrides: dict, sbatch_args=(), after: str | None = None
                  ) -> slurm.Resources:
    """The recipe's resources for the profile with the site's partition, account and qos,
    then the person's `overrides` (None: not given) and extra sbatch options; `after`: a
    job id this one waits for, running only if it completed (afterok)."""
    resources = slurm.resolve_resources(target.recipe, target.profile, target.config, overrides)
    extra = tuple(sbatch_args) + (slurm.after_ok(after) if after else ())
    if extra:
        resources = dataclasses.replace(resources, extra=extra)
    return resources


def _new_folder(parent: Path, prefix: str) -> Path:
    """A job folder of its own, made here: two submissions in the same second (two
    terminals, or a script) must never share one, so mkdir itself decides."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = parent / (f"{prefix}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def engine_command(config) -> str:
    """How a compute node runs this sdrecipe: the site's setting, else this very interpreter."""
    if config.get("engine"):
        return config.get("engine")
    src = Path(__file__).resolve().parents[1]
    return f"env PYTHONPATH={shlex.quote(str(src))}${{PYTHONPATH:+:$PYTHONPATH}} " \
           f"{shlex.quote(sys.executable)} -m sdrecipe"


def _require(present: bool, problem: str, dry_run: bool):
    """A missing part stops a submission; a dry run only notes it, to show the script anyway."""
    if present:
        return
    if not dry_run:
        raise SdrecipeError(problem)
    log.info("note: %s", problem)


def _spec(target, resources, name, folder, command, dry_run, array=None, log_name="slurm-%j.out",
          environment=()):
    from .environment.location import activation_script, env_modules
    deployment, profile = target.deployment, target.profile
    _require(deployment.source.is_dir(),
             f"no deployment at {deployment.root} (no {deployment.source}): run "
             f"{target.command('deploy')} first, or pass --deploy-dir", dry_run)
    activation = activation_script(deployment, profile)
    _require(activation.is_file(),
             f"the {profile} environment is not built in {deployment.root} ({activation} is "
             f"missing): run {target.command('env build')} (or {target.command('deploy')}) "
             "first", dry_run)
    chosen = target.recipe.profile(profile)
    return slurm.JobSpec(
        name=name, resources=resources, output=str(folder / log_name), modules=env_modules(target.recipe, deployment, profile),
        activation=str(activation), accelerator=chosen.accelerator,
        workdir=str(deployment.source), command=command, array=array, profile=profile,
        environment=tuple(environment))


# --- verify in a job ---------------------------------------------------------------------------


def prepare_verify(target, resources, dry_run: bool = False) -> PreparedJob:
    """A job that runs `sdrecipe verify` for the target (its mode too) into the job's folder."""
    deployment, profile = target.deployment, target.profile
    folder = _new_folder(deployment.jobs, f"verify-{profile}")
    report = folder / "report"
    command = (f"{engine_command(target.config)} "
               f"--recipe {shlex.quote(str(target.recipe.path.resolve()))} "
               f"--deploy-dir {shlex.quote(str(deployment.root))} verify --profile {profile}"
               + (" --smoke" if target.smoke else "") + f" --out {shlex.quote(str(report))}")
    spec = _spec(target, resources, f"sdrecipe-verify-{profile}", folder, command, dry_run)
    return PreparedJob(folder, spec, results=report, kind="verify")


def collect_report(report: Path, tasks, wait_s: float = 30.0) -> dict | None:
    """The report.json the verify job wrote in `report`; None when it wrote none.

    A payload that ran to its end wrote a report; a shared filesystem may show it
    to the login node a few seconds late, so wait for it then. A job that was
    cancelled or timed out has none to wait for.
    """
    path = report / "report.json"
    ran_to_end = all(t.state in ("COMPLETED", "FAILED") for t in tasks)
    deadline = time.monotonic() + (wait_s if ran_to_end else 0)
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(1)
    if not path.is_file():
        if ran_to_end:
            log.warning("the job wrote no verify report at %s", path)
        return None
    return json.loads(path.read_text())


# --- a prompt batch as an array job ------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """The txt2img settings asked of a prompt batch; None keeps upstream's default
    (`batch.DEFAULT_SETTINGS`), for precision the recipe's verify precision of the profile."""

    sampler: str | None = None
    steps: int | None = None
    n_samples: int | None = None
    n_iter: int | None = None
    height: int | None = None
    width: int | None = None
    scale: float | None = None
    seed: int | None = None
    precision: str | None = None

    def overrides(self) -> dict:
        """The settings given, under txt2img's names (`H`, `W` for the image size)."""
        names = {"height": "H", "width": "W"}
        return {names.get(f.name, f.name): getattr(self, f.name)
                for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def generation_settings(target, sampling: Sampling) -> dict:
    """Upstream's defaults; the precision the recipe's verify sample uses on this profile
    (full on cpu); then the settings asked."""
    from .verify import verify_spec
    precision = verify_spec(target.recipe).sample(target.profile, target.smoke).precision
    return {**batch.DEFAULT_SETTINGS, "smoke": target.smoke, "precision": precision,
            **sampling.overrides()}


@dataclass(frozen=True)
class PromptBatch:
    """A prompt file planned against its output folder: every prompt, and those not done."""

    prompts: Path
    out: Path
    settings: dict
    entries: list
    todo: list

    @property
    def title(self) -> str:
        return f"{self.prompts.name}: {len(self.entries)} prompts"


def plan_batch(target, prompts: Path, out: Path | None = None,
               sampling: Sampling = Sampling()) -> PromptBatch:
    """The prompts of `prompts` with the settings asked, and which of them `out` (default:
    <deploy>/outputs/<prompt file name>) does not hold yet."""
    settings = generation_settings(target, sampling)
    entries = batch.plan(prompts, settings)
    out = Path(out).resolve() if out else target.deployment.outputs / Path(prompts).stem
    return PromptBatch(Path(prompts), out, settings, entries, batch.pending(entries, out))


def _unfinished_jobs(out: Path) -> list[str]:
    """Jobs submitted earlier for this batch that Slurm still runs or queues."""
    unfinished = []
    for record in sorted(out.glob(f"jobs/*/{JOB_ID_FILE}")):
        job_id = record.read_text().strip()
        tasks = slurm.query(job_id)
        if tasks and not all(t.done for t in tasks):
            unfinished.append(job_id)
    return unfinished


def refuse_if_running(planned: PromptBatch) -> None:
    """A batch is submitted once at a time: a second job would make the same prompts."""
    running = _unfinished_jobs(planned.out)
    if running:
        raise SdrecipeError(f"job {', '.join(running)} of this batch ({planned.out}) is still "
                            "queued or running: wait for it (it finishes the same prompts) or "
                            "scancel it, then rerun to finish the rest")


def array_tasks(target, planned: PromptBatch, asked: int | None = None) -> int:
    """How many array tasks share the prompts to make: as asked, else the recipe's
    `array_tasks` for the profile, never more than there are prompts."""
    default = slurm.profile_defaults(target.recipe, target.profile).array_tasks
    return min(asked or default, len(planned.todo))


def _models(target):
    """The weights txt2img loads (verify's choice of real or smoke files), checked present."""
    from .models import models_for
    models = models_for(target.recipe, target.deployment, target.profile, target.smoke)
    if not models.ckpt.is_file():
        how = target.command("deploy" if target.smoke else "fetch")
        raise SdrecipeError(f"no checkpoint at {models.ckpt}: run {how} first")
    return models


def _proven(target) -> list:
    """Real mode: the pinned model files, proven now (hash before unpickle) and proven again
    by the task before it loads any (smoke's tiny generated models carry no pins)."""
    if target.smoke:
        return []
    from .artifacts import prove_pinned
    return prove_pinned(target)


def prepare_generate(target, resources, planned: PromptBatch, tasks: int,
                     max_running: int | None = None, dry_run: bool = False) -> PreparedJob:
    """An array job of `tasks` tasks over the batch's prompts not done yet (at most
    `max_running` at once); the runner and its manifest are copied into the job's folder,
    so a later change of the checkout cannot alter a queued job."""
    from .environment.location import env_python
    deployment, profile = target.deployment, target.profile
    models = _models(target)
    folder = _new_folder(planned.out / "jobs", "generate")
    manifest, payload = folder / "manifest.json", folder / "txt2img_batch.py"
    command = (f"{shlex.quote(str(env_python(deployment, profile)))} {shlex.quote(str(payload))} "
               f"{shlex.quote(str(manifest))} \"${{SLURM_ARRAY_TASK_ID:-0}}\" {tasks}")
    array = f"0-{tasks - 1}" + (f"%{max_running}" if max_running else "")
    environment = [("SD_MODELS_DIR", str(models.models_dir))]
    if models.torch_home:
        environment.append(("TORCH_HOME", str(models.torch_home)))
    spec = _spec(target, resources, f"sdrecipe-generate-{profile}", folder, command, dry_run,
                 array=array, log_name="slurm-%A_%a.out", environment=environment)
    job = PreparedJob(folder, spec, results=planned.out, kind="generate")
    job.files[payload] = Path(runner.__file__).read_text()
    job.files[manifest] = batch.manifest_text(planned.todo, planned.settings, planned.out,
                                              deployment.source, models, _proven(target))
    return job


def write_gallery(planned: PromptBatch) -> tuple[Path, int]:
    """The batch's gallery.html as it stands; returns its path and how many prompts are done."""
    planned.out.mkdir(parents=True, exist_ok=True)
    return gallery.write_gallery(planned.entries, planned.out, planned.title)


# --- interactive ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """A job's interactive equivalent: an allocation, then a shell on its node set up as the
    batch script sets up a job (modules, activation, the checkout as cwd)."""

    allocate: list  # salloc's argv, run on the login node
    step: list  # srun's argv up to what it runs: one task with the whole allocation
    setup: list  # the shell lines that set up the node's shell


def interactive(target, resources) -> Session:
    from .environment.location import activation_script, env_modules
    setup = slurm.interactive_lines(env_modules(target.recipe, target.deployment, target.profile),
                                    str(activation_script(target.deployment, target.profile)),
                                    str(target.deployment.source))
    return Session(slurm.salloc_command(resources, f"sdrecipe-{target.profile}"),
                   slurm.single_step(resources), setup)


def session_argv(target, session: Session, command=()) -> list[str]:
    """salloc, then one srun task of an interactive shell set up by an rc file written here,
    or of `command` run once in that set-up shell instead."""
    rc = target.deployment.jobs / f"salloc-{target.profile}.rc"
    rc.parent.mkdir(parents=True, exist_ok=True)
    body = ["[ -f ~/.bashrc ] && . ~/.bashrc", slurm.MODULE_SETUP] + session.setup
    rc.write_text("\n".join(body) + "\n")
    if command:
        inner = ["bash", "-c", f'. {shlex.quote(str(rc))} && exec "$@"', "sdrecipe", *command]
    else:
        inner = ["--pty", "bash", "--rcfile", str(rc), "-i"]
    return session.allocate + session.step + inner
