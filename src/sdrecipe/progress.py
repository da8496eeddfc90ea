"""The one interface through which the engine reports progress; the CLI renders it.

The engine never prints. It logs through `logging` (`sdrecipe.<module>`) and, for
work that takes a while, opens a task here: a description, a total when known (a
count, or bytes), advances. The reporter in force is the CLI's (rich bars on a
terminal); by default, for the engine used as a library and in batch jobs, it is
this module's `Reporter`, which shows nothing. One reporter for the whole process,
threads included (the downloader advances from its workers).
"""

from __future__ import annotations

import contextlib


class Reporter:
    """Shows nothing: the base a renderer overrides, and the default."""

    def add(self, description: str, total: float | None = None, unit: str = "items") -> object:
        """A new task; `unit` is "items" or "bytes". Returns its handle."""
        return None

    def advance(self, task, amount: float = 1) -> None:
        pass

    def update(self, task, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        pass

    def remove(self, task) -> None:
        pass


_reporter = Reporter()


def reporter() -> Reporter:
    return _reporter


@contextlib.contextmanager
def reporting(chosen: Reporter):
    """Use `chosen` while the block runs (the CLI, around one command)."""
    global _reporter
    previous, _reporter = _reporter, chosen
    try:
        yield chosen
    finally:
        _reporter = previous


class Task:
    """One task of the reporter in force, as a context manager that removes it at the end."""

    def __init__(self, description: str, total: float | None = None, unit: str = "items"):
        self._reporter = reporter()
        self._handle = self._reporter.add(description, total, unit)

    def advance(self, amount: float = 1) -> None:
        self._reporter.advance(self._handle, amount)

    def update(self, **changes) -> None:
        self._reporter.update(self._handle, **changes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._reporter.remove(self._handle)
