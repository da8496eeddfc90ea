"""Following a submitted job: poll Slurm, read its log as it grows, turn how it ended into an
exit code and the lines that tell why (the command shows them).

Polling `scontrol` backs off from 1 s to 15 s (about 250 queries an hour at most,
for a scheduler shared by hundreds of users; `sbatch --wait` polls far less
often) and snaps back to 1 s whenever the state changes; the log files are read
every half second, which costs the scheduler nothing. The exit codes are part
of the interface (docs/slurm.md lists them): scripts branch on them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from . import slurm
from .errors import SdrecipeError
from .environment.runtime import tail_lines

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


class LogStreamer:
    """Hand on what each task's log gained since last time, whole lines only."""

    def __init__(self, prefix_tasks: bool, on_line: Callable[[str], None]):
        self.prefix_tasks = prefix_tasks
        self.on_line = on_line
        self.offsets: dict[str, int] = {}
        self.partial: dict[str, str] = {}

    def poll(self, tasks, final=False):
        for task in tasks:
            if not task.log or "%" in task.log or not os.path.isfile(task.log):
                continue
            offset = self.offsets.get(task.log, 0)
            if os.path.getsize(task.log) < offset:  # rewritten: a requeued task starts it anew
                offset = 0
                self.partial.pop(task.log, None)
            with open(task.log, "rb") as handle:
                handle.seek(offset)
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
                # progress bars (tqdm) redraw with \r: show the last state only
                self.on_line(prefix + line.rstrip("\r").rsplit("\r", 1)[-1])


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


def follow(job_id: str, on_status: Callable[[str], None],
           on_line: Callable[[str], None] | None = None,
           on_change: Callable[[list], None] | None = None, clock=time.monotonic,
           sleep=time.sleep):
    """Poll until every task of the job has ended; returns the tasks as they ended.

    Each change of the job's state goes to `on_status` as one line and, as the tasks
    themselves, to `on_change` (e.g. to update a gallery as array tasks finish); each
    new line of its logs to `on_line` (None: the logs are not read)."""
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
                on_status(status)
                if on_change:
                    on_change(tasks)
                last, interval = status, FIRST_POLL_S
            else:
                interval = min(interval * 1.5, MAX_POLL_S)
            next_poll = now + interval
            if streamer is None and on_line:
                streamer = LogStreamer(any("_" in t.job_id for t in tasks), on_line)
        finished = bool(tasks) and all(t.done for t in tasks)
        if streamer:
            streamer.poll(tasks, final=finished)
        if finished:
            return tasks
        sleep(LOG_READ_S)


def _log_tail(path: str | None) -> list[str]:
    """The end of a task's log; none when Slurm named no log or it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return []
    return tail_lines(text, LOG_TAIL_LINES)


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
            tail = _log_tail(task.log)
            if tail:
                lines.append(f"  last {len(tail)} lines of {task.log}:")
                lines += [f"  | {line}" for line in tail]
    return EXIT_CODES.get(worst, 10), lines
