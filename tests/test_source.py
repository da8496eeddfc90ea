"""The source step against a real `git daemon` on 127.0.0.1 (tests/fetch_fixtures.py).

The daemon serves the tiny upstream (the pinned commit plus later commits, so the
pinned one is not a branch tip) and a fork that never had the pinned commit.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fetch_fixtures import make_project
from patch_fixtures import git
from sdrecipe import patches
from sdrecipe.errors import SdrecipeError
from sdrecipe.project import load_recipe
from sdrecipe.source import PINNED_REF, ensure_source


def recipe_for(world, tmp_path, url="upstream.git", mirrors=("fork.git",)):
    daemon = world["daemon"]
    path = make_project(world, tmp_path, daemon.url(url), [daemon.url(m) for m in mirrors])
    return load_recipe(path)


def head(path):
    return git(path, "rev-parse", "HEAD").strip()


def test_clones_only_the_pinned_commit_after_skipping_a_mirror_without_it(world, tmp_path,
                                                                           caplog):
    recipe = recipe_for(world, tmp_path)
    dest = ensure_source(recipe, tmp_path / "deploy" / "stable-diffusion")
    assert head(dest) == world["commit"]
    assert git(dest, "rev-parse", PINNED_REF).strip() == world["commit"]
    assert git(dest, "rev-list", "--count", "HEAD").strip() == "1"  # depth 1: that commit only
    assert git(dest, "status", "--porcelain") == ""
    skipped = [r.getMessage() for r in caplog.records
               if r.name == "sdrecipe.source" and r.levelname == "WARNING"]
    assert any("fork.git" in m and "skipped" in m for m in skipped), caplog.text


def test_no_source_with_the_commit_names_every_url_and_leaves_nothing(world, tmp_path):
    recipe = recipe_for(world, tmp_path, url="missing.git")
    dest = tmp_path / "deploy" / "stable-diffusion"
    with pytest.raises(SdrecipeError) as error:
        ensure_source(recipe, dest)
    message = str(error.value)
    assert world["commit"] in message and "fork.git" in message and "missing.git" in message
    assert "does not have commit" in message  # the fork's reason
    assert "no such repository" in message  # git's own words, passed through
    assert not dest.exists()
    assert list((tmp_path / "deploy").iterdir()) == []  # no half-made clone left behind


def test_server_refusing_a_single_commit_falls_back_to_a_full_fetch(world, tmp_path,
                                                                    monkeypatch):
    """Protocol v0 makes the real daemon refuse an unadvertised commit (no
    uploadpack.allowReachableSHA1InWant), as older mirrors do."""
    for key, value in (("GIT_CONFIG_COUNT", "1"), ("GIT_CONFIG_KEY_0", "protocol.version"),
                       ("GIT_CONFIG_VALUE_0", "0")):
        monkeypatch.setenv(key, value)
    recipe = recipe_for(world, tmp_path, mirrors=())
    dest = ensure_source(recipe, tmp_path / "deploy" / "stable-diffusion")
    assert head(dest) == world["commit"]
    assert int(git(dest, "rev-list", "--count", "--all")) > 1  # the whole history came


def test_existing_checkout_at_the_pin_is_reused_without_contacting_any_server(world, tmp_path):
    recipe = recipe_for(world, tmp_path)
    dest = ensure_source(recipe, tmp_path / "stable-diffusion")
    offline = recipe_for(world, tmp_path / "other", url="missing.git", mirrors=())
    marker = dest / ".git" / "marker"
    marker.write_text("kept")
    assert ensure_source(offline, dest) == dest
    assert marker.read_text() == "kept"


def test_checkout_at_another_commit_is_refused(world, tmp_path):
    recipe = recipe_for(world, tmp_path)
    dest = tmp_path / "stable-diffusion"
    git(tmp_path, "clone", "-q", world["daemon"].url("upstream.git"), str(dest))  # at the tip
    with pytest.raises(SdrecipeError, match="not the pinned") as error:
        ensure_source(recipe, dest)
    assert head(dest) in str(error.value)


def test_our_patch_series_is_not_foreign_but_other_changes_are(world, tmp_path):
    recipe = recipe_for(world, tmp_path)
    dest = ensure_source(recipe, tmp_path / "stable-diffusion")
    patches.apply_series(dest, recipe, "cpu")
    assert git(dest, "status", "--porcelain", "--untracked-files=no") != ""
    assert ensure_source(recipe, dest, "cpu") == dest  # the applied series is ours

    (dest / "README.md").write_text("my notes\n")  # a file no patch touches
    with pytest.raises(SdrecipeError, match="README.md"):
        ensure_source(recipe, dest, "cpu")
    git(dest, "checkout", "--", "README.md")

    (dest / "app" / "util.py").write_text("def helper():\n    return 99  # my fix\n")
    with pytest.raises(SdrecipeError, match="app/util.py"):  # drift in a patched file
        ensure_source(recipe, dest, "cpu")


def test_a_folder_that_is_not_a_checkout_is_left_alone(world, tmp_path):
    recipe = recipe_for(world, tmp_path)
    dest = tmp_path / "stable-diffusion"
    dest.mkdir()
    (dest / "mine.txt").write_text("user data")
    with pytest.raises(SdrecipeError, match="not a git checkout"):
        ensure_source(recipe, dest)
    assert (dest / "mine.txt").read_text() == "user data"



def incomplete_checkout(world, dest):
    """A sparse clone of the tiny upstream at the pinned commit without the blob of the
    file it leaves out, as /tmp/sd-upstream lacks two: git cannot clone from it."""
    git(dest.parent, "clone", "-q", "--no-checkout", str(world["template"]["upstream"]), str(dest))
    git(dest, "sparse-checkout", "set", "--no-cone", "/*", "!/README.md")
    git(dest, "checkout", "-q", world["commit"])
    blob = git(dest, "rev-parse", "HEAD:README.md").strip()
    (dest / ".git" / "objects" / blob[:2] / blob[2:]).unlink()  # a local clone keeps them loose
    return dest


def test_a_local_checkout_git_cannot_clone_from_is_copied_and_checked(world, tmp_path):
    local = incomplete_checkout(world, tmp_path / "shared-copy")
    refused = subprocess.run(["git", "clone", "-q", str(local), str(tmp_path / "cloned")],
                             capture_output=True, text=True)
    assert refused.returncode != 0  # why a copy, not a clone: the missing blob
    recipe = recipe_for(world, tmp_path, url="missing.git", mirrors=())  # no server has it
    dest = ensure_source(recipe, tmp_path / "deploy" / "stable-diffusion", "cpu", local=local)
    assert head(dest) == world["commit"]
    assert git(dest, "rev-parse", PINNED_REF).strip() == world["commit"]
    assert git(dest, "status", "--porcelain") == ""
    assert (dest / "app" / "main.py").is_file() and not (dest / "README.md").exists()
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["stable-diffusion"]
    marker = dest / ".git" / "marker"
    marker.write_text("kept")
    assert ensure_source(recipe, dest, "cpu", local=local) == dest  # reused, not copied again
    assert marker.read_text() == "kept"


@pytest.mark.parametrize("damage", ["another commit", "an edited file"])
def test_a_local_checkout_that_is_not_the_pinned_tree_is_refused(world, tmp_path, damage):
    local = tmp_path / "shared-copy"
    git(tmp_path, "clone", "-q", str(world["template"]["upstream"]), str(local))
    (local / "README.md").write_text("someone's notes\n")
    if damage == "another commit":
        git(local, "commit", "-qam", "a local commit")
    recipe = recipe_for(world, tmp_path)
    dest = tmp_path / "deploy" / "stable-diffusion"
    with pytest.raises(SdrecipeError) as error:
        ensure_source(recipe, dest, "cpu", local=local)
    message = str(error.value)
    assert str(local) in message
    if damage == "another commit":
        assert f"{head(local)}, not the pinned {world['commit']}" in message
        assert "--source" in message
    else:
        assert "README.md" in message and "not the recipe's patch series" in message
    assert not dest.exists() and list((tmp_path / "deploy").iterdir()) == []


def test_an_https_mirror_is_verified_against_the_sites_ca_bundle(world, tmp_path, monkeypatch,
                                                                  tls_mirror, tls_files):
    """git verifies an https source against the `ca_bundle` setting (GIT_SSL_CAINFO), as the
    downloader does, and refuses it without. The loopback TLS mirror serves the bare
    repository's files as git's dumb HTTP protocol reads them (no depth-1 fetch there:
    the full-fetch fallback runs)."""
    bare = tmp_path / "upstream.git"
    shutil.copytree(world["daemon"].base / "upstream.git", bare)
    git(bare, "update-server-info")
    for path in bare.rglob("*"):
        if path.is_file():
            tls_mirror.add_plain(f"upstream.git/{path.relative_to(bare).as_posix()}", path)
    monkeypatch.setenv("SDRECIPE_CONFIG", str(tmp_path / "no-config.yaml"))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SDRECIPE_CA_BUNDLE",
                 "GIT_SSL_CAINFO"):
        monkeypatch.delenv(name, raising=False)
    recipe = load_recipe(make_project(world, tmp_path, f"{tls_mirror.url}/upstream.git"))
    dest = tmp_path / "deploy" / "stable-diffusion"
    with pytest.raises(SdrecipeError, match="certificate"):
        ensure_source(recipe, dest)
    monkeypatch.setenv("SDRECIPE_CA_BUNDLE", str(tls_files.ca))
    assert head(ensure_source(recipe, dest)) == world["commit"]
