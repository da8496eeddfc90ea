"""Each patch lint check, from pass on the tiny series to fail on a corrupted copy of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patch_fixtures import git
from sdrecipe.lint import LintContext, run_checks
from sdrecipe.project import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def lint(tiny, source=False):
    """Findings of the patch checks (other stages' checks are not under test here)."""
    recipe = load_recipe(tiny["recipe_path"])
    found = run_checks(LintContext(recipe, tiny["source"] if source else None))
    return [f for f in found if f.check.startswith("patch-")]


def only(findings, check):
    return [f for f in findings if f.check == check]


def edit(path: Path, old: str, new: str, count=1):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().split("\n"), 1) if needle in line)


def test_the_tiny_series_passes_every_check_with_and_without_source(tiny):
    assert lint(tiny) == []
    assert lint(tiny, source=True) == []


def test_lint_source_never_modifies_the_checkout(tiny, monkeypatch):
    source = tiny["source"]
    monkeypatch.setenv("GIT_OPTIONAL_LOCKS", "0")  # so that `git status` itself does not write the index
    snapshot = lambda: (git(source, "status", "--porcelain", "--ignored"),
                        sorted(str(p) for p in (source / ".git").rglob("*")),
                        (source / ".git" / "index").stat().st_mtime_ns)
    before = snapshot()
    edit(tiny["dir"] / "0003-cpu-device.patch", "-        return self.cuda()",
         "-        return self.hip()")  # a failing series too
    assert lint(tiny, source=True)
    assert snapshot() == before


def test_an_altered_hunk_fails_sha256_and_the_index_check_naming_patch_and_line(tiny):
    patch = tiny["dir"] / "0002-util-helper.patch"
    edit(patch, "+    return 10", "+    return 11")
    findings = lint(tiny, source=True)
    sha = only(findings, "patch-sha256")
    assert len(sha) == 1 and "0002-util-helper.patch: sha256 is" in sha[0].message
    assert sha[0].file == "recipe/test.yaml" and sha[0].line == line_of(
        tiny["recipe_path"], "file: 0002-util-helper.patch")
    applied = only(findings, "patch-applies")
    assert [(f.file, f.line) for f in applied] == [
        ("patches/tiny/0002-util-helper.patch", line_of(patch, "index ") + 0)]
    assert "a hunk was edited after the diff was made" in applied[0].message


def test_altered_context_fails_to_apply_naming_the_hunk_line(tiny):
    patch = tiny["dir"] / "0003-cpu-device.patch"
    edit(patch, "-        return self.cuda()", "-        return self.hip()")
    applied = only(lint(tiny, source=True), "patch-applies")
    assert len(applied) == 1, applied
    finding = applied[0]
    assert finding.file == "patches/tiny/0003-cpu-device.patch"
    assert finding.line == line_of(patch, "@@ -1,3 +1,3 @@")
    assert "profile cpu" in finding.message and "lib/core.py" in finding.message


@pytest.mark.parametrize("old, new, message", [
    ("Forwarded: not-needed\n", "", "DEP-3 header lacks Forwarded"),
    ("Author: Tiny Tester <tiny@example.org>\n", "", "DEP-3 header lacks Author"),
    ("Description: Put the repository root on sys.path", "Description: <describe the change>",
     "Description holds a template value"),
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: TODO", "template value"),
    ("Last-Update: 2024-05-01", "Last-Update: 2024-13-01", "ISO date"),
    ("Last-Update: 2024-05-01", "Last-Update: May 1 2024", "ISO date"),
    ("Bug: https://example.org/upstream/issues/1", "Bug: issue 1", "Bug must be a URL"),
    ("Forwarded: not-needed", "Forwarded: maybe", "Forwarded must be"),
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: upstream, somewhere", "Origin must be"),
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: from the seed", "Origin must be"),
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: vendor, https://exa mple", "malformed URL"),
    ("Last-Update: 2024-05-01", "Last-Update 2024-05-01", "not a DEP-3 `Field: value` line"),
])
def test_dep3_header_problems_name_the_patch_and_line(tiny, old, new, message):
    patch = tiny["dir"] / "0001-main-syspath.patch"
    field_line = line_of(patch, old.split(":")[0] + (":" if ":" in old else ""))
    edit(patch, old, new)
    dep3 = only(lint(tiny), "patch-dep3")
    assert dep3 and all(f.file == "patches/tiny/0001-main-syspath.patch" for f in dep3)
    assert [f.line for f in dep3 if message in f.message] == [1 if "lacks" in message else field_line]


@pytest.mark.parametrize("old, new", [
    ("Bug: https://example.org/upstream/issues/1\n", ""),  # Bug is optional
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: vendor, the seed's section 3"),
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: vendor"),
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: upstream, commit:0123abcd"),
    ("Origin: vendor, https://example.org/sdrecipe", "Origin: https://example.org/x.patch"),
])
def test_valid_dep3_variants_pass(tiny, old, new):
    edit(tiny["dir"] / "0001-main-syspath.patch", old, new)
    assert only(lint(tiny), "patch-dep3") == []


def test_crlf_and_added_trailing_whitespace_name_their_lines(tiny):
    patch = tiny["dir"] / "0002-util-helper.patch"
    edit(patch, "+    return 10\n", "+    return 10  \n")
    trailing = line_of(patch, "+    return 10  ")
    found = only(lint(tiny), "patch-whitespace")
    assert [(f.line, "ends with whitespace" in f.message) for f in found] == [(trailing, True)]
    data = (tiny["dir"] / "0001-main-syspath.patch").read_bytes().replace(b"\n", b"\r\n")
    (tiny["dir"] / "0001-main-syspath.patch").write_bytes(data)
    crlf = [f for f in only(lint(tiny), "patch-whitespace") if "CRLF" in f.message]
    assert len(crlf) == 1 and crlf[0].line == 1 and "0001" in crlf[0].file


def test_debris_anywhere_in_the_project_is_found(tiny):
    assert only(lint(tiny), "patch-debris") == []
    (tiny["dir"] / "0001-main-syspath.patch.orig").write_text("x")
    (tiny["project"] / "recipe" / "test.yaml.rej").write_text("x")
    (tiny["project"] / ".pc").mkdir()
    (tiny["project"] / ".pc" / "applied-patches").write_text("x")
    files = sorted(f.file for f in only(lint(tiny), "patch-debris"))
    assert files == [".pc/applied-patches", "patches/tiny/0001-main-syspath.patch.orig",
                     "recipe/test.yaml.rej"]


def test_unlisted_and_missing_patches(tiny):
    (tiny["dir"] / "0004-stray.patch").write_text("stray\n")
    (tiny["dir"] / "0002-util-helper.patch").unlink()
    found = only(lint(tiny), "patch-series")
    messages = sorted((f.file, f.line, f.message.split(" ")[1]) for f in found)
    assert messages == [
        ("patches/tiny/0004-stray.patch", None, "is"),
        ("recipe/test.yaml", line_of(tiny["recipe_path"], "file: 0002-util-helper.patch"),
         "0002-util-helper.patch")]


def test_a_pre_image_from_the_wrong_base_is_caught_through_the_series(tiny, template):
    """0003 edits main.py after 0001: its pre-image must be 0001's post-image, not upstream's."""
    patch = tiny["dir"] / "0003-cpu-device.patch"
    after_0001 = git(template["author"], "rev-parse", "HEAD~2:app/main.py").strip()
    pristine = git(template["author"], "rev-parse", "HEAD~3:app/main.py").strip()
    edit(patch, f"index {after_0001}", f"index {pristine}")
    found = only(lint(tiny), "patch-index-blobs")
    assert len(found) == 1, found
    assert found[0].file == "patches/tiny/0003-cpu-device.patch"
    assert found[0].line == line_of(patch, f"index {pristine}")
    assert "post-image of 0001-main-syspath.patch" in found[0].message
    assert "(profile cpu)" in found[0].message


def test_a_pre_image_not_in_the_upstream_lock_is_caught(tiny):
    patch = tiny["dir"] / "0002-util-helper.patch"
    text = patch.read_text()
    pre = text.split("index ", 1)[1][:40]
    patch.write_text(text.replace(f"index {pre}", "index " + "1" * 40))
    found = only(lint(tiny), "patch-index-blobs")
    assert len(found) == 1 and "does not match " + pre in found[0].message
    assert found[0].message.endswith("pinned upstream plus the patches before it")


def test_a_stale_or_missing_upstream_lock_is_an_error(tiny):
    lock = tiny["project"] / "lock" / "upstream.lock"
    edit(lock, f"commit {tiny['commit']}", "commit " + "f" * 40)
    assert "regenerate it" in only(lint(tiny), "patch-index-blobs")[0].message
    lock.unlink()
    assert "missing" in only(lint(tiny), "patch-index-blobs")[0].message


def test_format_problems(tiny):
    patch = tiny["dir"] / "0002-util-helper.patch"
    text = patch.read_text()
    pre = text.split("index ", 1)[1][:40]
    edit(patch, f"index {pre}", f"index {pre[:7]}")
    edit(patch, "+++ b/app/util.py", "+++ app/util.py")
    found = only(lint(tiny), "patch-format")
    assert {f.line for f in found} == {line_of(patch, "index " + pre[:7]), line_of(patch, "--- a/app/util.py"),
                                       line_of(patch, "+++ app/util.py")}
    assert any("abbreviated index line" in f.message for f in found)
    assert any("lacks the b/ prefix" in f.message for f in found)


def test_paths_outside_the_upstream_and_files_touched_twice(tiny):
    patch = tiny["dir"] / "0001-main-syspath.patch"
    text = patch.read_text()
    diff = text[text.index("diff --git"):]
    patch.write_text(text + diff.replace("app/main.py", "app/nothere.py"))
    found = only(lint(tiny), "patch-format")
    assert any("app/nothere.py is not a file of the upstream" in f.message for f in found)
    patch.write_text(text + diff)
    found = only(lint(tiny), "patch-format")
    assert [f.message for f in found] == [f"app/main.py is touched twice (also line "
                                          f"{line_of(patch, 'diff --git')}); one diff per file"]


def test_a_hunk_with_a_line_added_by_hand_is_a_format_error(tiny):
    patch = tiny["dir"] / "0002-util-helper.patch"
    edit(patch, "+    return 10\n", "+    return 10\n+    # extra\n")
    found = only(lint(tiny), "patch-format")
    assert found and all(f.file == "patches/tiny/0002-util-helper.patch" for f in found)
    assert any(f.line == line_of(patch, "@@ -1,") and "longer than its" in f.message for f in found)


def test_cli_json_output_and_exit_code(tiny):
    edit(tiny["dir"] / "0001-main-syspath.patch", "Forwarded: not-needed\n", "")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(tiny["recipe_path"]),
                          "lint", "--format", "json"], env=env, capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] is False
    assert {"check": "patch-dep3", "file": "patches/tiny/0001-main-syspath.patch", "line": 1,
            "severity": "error"}.items() <= next(
        f for f in report["findings"] if f["check"] == "patch-dep3").items()


def test_upstream_lock_command_writes_ls_tree_of_the_pinned_commit(tiny):
    lock = tiny["project"] / "lock" / "upstream.lock"
    lock.unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(tiny["recipe_path"]),
                          "upstream-lock", "--source", str(tiny["source"])],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    body = [l for l in lock.read_text().splitlines() if not l.startswith("#")]
    assert body[0] == f"commit {tiny['commit']}"
    assert body[1:] == git(tiny["source"], "ls-tree", "-r", "HEAD").splitlines()
    assert lint(tiny) == []


def test_the_shipped_series_passes_the_patch_checks():
    """CI has no upstream: the committed series must at least agree with lock/upstream.lock."""
    recipe = load_recipe(ROOT / "recipe" / "stable-diffusion.yaml")
    findings = [f for f in run_checks(LintContext(recipe, None)) if f.check.startswith("patch-")]
    assert [str(f) for f in findings if f.severity == "error"] == []
    assert recipe.series("cpu"), "the shipped recipe lists no patches"
