"""The `scripts/sdrecipe` entry point every wrapper goes through."""

import subprocess
import sys
import venv
from pathlib import Path

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
