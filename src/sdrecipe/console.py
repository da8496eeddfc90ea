"""The terminal side of the CLI: the only place that writes to stdout and stderr.

Results go to stdout (`out`); the engine's log records go to stderr, INFO and up
(DEBUG with --verbose), and all of them to the run's log file in the deployment
(`<deploy>/.sdrecipe/logs/`); the engine's progress tasks (`progress.py`) are drawn
as rich bars on a terminal and not at all elsewhere (pipes, batch jobs).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from .progress import Reporter, reporting

KEEP_LOGS = 30
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def out(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class RichReporter(Reporter):
    """Progress bars on stderr; items show `done/total`, bytes their size, speed and ETA."""

    def __init__(self, console):
        self._console = console
        self._bars = None

    def _progress(self):
        if self._bars is None:
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                                       TextColumn, TimeRemainingColumn, TransferSpeedColumn)

            class Amount(MofNCompleteColumn):
                def render(self, task):
                    if task.fields.get("unit") == "bytes":
                        return DownloadColumn().render(task)
                    return super().render(task)

            class Speed(TransferSpeedColumn):
                def render(self, task):
                    return super().render(task) if task.fields.get("unit") == "bytes" else ""

            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), Amount(),
                                  Speed(), TimeRemainingColumn(), console=self._console,
                                  transient=True)
            self._bars.start()
        return self._bars

    def add(self, description, total=None, unit="items"):
        return self._progress().add_task(description, total=total, unit=unit)

    def advance(self, task, amount=1):
        self._progress().advance(task, amount)

    def update(self, task, *, completed=None, total=None, description=None):
        changes = {k: v for k, v in (("completed", completed), ("total", total),
                                     ("description", description)) if v is not None}
        self._progress().update(task, **changes)

    def remove(self, task):
        bars = self._progress()
        bars.remove_task(task)
        if not bars.tasks:
            bars.stop()
            self._bars = None


class _OneLine(logging.Formatter):
    """`sdrecipe: message` for a person; the logger's name and level with --verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def format(self, record):
        text = record.getMessage()
        if self.verbose:
            return f"{record.levelname.lower()} {record.name}: {text}"
        prefix = "warning: " if record.levelno == logging.WARNING else ""
        return f"sdrecipe: {prefix}{text}"


@contextlib.contextmanager
def session(verbose: bool = False):
    """Logging to stderr and progress bars (on a terminal) for one command."""
    logger = logging.getLogger("sdrecipe")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # a library's logging.basicConfig() must not print them twice
    tty = sys.stderr.isatty()
    if tty:
        from rich.console import Console
        from rich.logging import RichHandler
        console = Console(stderr=True)
        handler = RichHandler(console=console, show_time=False, show_path=False,
                              show_level=verbose, markup=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s" if verbose else "%(message)s"))
        chosen = RichReporter(console)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine(verbose))
        chosen = Reporter()
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(handler)
    try:
        with reporting(chosen):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        for extra in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(extra)
            extra.close()


def keep_log(deployment, command: str) -> Path | None:
    """Also write every log record of this run to `<deploy>/.sdrecipe/logs/<time>-<command>.log`
    (the last KEEP_LOGS are kept). A deployment that cannot be written to gets none."""
    folder = deployment.logs
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = folder / f"{stamp}-{command}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG)
    logging.getLogger("sdrecipe").addHandler(handler)
    for old in sorted(folder.glob("*.log"))[:-KEEP_LOGS]:
        old.unlink(missing_ok=True)
    return path
