"""The stage contract: what every deploy stage is, and the rules of its record.

A stage is a module with `NAME`, `status(target) -> StageStatus` (read-only, cheap)
and `run(target) -> StageResult`.
It owns one record, `<deploy>/.sdrecipe/records/...json`, and that record is a
promise: `begin()` marks it in progress before the stage changes anything, and
`finish()` writes it complete, atomically, only after the work has succeeded. An
interruption at any moment (SIGINT or SIGKILL) therefore leaves `missing` or
`stale`, never `done`. A record names the digests of the records it was built on,
so redoing an earlier stage makes the later ones stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from ..errors import SdrecipeError
from ..files import atomic_write_text

RECORD_SCHEMA = 1
# Test-only: "<stage>:begin" pauses a run right after its record is marked in progress,
# "<stage>:finish" right before the complete record is written, so a test can kill it there.
HOLD_ENV = "SDRECIPE_TEST_HOLD"
log = logging.getLogger("sdrecipe.stages")


def _hold_for_test(stage: str, point: str) -> None:
    if os.environ.get(HOLD_ENV) == f"{stage}:{point}":
        log.warning("test hold at %s:%s", stage, point)
        for _ in range(36000):  # short sleeps: a Ctrl-C that another thread took is seen
            time.sleep(0.1)


class State(str, Enum):
    DONE = "done"
    STALE = "stale"  # there, but not what the recipe asks for now: a run redoes it
    MISSING = "missing"  # not there (or interrupted): a run makes it
    SKIPPED = "skipped"  # this mode has nothing to do here
    BLOCKED = "blocked"  # only a person may decide (their edits, a modified patch)


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: State
    reason: str
    action: str = "nothing"  # what `sdrecipe deploy` would do, or what the person must do
    blocking: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "blocking", self.state is State.BLOCKED)

    @property
    def settled(self) -> bool:
        """Nothing for a deploy to do here."""
        return self.state in (State.DONE, State.SKIPPED)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "state": self.state.value, "reason": self.reason,
                "action": self.action, "blocking": self.blocking}


@dataclass(frozen=True)
class StageResult:
    stage: str
    summary: str  # one line: what the run did
    changed: bool = True  # False: the stage found its work already done
    details: tuple = ()  # what a command may list (e.g. each file placed)


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def digest(outputs: dict) -> str:
    """What a later record remembers of this one: a hash of what the stage produced."""
    return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()


def new_build_id() -> str:
    """For outputs that cannot be hashed cheaply (an environment): one id per build."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Record:
    """One stage's record in one deployment (per profile, and per mode where it differs)."""
    path: Path
    stage: str

    def read(self) -> dict | None:
        """The record, complete or in progress; None when there is none."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"complete": False, "inputs": {}, "unreadable": True}
        return data if isinstance(data, dict) else {"complete": False, "inputs": {}}

    def complete(self) -> dict | None:
        """The record if its work finished, else None."""
        data = self.read()
        return data if data and data.get("complete") else None

    def digest(self) -> str | None:
        data = self.complete()
        return digest(data.get("outputs", {})) if data else None

    def begin(self, inputs: dict) -> None:
        """Before the stage changes anything: the record says "in progress" from here on,
        keeping what was asked for (`inputs`), so a later run knows how to continue."""
        self._write({"schema": RECORD_SCHEMA, "stage": self.stage, "complete": False,
                     "inputs": inputs, "started": _now()})
        _hold_for_test(self.stage, "begin")

    def finish(self, inputs: dict, outputs: dict, built_on: dict | None = None) -> dict:
        """After the work succeeded: the record is complete, with what it was made from."""
        _hold_for_test(self.stage, "finish")
        data = {"schema": RECORD_SCHEMA, "stage": self.stage, "complete": True,
                "inputs": inputs, "outputs": outputs, "built_on": built_on or {},
                "finished": _now()}
        self._write(data)
        return data

    def note(self, key: str, value) -> None:
        """Add a remark beside a complete record's outputs (its digest stays the same)."""
        data = self.complete()
        if data:
            self._write({**data, key: value})

    def _write(self, data: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            raise SdrecipeError(f"cannot write the {self.stage} record {self.path} ({exc}); "
                                "make the deployment folder writable, or choose another "
                                "--deploy-dir") from exc


def incomplete_status(stage: str, record: Record, missing: str, work: str,
                      action: str) -> StageStatus | None:
    """The common answer when a record is absent (`missing` says what is not there yet) or
    in progress (the last `work` did not finish); None when it is complete."""
    data = record.read()
    if data is None:
        return StageStatus(stage, State.MISSING, missing, action)
    if data.get("unreadable"):
        return StageStatus(stage, State.STALE, f"{record.path} is unreadable", action)
    if not data.get("complete"):
        return StageStatus(stage, State.MISSING, f"the last {work} did not finish (started "
                           f"{data.get('started', '?')}; interrupted or failed)", action)
    return None


def changed_dependencies(stage: str, data: dict, current: dict) -> StageStatus | None:
    """Stale when a record this one was built on has been redone since (`current`:
    stage -> digest of its record now)."""
    built_on = data.get("built_on", {})
    redone = [name for name, was in built_on.items() if current.get(name) != was]
    if redone:
        return StageStatus(stage, State.STALE, f"redone since this stage ran: {', '.join(redone)}",
                           "redo it on what is there now")
    return None
