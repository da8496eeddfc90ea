"""`sdrecipe salloc`: the interactive equivalent of a job (jobs.interactive), printed as the
steps to type, or run: salloc, then a shell (or one command) on the node, set up."""

from __future__ import annotations

import shlex
import subprocess

from .. import jobs
from ..console import err, out


def run(target, resources=None, sbatch_args=(), start: bool = False, command=()) -> int:
    """`start`: run the session (its exit code is srun's) instead of printing the steps."""
    session = jobs.interactive(target, jobs.job_resources(target, resources or {}, sbatch_args))
    if not start:
        out("# 1. ask for an allocation (on the login node):")
        out(shlex.join(session.allocate))
        out("# 2. open a shell on the allocated node:")
        out(shlex.join(session.step + ["--pty", "bash", "-l"]))
        out("# 3. inside that shell:")
        out("\n".join(session.setup))
        return 0
    argv = jobs.session_argv(target, session, command)
    err("sdrecipe: " + shlex.join(argv))
    return subprocess.call(argv)
