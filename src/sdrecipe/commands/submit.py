"""`sdrecipe submit verify|generate`: run verify or a prompt batch as a Slurm job (jobs.py),
follow it, show its log and collect what it made: the verify report, or the batch's
gallery. The exit code says how the job ended (`watch.EXIT_CODES`, also in docs/slurm.md).
"""

from __future__ import annotations

import dataclasses
import sys

from .. import jobs, slurm
from ..console import err, out
from ..gallery import GALLERY
from ..watch import EXIT_CODES, follow, judge


def verify(target, resources=None, sbatch_args=(), dry_run: bool = False,
           no_wait: bool = False, quiet: bool = False) -> int:
    """`resources`: the Slurm resources asked (name -> value, None: the recipe's)."""
    chosen = jobs.job_resources(target, resources or {}, sbatch_args)
    job = jobs.prepare_verify(target, chosen, dry_run=dry_run)
    return _run(target, job, dry_run=dry_run, no_wait=no_wait, quiet=quiet,
                later=f"its report will be in {job.results}",
                collect=lambda tasks: _show_report(job.results,
                                                   jobs.collect_report(job.results, tasks)))


def generate(target, prompts, out_dir=None, array_tasks: int | None = None,
             max_running: int | None = None, sampling: jobs.Sampling = jobs.Sampling(),
             resources=None, sbatch_args=(), after: str | None = None, dry_run: bool = False,
             no_wait: bool = False, quiet: bool = False) -> int:
    """An array job over the prompts of `prompts` not done yet in `out_dir`; with all of
    them done, only the gallery is written. `after`: start only once that job completed."""
    chosen = jobs.job_resources(target, resources or {}, sbatch_args, after)
    planned = jobs.plan_batch(target, prompts, out_dir, sampling)
    if not dry_run:
        jobs.refuse_if_running(planned)
    total, todo = len(planned.entries), len(planned.todo)
    if not todo:
        out(f"sdrecipe: all {total} prompts of {prompts} are done in {planned.out}")
        if not dry_run:
            _show_gallery(planned)
        return 0
    tasks = jobs.array_tasks(target, planned, array_tasks)
    out(f"sdrecipe: {todo} of {total} prompts to make ({total - todo} already done), "
        f"over {tasks} array tasks")
    job = jobs.prepare_generate(target, chosen, planned, tasks, max_running, dry_run=dry_run)
    ended_before = 0

    def update_gallery(tasks):
        """Rewrite the gallery whenever one more array task has ended (the last one: collect)."""
        nonlocal ended_before
        ended = sum(t.done for t in tasks)
        if ended_before < ended < len(tasks):
            ended_before = ended
            jobs.write_gallery(planned)
    return _run(target, job, dry_run=dry_run, no_wait=no_wait, quiet=quiet,
                later=f"rerun this command to write {planned.out / GALLERY}",
                collect=lambda tasks: _show_gallery(planned), on_change=update_gallery)


def _run(target, job, *, dry_run: bool, no_wait: bool, quiet: bool, later: str, collect,
         on_change=None) -> int:
    """Print the script (dry run), or submit the job and, unless `no_wait`, follow it to
    its end (`on_change`: the tasks, at each change), say how it ended and `collect` its
    results; the exit code is the job's."""
    if dry_run:
        out(job.batch_script(), end="")
        jobs.discard(job)
        return 0
    job_id = jobs.submit(job, target.deployment)
    log_hint = job.log_hint(job_id)
    out(f"sdrecipe: submitted job {job_id} ({job.script})")
    if no_wait:
        out(f"sdrecipe: follow it with: tail -f {log_hint}; {later}")
        return 0
    try:
        tasks = follow(job_id, on_status=out, on_line=None if quiet else out, on_change=on_change)
    except KeyboardInterrupt:
        return _interrupted(job_id, log_hint)
    tasks = [t if t.log else dataclasses.replace(t, log=job.log_of(t.job_id))
             for t in tasks]  # sacct names no log: the job's own pattern does
    code, lines = judge(job_id, tasks)
    for line in lines:
        (err if code else out)(line)
    collect(tasks)
    return code


def _interrupted(job_id: str, log_hint: str) -> int:
    """Ctrl-C while following: at a terminal, offer to cancel the job; else leave it running
    and say how to cancel or follow it."""
    if sys.stdin.isatty():
        try:
            answer = input(f"\nsdrecipe: cancel job {job_id} with scancel? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
        if answer in ("y", "yes"):
            slurm.scancel(job_id)
            err(f"sdrecipe: cancelled job {job_id}")
            return EXIT_CODES["INTERRUPTED"]
    err(f"\nsdrecipe: job {job_id} keeps running. Cancel it with: scancel {job_id}\n"
        f"  follow its log with: tail -f {log_hint}")
    return EXIT_CODES["INTERRUPTED"]


def _show_report(folder, data: dict | None) -> None:
    """The verify report's verdict, its failed checks, and where the page is."""
    if data is None:
        return
    checks = data.get("checks", [])
    failed = [c for c in checks if not c.get("ok")]
    timings = ", ".join(f"{k} {v}" for k, v in (data.get("timings") or {}).items())
    out(f"sdrecipe: verify report: {'OK' if data.get('ok') else 'FAILED'} "
        f"({len(checks) - len(failed)}/{len(checks)} checks, "
        f"{len(data.get('images', []))} images{'; ' + timings if timings else ''})")
    for check in failed:
        out(f"  failed check {check.get('name')}: {check.get('message')}")
    out(f"sdrecipe: report: {folder / 'report.html'}")


def _show_gallery(planned) -> None:
    path, done = jobs.write_gallery(planned)
    out(f"sdrecipe: gallery: {path} ({done} of {len(planned.entries)} prompts done)")
