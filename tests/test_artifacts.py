"""`sdrecipe fetch` against a real HF-layout HTTP mirror and `git daemon` on 127.0.0.1.

The recipe is the tiny test recipe (tests/fetch_fixtures.py): a gated checkpoint
pinned by sha256, an optional one, two unpinned files (trust on first use) and a
plain-URL file into $TORCH_HOME, all a few kilobytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fetch_fixtures import HARDNET, HF_FILES, isolate, make_project, sha256
from mirror_server import MirrorServer
from patch_fixtures import git
from sdrecipe.artifacts import LOCK_FILE, ArtifactLock, artifact_status
from sdrecipe.cli import main
from sdrecipe.errors import RecipeError, SdrecipeError
from sdrecipe.layout import Deployment
from sdrecipe.lint import LintContext, run_checks
from sdrecipe.project import load_recipe

CLIP = "stable-diffusion/models/clip-vit-large-patch14"
EXPECTED = {  # placed path -> bytes, for profile cpu without optional files
    "stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt": HF_FILES["tiny/sd"]["sd-tiny.ckpt"],
    f"{CLIP}/config.json": HF_FILES["tiny/clip"]["config.json"],
    f"{CLIP}/pytorch_model.bin": HF_FILES["tiny/clip"]["pytorch_model.bin"],
    "torch-home/hub/checkpoints/checkpoint_liberty_with_aug.pth": HARDNET,
}


@pytest.fixture
def env(world, tmp_path, monkeypatch):
    cache = isolate(monkeypatch, tmp_path, world["mirror"])
    recipe = make_project(world, tmp_path, world["daemon"].url("upstream.git"))
    return {"recipe": recipe, "deploy": tmp_path / "deploy", "cache": cache}


def fetch(env, *extra, capsys=None):
    code = main(["--recipe", str(env["recipe"]), "--deploy-dir", str(env["deploy"]),
                 "fetch", "--profile", "cpu", *extra])
    assert code == 0
    return capsys.readouterr().out if capsys else ""


def hits(mirror):
    return len(mirror.hits)


def test_fetch_builds_a_deployment_that_matches_the_recipe(env, world, capsys):
    out = fetch(env, capsys=capsys)
    deploy = env["deploy"]
    for rel, data in EXPECTED.items():
        assert sha256((deploy / rel).read_bytes()) == sha256(data), rel
    assert not (deploy / "stable-diffusion/models/ldm/stable-diffusion-v1/sd-tiny-full.ckpt"
                ).exists()  # optional: not fetched by default
    assert "(cloned)" in out and "placed" in out and "by hardlink" in out
    assert git(deploy / "stable-diffusion", "status", "--porcelain") == ""  # models excluded
    # the placed checkpoint is the cache's file (same inode), read-only
    ckpt = deploy / "stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt"
    digest = sha256(EXPECTED["stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt"])
    cached = env["cache"] / "sha256" / digest[:2] / digest
    assert os.path.samefile(ckpt, cached)
    assert ckpt.stat().st_mode & 0o777 == 0o444
    # trust on first use: the unpinned files are recorded in the project's lock
    lock = ArtifactLock(env["recipe"].parents[1] / LOCK_FILE)
    recorded = {entry["sha256"] for entry in lock.entries.values()}
    assert recorded == {sha256(HF_FILES["tiny/clip"]["config.json"]),
                        sha256(HF_FILES["tiny/clip"]["pytorch_model.bin"]), sha256(HARDNET)}


def test_second_fetch_is_a_no_op_that_contacts_no_server(env, world, capsys):
    fetch(env, capsys=capsys)
    before = hits(world["mirror"])
    out = fetch(env, capsys=capsys)
    assert hits(world["mirror"]) == before
    assert out.count("\nin place   ") == len(EXPECTED)
    assert "(in place)" in out  # the source checkout too
    assert "fetch: profile cpu: 4 files: 4 in place" in out


def test_a_second_deployment_reuses_the_cache(env, world, capsys):
    fetch(env, capsys=capsys)
    before = world["mirror"].bytes_sent()
    env["deploy"] = env["deploy"].with_name("deploy2")
    fetch(env, capsys=capsys)
    assert world["mirror"].bytes_sent() == before
    assert sha256((env["deploy"] / next(iter(EXPECTED))).read_bytes()) == \
        sha256(next(iter(EXPECTED.values())))


def test_with_optional_adds_the_optional_file(env, world, capsys):
    fetch(env, "--with-optional", capsys=capsys)
    full = env["deploy"] / "stable-diffusion/models/ldm/stable-diffusion-v1/sd-tiny-full.ckpt"
    assert full.read_bytes() == HF_FILES["tiny/sd"]["sd-tiny-full.ckpt"]


def test_verify_catches_a_corrupted_placed_file_that_stamps_cannot_see(env, world, capsys):
    fetch(env, capsys=capsys)
    target = env["deploy"] / "stable-diffusion/models/clip-vit-large-patch14/pytorch_model.bin"
    st = target.stat()
    os.chmod(target, 0o644)
    with open(target, "r+b") as handle:  # flip bytes in place: same size, inode, mtime
        handle.seek(100)
        handle.write(b"\xff" * 16)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "4 in place" in fetch(env, capsys=capsys)  # the stamp is trusted by design
    out = fetch(env, "--verify", capsys=capsys)
    assert "repaired   models/clip-vit-large-patch14/pytorch_model.bin" in out
    assert target.read_bytes() == HF_FILES["tiny/clip"]["pytorch_model.bin"]
    assert list((env["cache"] / "quarantine").iterdir())  # the damaged cache copy is kept aside


def test_a_hand_copied_file_with_the_right_bytes_is_adopted_not_downloaded(env, world, capsys):
    """The seed copied its 4 GB checkpoint by hand; fetch must not fetch it again."""
    target = env["deploy"] / "stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt"
    fetch(env, "--only", "hardnet", capsys=capsys)  # clone the source first
    target.parent.mkdir(parents=True)
    target.write_bytes(HF_FILES["tiny/sd"]["sd-tiny.ckpt"])
    before = world["mirror"].bytes_sent()
    out = fetch(env, "--only", "tiny-ckpt", capsys=capsys)
    assert "adopted    models/ldm/stable-diffusion-v1/model.ckpt" in out
    assert world["mirror"].bytes_sent() == before
    digest = sha256(HF_FILES["tiny/sd"]["sd-tiny.ckpt"])
    assert (env["cache"] / "sha256" / digest[:2] / digest).is_file()  # now bundle-able
    assert "1 in place" in fetch(env, "--only", "tiny-ckpt", capsys=capsys)


def test_fetch_survives_a_cut_connection_and_leaves_nothing_corrupt_on_bad_bytes(env, world,
                                                                                 capsys):
    mirror = world["mirror"]
    ckpt = HF_FILES["tiny/sd"]["sd-tiny.ckpt"]
    url = f"{mirror.url}/tiny/sd/resolve/{world['hf_commits']['tiny/sd']}/sd-tiny.ckpt"
    target = env["deploy"] / "stable-diffusion/models/ldm/stable-diffusion-v1/model.ckpt"
    try:
        mirror.fault(url, corrupt=True, times=None)  # every copy is wrong
        code = main(["--recipe", str(env["recipe"]), "--deploy-dir", str(env["deploy"]),
                     "fetch", "--profile", "cpu", "--only", "tiny-ckpt"])
        assert code == 2 and "quarantine" in capsys.readouterr().err
        assert not target.exists()
        assert not list((env["cache"] / "sha256").rglob(sha256(ckpt)))
        mirror.faults.clear()
        mirror.fault(url, cut_after=len(ckpt) // 2)  # once: the retry resumes the rest
        before = mirror.bytes_sent(url)
        fetch(env, "--only", "tiny-ckpt", capsys=capsys)
        assert target.read_bytes() == ckpt
        assert mirror.bytes_sent(url) - before <= len(ckpt) + 1024  # no full second copy
    finally:
        mirror.faults.clear()


def test_status_reports_missing_then_done_then_stale(env, world, capsys):
    recipe = load_recipe(env["recipe"])
    deployment = Deployment(env["deploy"])
    assert {s.state for s in artifact_status(recipe, deployment, "cpu")} == {"missing"}
    fetch(env, capsys=capsys)
    assert {s.state for s in artifact_status(recipe, deployment, "cpu")} == {"done"}
    target = env["deploy"] / "torch-home/hub/checkpoints/checkpoint_liberty_with_aug.pth"
    target.unlink()
    target.write_bytes(b"hand-copied")
    stale = [s for s in artifact_status(recipe, deployment, "cpu") if s.state != "done"]
    assert [(s.state, s.file.place) for s in stale] == [
        ("stale", "torch_home/hub/checkpoints/checkpoint_liberty_with_aug.pth")]
    assert "changed since placed" in stale[0].reason
    fetch(env, capsys=capsys)
    assert target.read_bytes() == HARDNET


def test_trust_on_first_use_is_enforced_afterwards(env, world, tmp_path, monkeypatch, capsys):
    fetch(env, capsys=capsys)
    with MirrorServer() as changed:  # upstream "changed" config.json at the same revision
        for repo, files in HF_FILES.items():
            for path, data in files.items():
                if path == "config.json":
                    data = b'{"hidden_size": 9}\n'
                changed.add_file(repo, path, data, gated=repo == "tiny/sd",
                                 commit=world["hf_commits"][repo])
        monkeypatch.setenv("HF_ENDPOINT", changed.url)
        monkeypatch.setenv("SDRECIPE_CACHE", str(tmp_path / "fresh-cache"))
        env["deploy"] = tmp_path / "deploy-b"
        code = main(["--recipe", str(env["recipe"]), "--deploy-dir", str(env["deploy"]),
                     "fetch", "--profile", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config.json" in err and LOCK_FILE in err and "sha256" in err
    assert "pytorch_model.bin" not in err  # the hint names only the file that failed
    assert not (env["deploy"] / "stable-diffusion/models/clip-vit-large-patch14/config.json"
                ).exists()


def test_copy_across_filesystems_when_hardlinks_cannot_cross(env, world, monkeypatch, capsys):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == env["deploy"].parent.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp folder")
    import tempfile
    with tempfile.TemporaryDirectory(dir=shm) as cache:
        monkeypatch.setenv("SDRECIPE_CACHE", cache)
        out = fetch(env, capsys=capsys)
    assert "by hardlink" not in out and ("by copy" in out or "by reflink" in out)
    for rel, data in EXPECTED.items():
        assert (env["deploy"] / rel).read_bytes() == data


def test_symlinked_folder_leading_out_of_the_deployment_is_refused(env, world, tmp_path,
                                                                   capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    models = env["deploy"] / "stable-diffusion" / "models"
    fetch(env, "--only", "hardnet", capsys=capsys)  # the checkout exists now
    models.mkdir(exist_ok=True)
    (models / "clip-vit-large-patch14").symlink_to(outside)
    code = main(["--recipe", str(env["recipe"]), "--deploy-dir", str(env["deploy"]),
                 "fetch", "--profile", "cpu"])
    assert code == 2
    assert "outside" in capsys.readouterr().err
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("entry, field", [
    ("{path: config.json, as: ../../../etc/evil}", "as"),
    ("{path: ../config.json}", "path"),
    ("{path: /etc/passwd}", "path"),
])
def test_path_traversal_in_a_recipe_destination_is_refused_with_file_and_line(
        world, tmp_path, entry, field):
    artifacts = ("artifacts:\n  - name: evil\n    hf: {repo: tiny/clip, revision: main}\n"
                 f"    into: models/x\n    files:\n      - {entry}\n")
    recipe = make_project(world, tmp_path, "git://127.0.0.1:9/none", artifacts=artifacts)
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    line = recipe.read_text().splitlines().index(f"      - {entry}") + 1
    assert f"{recipe}:{line}" in str(error.value)
    assert f"artifacts[0].files[0].{field}" in str(error.value)


def test_into_must_name_a_root_and_stay_inside(world, tmp_path):
    artifacts = ("artifacts:\n  - name: evil\n    hf: {repo: tiny/clip, revision: main}\n"
                 "    into: models/../../home\n    files:\n      - {path: config.json}\n")
    recipe = make_project(world, tmp_path, "git://127.0.0.1:9/none", artifacts=artifacts)
    with pytest.raises(RecipeError, match=r"artifacts\[0\].into"):
        load_recipe(recipe)


def test_lint_warns_while_an_artifact_is_unpinned(env, world, capsys):
    recipe = load_recipe(env["recipe"])
    messages = [str(f) for f in run_checks(LintContext(recipe, None))
                if f.check == "artifacts-pinned"]
    assert len(messages) == 3 and all("no sha256" in m for m in messages)
    fetch(env, capsys=capsys)  # records the first-use hashes
    assert not [f for f in run_checks(LintContext(load_recipe(env["recipe"]), None))
                if f.check == "artifacts-pinned"]
    text = env["recipe"].read_text().replace(f"revision: {world['hf_commits']['tiny/clip']}",
                                             "revision: main")
    env["recipe"].write_text(text)
    branch = [f for f in run_checks(LintContext(load_recipe(env["recipe"]), None))
              if f.check == "artifacts-pinned"]
    assert any("'main'" in str(f) and "not a commit sha" in str(f) for f in branch)
    stale = [str(f) for f in run_checks(LintContext(load_recipe(env["recipe"]), None))
             if f.check == "artifacts-lock"]
    assert len(stale) == 2 and all("tiny/clip@" in m and "delete it" in m for m in stale)


def test_gated_file_without_a_token_fails_clearly_and_places_nothing(env, world, monkeypatch,
                                                                     capsys):
    monkeypatch.delenv("HF_TOKEN")
    code = main(["--recipe", str(env["recipe"]), "--deploy-dir", str(env["deploy"]),
                 "fetch", "--profile", "cpu", "--only", "tiny-ckpt"])
    err = capsys.readouterr().err
    assert code == 2 and "gated" in err and "HF_TOKEN" in err
    assert not (env["deploy"] / "stable-diffusion/models/ldm").exists()


def test_unknown_artifact_name_is_an_error(env, world, capsys):
    with pytest.raises(SdrecipeError, match="unknown artifact"):
        from sdrecipe.artifacts import select
        select(load_recipe(env["recipe"]), "cpu", only=["nope"])


def test_connections_come_from_the_flag_over_the_config_and_bad_values_are_one_line(
        env, world, monkeypatch, capsys):
    from sdrecipe.config import load_config
    from sdrecipe.transfer import Transfer
    monkeypatch.setenv("SDRECIPE_CONNECTIONS", "3")
    assert Transfer.from_config(load_config(), token="").connections == 3
    assert "4 placed" in fetch(env, "--connections", "1", capsys=capsys)
    code = main(["--recipe", str(env["recipe"]), "--deploy-dir", str(env["deploy"]),
                 "fetch", "--profile", "cpu", "--connections", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--connections 0: give 1 or more" in err
    monkeypatch.setenv("SDRECIPE_CONNECTIONS", "many")
    with pytest.raises(SdrecipeError, match=r"\$SDRECIPE_CONNECTIONS='many': expected a whole"):
        load_config()
