"""The `scripts/sdrecipe` entry point every wrapper goes through."""

import subprocess
import sys
import venv
from pathlib import Path

from env_helpers import PY38

ROOT = Path(__file__).resolve().parents[1]


def run_wrapper(*args, python=sys.executable):
    return subprocess.run([str(ROOT / "scripts" / "sdrecipe"), *args], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "SDRECIPE_PYTHON": str(python)})


def test_wrapper_runs_the_engine_from_the_checkout():
    done = run_wrapper("--version")
    assert done.returncode == 0 and done.stdout.startswith("sdrecipe "), done.stderr


def test_missing_dependencies_name_the_install_command(tmp_path):
    venv.create(tmp_path / "bare")  # an interpreter without PyYAML, GitPython, ...
    done = run_wrapper("lint", python=tmp_path / "bare" / "bin" / "python")
    assert done.returncode == 2
    assert "No module named" in done.stderr and f"-m pip install -e '{ROOT}'" in done.stderr
    assert "Traceback" not in done.stderr


def test_errors_are_one_line_with_exit_2(tmp_path):
    broken = tmp_path / "recipe.yaml"
    broken.write_text("schema: 1\nname: x\nupstream: [\n")
    done = run_wrapper("--recipe", str(broken), "lint")
    assert done.returncode == 2
    assert done.stderr.startswith(f"sdrecipe: error: {broken}:") and "Traceback" not in done.stderr


def test_global_options_work_after_the_command_too(tmp_path):
    from sdrecipe.cli import build_parser
    before = build_parser().parse_args(["--deploy-dir", "A", "status", "--profile", "cpu"])
    after = build_parser().parse_args(["status", "--profile", "cpu", "--deploy-dir", "B"])
    nested = build_parser().parse_args(["env", "build", "--deploy-dir", "C", "--recipe", "r.yaml"])
    assert (before.deploy_dir, after.deploy_dir, nested.deploy_dir) == ("A", "B", "C")
    assert (before.recipe, nested.recipe) == (None, "r.yaml")


def test_an_option_named_run_leaves_the_handler_alone():
    """`salloc --run` once stored True where main() looks for the verb's handler."""
    from sdrecipe.cli import build_parser
    for argv, start, command in ((["salloc"], False, []),
                                 (["salloc", "--run", "--", "hostname", "-s"], True,
                                  ["hostname", "-s"])):
        args = build_parser().parse_args(argv)
        assert callable(args.handler) and (args.start, args.node_command) == (start, command)


def fresh_checkout(dest: Path) -> Path:
    """The files a clone has that the wrappers use: scripts/, src/, pyproject.toml."""
    import shutil
    for name in ("scripts", "src"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest)
    return dest


def test_the_wrapper_bootstraps_its_engine_on_first_use_and_reuses_it(tmp_path):
    """No install step: the first run makes <checkout>/.engine from the package index with a
    Python >= 3.9 it finds (here: pyenv's, PATH has only the system's bare ones), and says which."""
    import os
    checkout = fresh_checkout(tmp_path / "clone")
    environ = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"],
               "PYENV_ROOT": os.environ.get("PYENV_ROOT", f"{os.environ['HOME']}/.pyenv")}
    first = subprocess.run([str(checkout / "scripts" / "sdrecipe"), "--version"],
                           capture_output=True, text=True, env=environ, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("sdrecipe ")
    assert f"first run: making the engine environment {checkout / '.engine'} with" in first.stderr
    assert (checkout / ".engine" / ".pyproject-sha256").is_file()
    again = subprocess.run([str(checkout / "scripts" / "sdrecipe"), "--version"],
                           capture_output=True, text=True, env=environ)
    assert again.returncode == 0 and "first run" not in again.stderr, again.stderr
    (checkout / "pyproject.toml").write_text((checkout / "pyproject.toml").read_text() + "\n")
    changed = subprocess.run([str(checkout / "scripts" / "sdrecipe"), "--version"],
                             capture_output=True, text=True, env=environ, timeout=900)
    assert "first run" in changed.stderr, "changed dependencies make a new engine environment"


def test_the_wrapper_without_a_new_enough_python_says_what_to_install(tmp_path):
    checkout = fresh_checkout(tmp_path / "clone")
    import shutil
    bin_dir = tmp_path / "bin"  # the shell tools the wrapper uses, and a Python 3.8 only
    bin_dir.mkdir()
    for tool in ("bash", "env", "dirname", "sha256sum", "cut", "cat", "sed", "ls", "sort",
                 "flock", "rm", "mkdir"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name in ("python3", "python3.8"):
        (bin_dir / name).symlink_to(PY38)
    done = subprocess.run([str(checkout / "scripts" / "sdrecipe"), "--version"],
                          capture_output=True, text=True,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path),
                               "PYENV_ROOT": str(tmp_path / "no-pyenv")})
    assert done.returncode == 2
    assert done.stderr.startswith("sdrecipe: error: no Python 3.9 or newer")
    assert "SDRECIPE_PYTHON" in done.stderr and not (checkout / ".engine").exists()
