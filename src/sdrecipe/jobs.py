"""`sdrecipe submit verify|generate` and `sdrecipe salloc`: run the deployment as Slurm jobs.

`submit` prepares a job (its folder under the deployment, the batch script from
`slurm.batch_script`, the files the payload reads), submits it, follows it
(`watch.follow`: state changes and the log as it grows) and collects what it
made: the verify report, or a prompt batch's images and `gallery.html`. The
exit code says how the job ended (`watch.EXIT_CODES`, also in README).
`salloc` prints or runs the interactive equivalent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import batch, gallery, slurm
from .config import load_config
from .errors import SdrecipeError
from .payload import txt2img_batch as runner
from .watch import EXIT_CODES, follow, judge

# --- preparing a job ---------------------------------------------------------------------------


@dataclass
class PreparedJob:
    """A job ready to submit: its folder, script, extra files and how to collect it."""

    folder: Path
    spec: slurm.JobSpec
    files: dict[Path, str] = field(default_factory=dict)
    collect: Callable[[list], None] = lambda tasks: None
    later: str = ""  # where the results will be, for --no-wait

    @property
    def script(self) -> Path:
        return self.folder / "job.sh"


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
    print(f"sdrecipe: note: {problem}", file=sys.stderr)


def _spec(ctx, profile, resources, name, folder, command, array=None, log="slurm-%j.out",
          environment=()):
    from .environment.location import activation_script
    recipe, deployment, dry_run = ctx.recipe, ctx.deployment, ctx.args.dry_run
    _require(deployment.source.is_dir(),
             f"no deployment at {deployment.root} (no {deployment.source}): run sdrecipe deploy "
             f"--profile {profile} first, or pass --deploy-dir", dry_run)
    activation = activation_script(deployment, profile)
    _require(activation.is_file(),
             f"the {profile} environment is not built in {deployment.root} ({activation} is "
             f"missing): run sdrecipe env build --profile {profile} (or sdrecipe deploy "
             f"--profile {profile}) first", dry_run)
    return slurm.JobSpec(
        name=name, resources=resources, output=str(folder / log),
        modules=recipe.profile(profile).modules, activation=str(activation),
        accelerator=recipe.profile(profile).accelerator, workdir=str(deployment.source),
        command=command, array=array, profile=profile, environment=tuple(environment))


def prepare_verify(ctx, profile: str, resources, config) -> PreparedJob:
    deployment = ctx.deployment
    folder = _new_folder(deployment.jobs, f"verify-{profile}")
    report = folder / "report"
    command = (f"{engine_command(config)} --recipe {shlex.quote(str(ctx.recipe.path.resolve()))} "
               f"--deploy-dir {shlex.quote(str(deployment.root))} verify --profile {profile}"
               + (" --smoke" if ctx.args.smoke else "") + f" --out {shlex.quote(str(report))}")
    spec = _spec(ctx, profile, resources, f"sdrecipe-verify-{profile}", folder, command)
    return PreparedJob(folder, spec, collect=lambda tasks: collect_report(report, tasks),
                       later=f"its report will be in {report}")


def collect_report(report: Path, tasks, wait_s: float = 30.0):
    """Print the verify report's verdict.

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
            print(f"sdrecipe: the job wrote no verify report at {path}", file=sys.stderr)
        return
    data = json.loads(path.read_text())
    failed = [c for c in data.get("checks", []) if not c.get("ok")]
    timings = ", ".join(f"{k} {v}" for k, v in (data.get("timings") or {}).items())
    print(f"sdrecipe: verify report: {'OK' if data.get('ok') else 'FAILED'} "
          f"({len(data.get('checks', [])) - len(failed)}/{len(data.get('checks', []))} checks, "
          f"{len(data.get('images', []))} images{'; ' + timings if timings else ''})")
    for check in failed:
        print(f"  failed check {check.get('name')}: {check.get('message')}")
    print(f"sdrecipe: report: {report / 'report.html'}")


def generation_settings(recipe, profile: str, args) -> dict:
    """Upstream's defaults; the precision the recipe's verify sample uses on this profile
    (full on cpu); then the options."""
    from .verify import verify_spec
    settings = dict(batch.DEFAULT_SETTINGS, smoke=args.smoke,
                    precision=verify_spec(recipe).sample(profile, args.smoke).precision)
    for key, value in (("sampler", args.sampler), ("steps", args.steps),
                       ("n_samples", args.n_samples), ("n_iter", args.n_iter), ("H", args.height),
                       ("W", args.width), ("scale", args.scale), ("seed", args.seed),
                       ("precision", args.precision)):
        if value is not None:
            settings[key] = value
    return settings


def _models(recipe, deployment, profile: str, smoke: bool):
    """The weights txt2img loads (verify's choice of real or smoke files), checked present."""
    from .models import models_for
    models = models_for(recipe, deployment, profile, smoke)
    if not models.ckpt.is_file():
        how = "sdrecipe deploy --smoke" if smoke else "sdrecipe fetch"
        raise SdrecipeError(f"no checkpoint at {models.ckpt}: run {how} first")
    return models


JOB_ID_FILE = "job_id"


def _unfinished_jobs(out: Path) -> list[str]:
    """Jobs submitted earlier for this batch that Slurm still runs or queues."""
    unfinished = []
    for record in sorted(out.glob(f"jobs/*/{JOB_ID_FILE}")):
        job_id = record.read_text().strip()
        tasks = slurm.query(job_id)
        if tasks and not all(t.done for t in tasks):
            unfinished.append(job_id)
    return unfinished


def prepare_generate(ctx, profile: str, resources) -> PreparedJob | None:
    """An array job over the prompts not done yet; None when every prompt is done."""
    args, deployment = ctx.args, ctx.deployment
    settings = generation_settings(ctx.recipe, profile, args)
    entries = batch.plan(args.prompts, settings)
    out = Path(args.out).resolve() if args.out else deployment.outputs / Path(args.prompts).stem
    running = [] if args.dry_run else _unfinished_jobs(out)
    if running:
        raise SdrecipeError(f"job {', '.join(running)} of this batch ({out}) is still queued or "
                            "running: wait for it (it finishes the same prompts) or scancel it, "
                            "then rerun to finish the rest")
    todo = batch.pending(entries, out)
    title = f"{Path(args.prompts).name}: {len(entries)} prompts"
    if not todo:
        print(f"sdrecipe: all {len(entries)} prompts of {args.prompts} are done in {out}")
        if not args.dry_run:
            _report_gallery(entries, out, title)
        return None
    tasks = min(args.array_tasks or slurm.profile_defaults(ctx.recipe, profile).array_tasks,
                len(todo))
    print(f"sdrecipe: {len(todo)} of {len(entries)} prompts to make "
          f"({len(entries) - len(todo)} already done), over {tasks} array tasks")
    models = _models(ctx.recipe, deployment, profile, args.smoke)
    folder = _new_folder(out / "jobs", "generate")
    manifest, payload = folder / "manifest.json", folder / "txt2img_batch.py"
    from .environment.location import env_python
    command = (f"{shlex.quote(str(env_python(deployment, profile)))} {shlex.quote(str(payload))} "
               f"{shlex.quote(str(manifest))} \"${{SLURM_ARRAY_TASK_ID:-0}}\" {tasks}")
    array = f"0-{tasks - 1}" + (f"%{args.max_running}" if args.max_running else "")
    spec = _spec(ctx, profile, resources, f"sdrecipe-generate-{profile}", folder, command,
                 array=array, log="slurm-%A_%a.out",
                 environment=[("SD_MODELS_DIR", str(models.models_dir))]
                 + ([("TORCH_HOME", str(models.torch_home))] if models.torch_home else []))
    job = PreparedJob(folder, spec, collect=lambda tasks: _report_gallery(entries, out, title),
                      later=f"rerun this command to write {out / gallery.GALLERY}")
    job.files[payload] = Path(runner.__file__).read_text()
    job.files[manifest] = batch.manifest_text(todo, settings, out, deployment.source, models)
    return job


def _report_gallery(entries, out: Path, title: str):
    out.mkdir(parents=True, exist_ok=True)
    path, done = gallery.write_gallery(entries, out, title)
    print(f"sdrecipe: gallery: {path} ({done} of {len(entries)} prompts done)")


def _interrupted(job_id: str, log_hint: str) -> int:
    if sys.stdin.isatty():
        try:
            answer = input(f"\nsdrecipe: cancel job {job_id} with scancel? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer in ("y", "yes"):
            slurm.scancel(job_id)
            print(f"sdrecipe: cancelled job {job_id}", file=sys.stderr)
            return EXIT_CODES["INTERRUPTED"]
    print(f"\nsdrecipe: job {job_id} keeps running. Cancel it with: scancel {job_id}\n"
          f"  follow its log with: tail -f {log_hint}", file=sys.stderr)
    return EXIT_CODES["INTERRUPTED"]


# --- the commands ------------------------------------------------------------------------------


def _resources(ctx, profile: str, config):
    args = ctx.args
    overrides = {"partition": args.partition, "account": args.account, "qos": args.qos,
                 "nodes": args.nodes, "ntasks": args.ntasks, "cpus_per_task": args.cpus_per_task,
                 "gres": args.gres, "time": args.time}
    resources = slurm.resolve_resources(ctx.recipe, profile, config, overrides)
    if args.sbatch_arg:
        resources = dataclasses.replace(resources, extra=tuple(args.sbatch_arg))
    return resources


def submit_command(ctx) -> int:
    args = ctx.args
    profile = ctx.profile()
    config = load_config()
    resources = _resources(ctx, profile, config)
    job = (prepare_verify(ctx, profile, resources, config) if args.kind == "verify"
           else prepare_generate(ctx, profile, resources))
    if job is None:
        return 0
    script = slurm.batch_script(job.spec)
    if args.dry_run:
        print(script, end="")
        job.folder.rmdir()  # made empty by prepare: a dry run leaves nothing behind,
        with contextlib.suppress(OSError):
            job.folder.parent.rmdir()  # nor the jobs folder it may have made (if empty)
        return 0
    for path, text in job.files.items():
        path.write_text(text)
    job.script.write_text(script)
    job_id = slurm.sbatch(job.script)
    (job.folder / JOB_ID_FILE).write_text(job_id + "\n")
    log_hint = job.spec.output.replace("%j", job_id).replace("%A", job_id).replace("%a", "*")
    print(f"sdrecipe: submitted job {job_id} ({job.script})", flush=True)
    if args.no_wait:
        print(f"sdrecipe: follow it with: tail -f {log_hint}; {job.later}")
        return 0
    try:
        tasks = follow(job_id, stream=not args.quiet)
    except KeyboardInterrupt:
        return _interrupted(job_id, log_hint)
    code, lines = judge(job_id, tasks)
    for line in lines:
        print(line, file=sys.stderr if code else sys.stdout)
    job.collect(tasks)
    return code


def salloc_command(ctx) -> int:
    """Print the interactive sequence, or run it: salloc, then a shell on the node, set up."""
    args = ctx.args
    profile = ctx.profile()
    resources = _resources(ctx, profile, load_config())
    from .environment.location import activation_script
    setup = slurm.interactive_lines(ctx.recipe.profile(profile).modules,
                                    str(activation_script(ctx.deployment, profile)),
                                    str(ctx.deployment.source))
    allocate = slurm.salloc_command(resources, f"sdrecipe-{profile}")
    if not args.run:
        print("# 1. ask for an allocation (on the login node):")
        print(shlex.join(allocate))
        print("# 2. open a shell on the allocated node:")
        print("srun --pty bash -l")
        print("# 3. inside that shell:")
        print("\n".join(setup))
        return 0
    rc = ctx.deployment.jobs / f"salloc-{profile}.rc"
    rc.parent.mkdir(parents=True, exist_ok=True)
    body = ["[ -f ~/.bashrc ] && . ~/.bashrc", slurm.MODULE_SETUP] + setup
    rc.write_text("\n".join(body) + "\n")
    if args.command:  # run one command in the prepared environment instead of a shell
        inner = ["bash", "-c", f'. {shlex.quote(str(rc))} && exec "$@"', "sdrecipe", *args.command]
    else:
        inner = ["--pty", "bash", "--rcfile", str(rc), "-i"]
    argv = allocate + ["srun"] + inner
    print("sdrecipe: " + shlex.join(argv), file=sys.stderr)
    return subprocess.call(argv)
