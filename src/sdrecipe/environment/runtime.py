"""How a process runs inside an environment with nothing from outside: activated (the
one table of `activation.py`), no user site-packages, and where the machine allows it no
network (`unshare -n`, else `-rn`). The import check, verify, smoke and doctor all run
the env's Python this way; `payload_path` names the scripts they run there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import activation
from ..errors import SdrecipeError
from .location import env_prefix, env_python


def payload_path(name: str) -> Path:
    """A script shipped in sdrecipe/payload/ that runs under the environment's Python."""
    return Path(resources.files("sdrecipe") / "payload" / name)


@dataclass(frozen=True)
class CheckResult:
    python: str
    rows: list[dict]

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(row["ok"] for row in self.rows)

    @property
    def failed(self) -> str:
        return ", ".join(row["name"] for row in self.rows if not row["ok"])


def activation_env(deployment, profile: str, base: dict | None = None) -> dict[str, str]:
    """The variables activation sets, composed with `base` (default: os.environ).

    Use `{**os.environ, **activation_env(d, p)}` to run a process inside the env.
    """
    table = activation.variables(deployment, profile, env_prefix(deployment, profile))
    return activation.apply(table, os.environ if base is None else base)


def network_isolation() -> tuple[list[str], str]:
    """The command prefix that takes the network away from a process run inside the env,
    and how it did (for reports): `unshare -n` (root), else `unshare -rn` (an unprivileged
    user namespace), else nothing but the offline variables of `offline_run_env`."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return [], "not isolated: unshare(1) is not installed; offline variables only"
    for flags in (["-n"], ["-rn"]):
        probe = subprocess.run([unshare, *flags, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [unshare, *flags], f"no network (unshare {' '.join(flags)})"
    reason = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "refused"
    return [], f"not isolated: unshare refused ({reason}); offline variables only"


def offline_run_env(deployment, profile: str, base: dict | None = None) -> dict[str, str]:
    """The whole environment of a process run inside the env with nothing from outside:
    `base` (default: os.environ) activated (which sets HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE), and no user site-packages shadowing the env's own."""
    base = dict(os.environ if base is None else base)
    return {**base, **activation_env(deployment, profile, base), "PYTHONNOUSERSITE": "1"}


def import_check(target) -> CheckResult:
    """Run the import check in the environment, activated, offline."""
    deployment, profile = target.deployment, target.profile
    python = env_python(deployment, profile)
    if not python.exists():
        raise SdrecipeError(f"no environment for {profile} at {python.parent.parent}: "
                            f"run {target.command('env build')}")
    isolation, _ = network_isolation()  # the payload also blocks sockets itself
    result = subprocess.run(isolation + [str(python), str(payload_path("import_check.py"))],
                            env=offline_run_env(deployment, profile), capture_output=True,
                            text=True)
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SdrecipeError(f"the import check could not run under {python} (exit "
                            f"{result.returncode}): {result.stderr.strip()[-2000:]}") from None
    return CheckResult(report["python"], report["rows"])


TAIL_LINES = 40


def tail_lines(text: str, n: int = TAIL_LINES) -> list[str]:
    """The last `n` lines of a process's output, trailing blank lines dropped: what a
    failure shows of a log (verify's txt2img, smoke's generator, a job's log)."""
    return text.rstrip().splitlines()[-n:] if n > 0 else []
