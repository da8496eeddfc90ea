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


# --- real Environment Modules 5.x (Tcl), beside Lmod ------------------------------------------
# Debian's environment-modules declares `Conflicts: lmod`: installing it would remove the
# Lmod the other tests use. The package is downloaded (apt-get download) and unpacked
# (dpkg -x) into a cache folder instead, once, and its modulecmd.tcl run with tclsh.
TEST_CACHE = Path(os.environ.get("SDRECIPE_TEST_CACHE", Path.home() / ".cache" / "sdrecipe-tests"))


def environment_modules(cache: Path = TEST_CACHE / "environment-modules") -> Path:
    """modulecmd.tcl of Debian's environment-modules, unpacked under `cache` (once)."""
    found = sorted(cache.glob("root/usr/lib/*/modulecmd.tcl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    if not list(cache.glob("environment-modules_*.deb")):
        subprocess.run(["apt-get", "download", "-qq", "environment-modules"], cwd=cache,
                       check=True, capture_output=True)
    deb = sorted(cache.glob("environment-modules_*.deb"))[-1]
    staging = cache / "root.partial"
    subprocess.run(["rm", "-rf", str(staging)], check=True)
    subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
    staging.rename(cache / "root")
    return sorted(cache.glob("root/usr/lib/*/modulecmd.tcl"))[0]


def tcl_modules(modulecmd: Path, commands: str) -> str:
    """`commands` with a `module` function of Environment Modules (no Lmod in sight)."""
    return ("unset -f module ml 2>/dev/null || true\n"
            "unset LMOD_CMD LMOD_DIR LMOD_PKG LMOD_VERSION MODULESHOME LOADEDMODULES _LMFILES_\n"
            f'module() {{ eval "$(tclsh {modulecmd} bash "$@")"; }}\n{commands}')


def dtk_tcl_module(root: Path) -> Path:
    """The DTK module stand-in as a Tcl modulefile too (Environment Modules reads only those)."""
    module = root / DTK_MODULE
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text("#%Module1.0\nmodule-whatis {DTK 22.10.1 stand-in for tests}\n"
                      "setenv ROCM_PATH /opt/dtk-22.10.1\n")
    return root
