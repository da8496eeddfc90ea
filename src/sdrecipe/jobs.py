"""`sdrecipe submit verify|generate` and `sdrecipe salloc`: run the deployment as Slurm jobs.

`submit` writes the batch script (see `slurm.batch_script`), submits it, follows
it and collects what it made: the verify report, or a prompt batch's images and
`gallery.html`. Following means polling `scontrol` with a backoff from 1 s to
15 s (about 250 queries an hour at most, for a scheduler shared by hundreds of
users; `sbatch --wait` polls far less often) while printing the job's log as it
grows. The exit code says how the job ended (EXIT_CODES, also in README).
"""

from __future__ import annotations

import dataclasses
import json
import os
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

EXIT_CODES = {
    "COMPLETED": 0,
    "FAILED": 10,
    "TIMEOUT": 11,
    "CANCELLED": 12,
    "NOT_STARTED": 13,  # sbatch rejected it, or it ended before it ever ran
    "OUT_OF_MEMORY": 14,
    "NODE_FAIL": 15, "BOOT_FAIL": 15, "PREEMPTED": 15, "DEADLINE": 15, "REVOKED": 15,
    "SPECIAL_EXIT": 10,
    "INTERRUPTED": 130,  # Ctrl-C: the job was cancelled, or left running as asked
}
EXIT_HELP = ("exit codes: 0 completed; 10 failed; 11 hit its time limit; 12 cancelled; "
             "13 never started (rejected by Slurm, with its reason); 14 out of memory; "
             "15 lost to a node failure or preemption; 2 usage or setup error; 130 interrupted")
# When several array tasks ended badly, the exit code names the first of these.
SEVERITY = ("FAILED", "SPECIAL_EXIT", "OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL",
            "PREEMPTED", "DEADLINE", "REVOKED", "CANCELLED")
FIRST_POLL_S, MAX_POLL_S, LOG_READ_S = 1.0, 15.0, 0.5
LOG_TAIL_LINES = 20


# --- preparing a job ---------------------------------------------------------------------------


@dataclass
class PreparedJob:
    """A job ready to submit: its folder, script, extra files and how to collect it."""

    folder: Path
    spec: slurm.JobSpec
    files: dict[Path, str] = field(default_factory=dict)
    collect: Callable[[list], None] = lambda tasks: None

    @property
    def script(self) -> Path:
        return self.folder / "job.sh"


def _new_folder(parent: Path, prefix: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = parent / f"{prefix}-{stamp}", 1
    while folder.exists():
        n += 1
        folder = parent / f"{prefix}-{stamp}-{n}"
    return folder


def engine_command(config) -> str:
    """How a compute node runs this sdrecipe: the site's setting, else this very interpreter."""
    if config.get("engine"):
        return config.get("engine")
    src = Path(__file__).resolve().parents[1]
    return f"env PYTHONPATH={shlex.quote(str(src))}${{PYTHONPATH:+:$PYTHONPATH}} " \
           f"{shlex.quote(sys.executable)} -m sdrecipe"


def _activation(deployment, profile: str, dry_run: bool) -> Path:
    from .env import activation_script
    script = activation_script(deployment, profile)
    if not script.is_file() and not dry_run:
        raise SdrecipeError(f"the {profile} environment is not built in {deployment.root} "
                            f"({script} is missing): run sdrecipe env build --profile {profile} "
                            f"(or sdrecipe deploy --profile {profile}) first")
    return script


def _spec(ctx, profile, resources, name, folder, command, array=None, log="slurm-%j.out"):
    recipe = ctx.recipe
    return slurm.JobSpec(
        name=name, resources=resources, output=str(folder / log),
        modules=recipe.profile(profile).modules,
        activation=str(_activation(ctx.deployment, profile, ctx.args.dry_run)),
        accelerator=recipe.profile(profile).accelerator, workdir=str(ctx.deployment.source),
        command=command, array=array, profile=profile)


def prepare_verify(ctx, profile: str, resources, config) -> PreparedJob:
    deployment = ctx.deployment
    folder = _new_folder(deployment.jobs, f"verify-{profile}")
    report = folder / "report"
    command = (f"{engine_command(config)} --recipe {shlex.quote(str(ctx.recipe.path.resolve()))} "
               f"--deploy-dir {shlex.quote(str(deployment.root))} verify --profile {profile}"
               + (" --smoke" if ctx.args.smoke else "") + f" --out {shlex.quote(str(report))}")
    spec = _spec(ctx, profile, resources, f"sdrecipe-verify-{profile}", folder, command)
    return PreparedJob(folder, spec, collect=lambda tasks: collect_report(report, tasks))


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


def generation_settings(args) -> dict:
    settings = dict(batch.DEFAULT_SETTINGS)
    for key, value in (("sampler", args.sampler), ("steps", args.steps),
                       ("n_samples", args.n_samples), ("n_iter", args.n_iter), ("H", args.height),
                       ("W", args.width), ("scale", args.scale), ("seed", args.seed)):
        if value is not None:
            settings[key] = value
    return settings


def prepare_generate(ctx, profile: str, resources, config) -> PreparedJob | None:
    """An array job over the prompts not done yet; None when every prompt is done."""
    args, deployment = ctx.args, ctx.deployment
    settings = generation_settings(args)
    entries = batch.plan(args.prompts, settings)
    out = Path(args.out).resolve() if args.out else deployment.outputs / Path(args.prompts).stem
    todo = batch.pending(entries, out)
    title = f"{Path(args.prompts).name}: {len(entries)} prompts"
    write = lambda tasks=None: _report_gallery(entries, out, title)  # noqa: E731
    if not todo:
        print(f"sdrecipe: all {len(entries)} prompts of {args.prompts} are done in {out}")
        if not args.dry_run:
            write()
        return None
    tasks = min(args.array_tasks or slurm.profile_defaults(ctx.recipe, profile).array_tasks,
                len(todo))
    print(f"sdrecipe: {len(todo)} of {len(entries)} prompts to make "
          f"({len(entries) - len(todo)} already done), over {tasks} array tasks")
    folder = _new_folder(out / "jobs", "generate")
    manifest, payload = folder / "manifest.json", folder / "txt2img_batch.py"
    from .env import env_python
    command = (f"{shlex.quote(str(env_python(deployment, profile)))} {shlex.quote(str(payload))} "
               f"{shlex.quote(str(manifest))} \"${{SLURM_ARRAY_TASK_ID:-0}}\" {tasks}")
    array = f"0-{tasks - 1}" + (f"%{args.max_running}" if args.max_running else "")
    spec = _spec(ctx, profile, resources, f"sdrecipe-generate-{profile}", folder, command,
                 array=array, log="slurm-%A_%a.out")
    job = PreparedJob(folder, spec, collect=write)
    job.files[payload] = Path(runner.__file__).read_text()
    job.files[manifest] = json.dumps(
        {"out": str(out), "source": str(deployment.source), "settings": settings,
         "prompts": [{"index": e.index, "prompt": e.prompt, "folder": e.folder} for e in todo]},
        indent=2, ensure_ascii=False)
    return job


def _report_gallery(entries, out: Path, title: str):
    out.mkdir(parents=True, exist_ok=True)
    path, done = gallery.write_gallery(entries, out, title)
    print(f"sdrecipe: gallery: {path} ({done} of {len(entries)} prompts done)")


# --- following a job ---------------------------------------------------------------------------


class LogStreamer:
    """Print what each task's log gained since last time, whole lines only."""

    def __init__(self, prefix_tasks: bool, out=None):
        self.prefix_tasks = prefix_tasks
        self.out = out or sys.stdout
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, str] = {}

    def poll(self, tasks, final=False):
        for task in tasks:
            if not task.log or "%" in task.log or not os.path.isfile(task.log):
                continue
            with open(task.log, "rb") as handle:
                handle.seek(self.offsets.get(task.log, 0))
                data = handle.read()
                self.offsets[task.log] = handle.tell()
            text = self.partial.pop(task.log, "") + data.decode("utf-8", "replace")
            lines = text.split("\n")
            rest = lines.pop()
            if rest and final:
                lines.append(rest)
            elif rest:
                self.partial[task.log] = rest
            prefix = f"[{task.job_id}] " if self.prefix_tasks else ""
            for line in lines:
                print(prefix + line, file=self.out)
        self.out.flush()


def _status_line(job_id: str, tasks) -> str:
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.state] = counts.get(task.state, 0) + 1
    states = ", ".join(f"{n} {state}" if len(tasks) > 1 else state for state, n in counts.items())
    pending = {t.reason for t in tasks if t.state == "PENDING" and t.reason not in ("", "None")}
    nodes = {t.nodes for t in tasks if t.state == "RUNNING" and t.started}
    return (f"sdrecipe: job {job_id}: {states}" + (f" (waiting: {', '.join(sorted(pending))})"
                                                   if pending else "")
            + (f" on {', '.join(sorted(nodes))}" if nodes else ""))


def follow(job_id: str, stream: bool, clock=time.monotonic, sleep=time.sleep):
    """Poll until every task of the job has ended; print state changes and the logs."""
    streamer, interval, next_poll, last = None, FIRST_POLL_S, 0.0, None
    tasks = []
    while True:
        now = clock()
        if now >= next_poll:
            tasks = slurm.query(job_id)
            if tasks is None:
                raise SdrecipeError(f"Slurm no longer knows job {job_id}, and this cluster keeps "
                                    "no accounting to ask instead; look at its log")
            status = _status_line(job_id, tasks)
            if status != last:
                print(status, flush=True)
                last, interval = status, FIRST_POLL_S
            else:
                interval = min(interval * 1.5, MAX_POLL_S)
            next_poll = now + interval
            if streamer is None and stream:
                streamer = LogStreamer(prefix_tasks=any("_" in t.job_id for t in tasks))
        finished = bool(tasks) and all(t.done for t in tasks)
        if streamer:
            streamer.poll(tasks, final=finished)
        if finished:
            return tasks
        sleep(LOG_READ_S)


def _tail(path: str | None, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-lines:] if path else []
    except OSError:
        return []


def judge(job_id: str, tasks) -> tuple[int, list[str]]:
    """The exit code for how the job ended, and what to tell the user."""
    bad = [t for t in tasks if t.state != "COMPLETED"]
    if not bad:
        return 0, [f"sdrecipe: job {job_id} completed"]
    if all(not t.started for t in bad) and len(bad) == len(tasks):
        reasons = sorted({f"{t.state}: {t.reason}" for t in bad})
        return EXIT_CODES["NOT_STARTED"], [f"sdrecipe: job {job_id} never started ({'; '.join(reasons)})"]
    worst = min((t.state for t in bad),
                key=lambda s: SEVERITY.index(s) if s in SEVERITY else len(SEVERITY))
    lines = []
    for task in bad:
        code = task.exit_code.split(":")[0] if task.exit_code else "?"
        what = {"FAILED": f"failed with exit code {code}",
                "TIMEOUT": f"hit its time limit ({task.time_limit}) and was stopped; "
                           "ask for more with --time",
                "CANCELLED": "was cancelled" + ("" if task.started else " before it started"),
                "OUT_OF_MEMORY": "ran out of memory; ask for more with --sbatch-arg=--mem=...",
                }.get(task.state, f"ended as {task.state} ({task.reason}); resubmit")
        where = f" on {task.nodes}" if task.started else ""
        lines.append(f"sdrecipe: job {task.job_id} {what}{where}")
        if task.state != "CANCELLED":
            tail = _tail(task.log)
            if tail:
                lines.append(f"  last {len(tail)} lines of {task.log}:")
                lines += [f"  | {line}" for line in tail]
    return EXIT_CODES.get(worst, 10), lines


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
    prepare = prepare_verify if args.kind == "verify" else prepare_generate
    job = prepare(ctx, profile, resources, config)
    if job is None:
        return 0
    script = slurm.batch_script(job.spec)
    if args.dry_run:
        print(script, end="")
        return 0
    job.folder.mkdir(parents=True, exist_ok=True)
    for path, text in job.files.items():
        path.write_text(text)
    job.script.write_text(script)
    job_id = slurm.sbatch(job.script)
    log_hint = job.spec.output.replace("%j", job_id).replace("%A", job_id).replace("%a", "*")
    print(f"sdrecipe: submitted job {job_id} ({job.script})", flush=True)
    if args.no_wait:
        print(f"sdrecipe: follow it with: tail -f {log_hint}; rerun this command to collect")
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
    from .env import activation_script
    setup = slurm.interactive_lines(resources, ctx.recipe.profile(profile).modules,
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
    inner = args.command or ["bash", "--rcfile", str(rc), "-i"]
    if args.command:  # run one command in the prepared environment instead of a shell
        inner = ["bash", "-c", f". {shlex.quote(str(rc))} && exec \"$@\"", "sdrecipe", *args.command]
    argv = allocate + ["srun"] + ([] if args.command else ["--pty"]) + inner
    print("sdrecipe: " + shlex.join(argv), file=sys.stderr)
    return subprocess.call(argv)
