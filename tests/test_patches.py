"""The patch engine on real git checkouts of a tiny upstream (tests/patch_fixtures.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from patch_fixtures import git
from sdrecipe import patches
from sdrecipe.errors import SdrecipeError
from sdrecipe.project import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def author_blob(template, ref, path):
    """The blob of `path` in the authoring repo after the patch commit `ref` (HEAD~n)."""
    return git(template["author"], "rev-parse", f"{ref}:{path}").strip()


def work_blob(source, path):
    return git(source, "hash-object", path).strip()


def states(state):
    return [p.state for p in state.patches]


def test_clean_apply_gives_the_authored_tree_and_leaves_the_index_alone(tiny, template):
    source, recipe = tiny["source"], tiny["recipe"]
    assert patches.tree_state(source, recipe, "cpu").state == "pristine"
    message = patches.apply_series(source, recipe, "cpu")
    assert "applied 3 patch(es) for profile cpu" in message
    for path in ("app/main.py", "app/util.py", "lib/core.py", "extra/helpers/local.py"):
        assert work_blob(source, path) == author_blob(template, "HEAD", path)
    assert git(source, "diff", "--cached", "--name-only") == ""  # the real index is untouched
    state = patches.tree_state(source, recipe, "cpu")
    assert state.state == "applied" and states(state) == ["applied"] * 3
    assert not (source / ".git" / "sdrecipe" / "journal.json").exists()


def test_second_apply_is_a_no_op_that_says_so(tiny):
    source, recipe = tiny["source"], tiny["recipe"]
    patches.apply_series(source, recipe, "cpu")
    before = {p: (source / p).stat().st_mtime_ns for p in ("app/main.py", "lib/core.py")}
    assert "already applied; nothing to do" in patches.apply_series(source, recipe, "cpu")
    assert {p: (source / p).stat().st_mtime_ns for p in before} == before


def test_revert_leaves_git_status_clean_and_removes_added_folders(tiny):
    source, recipe = tiny["source"], tiny["recipe"]
    patches.apply_series(source, recipe, "cpu")
    assert git(source, "status", "--porcelain") != ""
    assert "reverted to the pinned tree" in patches.revert_series(source, recipe, "cpu")
    assert git(source, "status", "--porcelain", "--ignored") == ""
    assert not (source / "extra").exists()
    assert "already pristine" in patches.revert_series(source, recipe, "cpu")


def test_when_filters_the_series_and_switching_profile_resets_the_other_patches(tiny):
    source, recipe = tiny["source"], tiny["recipe"]
    assert [e.file for e in recipe.series("cuda")] == ["0001-main-syspath.patch",
                                                       "0002-util-helper.patch"]
    patches.apply_series(source, recipe, "cuda")
    assert "self.cuda()" in (source / "lib/core.py").read_text()
    patches.apply_series(source, recipe, "cpu")
    cuda_view = patches.tree_state(source, recipe, "cuda")
    assert cuda_view.foreign == ("lib/core.py",) and cuda_view.state == "partial"
    assert "another profile" in cuda_view.patches[0].detail
    patches.apply_series(source, recipe, "cuda")  # cpu -> cuda: 0003's files go back to pristine
    assert "self.cuda()" in (source / "lib/core.py").read_text()
    assert "device = 'cuda'" in (source / "app/main.py").read_text()
    assert patches.tree_state(source, recipe, "cuda").state == "applied"


def test_upstream_that_conflicts_is_refused_before_anything_is_written(tiny):
    """The pinned tree differs where the last patch has context: nothing is written at all."""
    source = tiny["source"]
    (source / "lib/core.py").write_text("class Model:\n    def to_device(self):\n"
                                        "        return self.hip()\n")
    git(source, "commit", "-qam", "upstream moved on")
    head = git(source, "rev-parse", "HEAD").strip()
    text = tiny["recipe_path"].read_text().replace(tiny["commit"], head)
    tiny["recipe_path"].write_text(text)
    recipe = load_recipe(tiny["recipe_path"])
    with pytest.raises(SdrecipeError) as failure:
        patches.apply_series(source, recipe, "cpu")
    message = str(failure.value)
    assert "0003-cpu-device.patch:" in message and "does not apply" in message
    assert "nothing was changed" in message
    assert git(source, "status", "--porcelain") == ""  # 0001 and 0002 would apply: not written
    state = patches.tree_state(source, recipe, "cpu")
    assert state.state == "conflicting"
    assert states(state) == ["not applied", "not applied", "conflicting"]
    assert patches.tree_state(source, recipe, "cuda").state == "pristine"


def test_drift_is_reported_refused_and_overwritten_only_with_force(tiny):
    source, recipe = tiny["source"], tiny["recipe"]
    patches.apply_series(source, recipe, "cpu")
    (source / "app/util.py").write_text("def helper():\n    return 99  # my fix\n")
    state = patches.tree_state(source, recipe, "cpu")
    assert state.state == "drift" and state.drifted == ("app/util.py",)
    assert states(state) == ["applied", "conflicting", "applied"]
    for run in (patches.apply_series, patches.revert_series):
        with pytest.raises(SdrecipeError, match=r"(?s)drift.*app/util\.py.*--force"):
            run(source, recipe, "cpu")
    assert "my fix" in (source / "app/util.py").read_text()
    message = patches.revert_series(source, recipe, "cpu", force=True)
    assert "overwrote 1 hand-edited file(s) (--force): app/util.py" in message
    assert git(source, "status", "--porcelain") == ""


def test_a_patch_that_differs_from_its_pinned_sha256_is_never_applied(tiny):
    source, recipe = tiny["source"], tiny["recipe"]
    patch = recipe.patch_dir / "0002-util-helper.patch"
    patch.write_text(patch.read_text().replace("+    return 10", "+    return 11"))
    with pytest.raises(SdrecipeError, match=r"test\.yaml:\d+: .*0002-util-helper\.patch has sha256"):
        patches.apply_series(source, recipe, "cpu")
    patch.unlink()
    with pytest.raises(SdrecipeError, match="0002-util-helper.patch is missing"):
        patches.apply_series(source, recipe, "cpu")
    assert git(source, "status", "--porcelain") == ""


def test_wrong_head_is_refused_naming_the_commit_found(tiny):
    source, recipe = tiny["source"], tiny["recipe"]
    (source / "README.md").write_text("local change\n")
    git(source, "commit", "-qam", "not the pin")
    head = git(source, "rev-parse", "HEAD").strip()
    with pytest.raises(SdrecipeError, match=f"HEAD is {head}, not the pinned commit {tiny['commit']}"):
        patches.apply_series(source, recipe, "cpu")


def test_a_folder_that_is_not_a_git_checkout_gets_a_clear_error(tiny, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(SdrecipeError, match="not a git checkout"):
        patches.tree_state(plain, tiny["recipe"], "cpu")
    with pytest.raises(SdrecipeError, match="no such folder"):
        patches.apply_series(tmp_path / "missing", tiny["recipe"], "cpu")


def test_a_second_run_waits_for_the_lock_and_then_refuses(tiny, monkeypatch):
    source, recipe = tiny["source"], tiny["recipe"]
    monkeypatch.setattr(patches, "LOCK_TIMEOUT_S", 0.2)
    (source / ".git" / "sdrecipe").mkdir()
    with FileLock(str(source / ".git" / "sdrecipe" / "lock")):
        with pytest.raises(SdrecipeError, match="another sdrecipe run is changing this checkout"):
            patches.apply_series(source, recipe, "cpu")
    assert git(source, "status", "--porcelain") == ""


def _killed_mid_apply(tiny):
    """Run the real CLI wrapper, SIGKILL it after it has renamed one file into place.

    The engine's test-only hook SDRECIPE_TEST_HOLD_AFTER=1 makes it print a line
    and sleep right after the first file; we kill it from outside at that point.
    """
    env = dict(os.environ, SDRECIPE_TEST_HOLD_AFTER="1", SDRECIPE_PYTHON=sys.executable)
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "apply-patches.sh"), "--source", str(tiny["source"]),
         "--profile", "cpu"],
        env=dict(env, SDRECIPE_RECIPE=str(tiny["recipe_path"])),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "test hold after 1 files" in line, line + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_killed_apply_is_detected_and_completed_by_the_next_apply(tiny, template):
    source, recipe = tiny["source"], tiny["recipe"]
    _killed_mid_apply(tiny)
    journal = json.loads((source / ".git" / "sdrecipe" / "journal.json").read_text())
    assert journal["action"] == "apply" and "lib/core.py" in journal["paths"]
    assert work_blob(source, "app/main.py") == author_blob(template, "HEAD", "app/main.py")
    assert "self.cuda()" in (source / "lib/core.py").read_text()  # not yet written
    state = patches.tree_state(source, recipe, "cpu")
    assert state.interrupted and state.state == "partial" and not state.drifted
    message = patches.apply_series(source, recipe, "cpu")
    assert "found an interrupted apply (profile cpu" in message and "completing it" in message
    assert patches.tree_state(source, recipe, "cpu").state == "applied"
    assert not (source / ".git" / "sdrecipe" / "journal.json").exists()
    assert not (source / ".git" / "sdrecipe" / "stage").exists()


def test_killed_apply_is_rolled_back_by_revert(tiny):
    source, recipe = tiny["source"], tiny["recipe"]
    _killed_mid_apply(tiny)
    message = patches.revert_series(source, recipe, "cpu")
    assert "found an interrupted apply" in message and "rolling back" in message
    assert git(source, "status", "--porcelain", "--ignored") == ""


def test_cli_status_lists_each_patch(tiny):
    source = tiny["source"]
    run = [sys.executable, "-m", "sdrecipe", "--recipe", str(tiny["recipe_path"]), "patch"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    applied = subprocess.run(run + ["apply", "--source", str(source), "--profile", "cuda"],
                             env=env, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stderr
    status = subprocess.run(run + ["status", "--source", str(source), "--profile", "cuda"],
                            env=env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "profile cuda: applied" in status.stdout
    assert status.stdout.count("[  applied  ]") == 2
    wrong = subprocess.run(run + ["apply", "--source", str(source.parent), "--profile", "cpu"],
                           env=env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "not a git checkout" in wrong.stderr
