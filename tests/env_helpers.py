"""Helpers for tests that activate a built environment for real, in bash or Lmod.

`bash_environ(commands)` runs bash commands (e.g. `source <activate.sh>`, or Lmod's
`module load`) and returns the environment they leave behind, so a test can check
activation variables as a user's shell would see them. Used by test_env.py and by
the lock owner's conda round trip (the py-rattler backend's activation).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
DTK_MODULE = "compiler/rocm/dtk-22.10.1"
# The target environments' interpreter (DTK 22.10 ships Python 3.8); .ci/run exports it.
PY38 = os.environ.get("SDRECIPE_TEST_PY38", "/root/.pyenv/versions/3.8.18/bin/python")


def bash_environ(commands: str, environ: dict | None = None) -> dict:
    """The environment after running `commands` in bash; raises with bash's stderr on failure."""
    script = f"set -e\n{commands}\nenv -0\n"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                            env=dict(os.environ if environ is None else environ))
    if result.returncode != 0:
        raise AssertionError(f"bash exited {result.returncode}: {result.stderr}")
    return dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)


def activated_environ(script: Path, environ: dict | None = None) -> dict:
    """The environment after `source <script>` (an env's etc/sdrecipe/activate.sh)."""
    return bash_environ(f"source {script}", environ)


def dtk_module_tree(root: Path) -> Path:
    """A module tree with a stand-in for the cluster's DTK module (no DTK on this machine)."""
    module = root / f"{DTK_MODULE}.lua"
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text('whatis("DTK 22.10.1 stand-in for tests")\n'
                      'setenv("ROCM_PATH", "/opt/dtk-22.10.1")\n')
    return root


def lmod(commands: str) -> str:
    """Prefix `commands` with Lmod's shell initialisation."""
    return f"source {LMOD_INIT}\n{commands}"
