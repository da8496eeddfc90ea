"""`sdrecipe deploy --smoke` and `sdrecipe status` for real, against a real upstream checkout.

The upstream is never faked: the end-to-end tests take a checkout of the pinned
commit from $SDRECIPE_UPSTREAM (the `upstream` fixture: .ci/run makes one from
../shared/upstream; elsewhere they skip, and in CI they fail). They run the whole pipeline:
copy the checkout, apply the recipe's patch series, build the cpu environment
as a venv of Python 3.8 from the committed lock (pip, real PyPI, pip's cache),
generate the tiny models inside it and run upstream's txt2img.py offline.
A second deployment in another folder checks that provenance is reproducible.
The project (recipe, patches, locks, env/) is copied to a temporary folder so
the status tests can damage a patch and a lock without touching the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import required_or_skip
from env_helpers import PY38
from sdrecipe.deploy import STAGE_NAMES as STAGES, stable_part
from sdrecipe.stages.patches import source_files

ROOT = Path(__file__).resolve().parents[1]


def sdrecipe(*args, recipe: Path, deploy: Path, check=False):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SDRECIPE_")}
    environ["PYTHONPATH"] = str(ROOT / "src")
    result = subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(recipe),
                             "--deploy-dir", str(deploy), *args],
                            capture_output=True, text=True, env=environ)
    if check and result.returncode != 0:
        raise AssertionError(f"sdrecipe {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def copy_project(dest: Path) -> Path:
    """The recipe with its patches, locks and env/ files: what a deployment is made from."""
    for name in ("recipe", "patches", "lock", "env"):
        shutil.copytree(ROOT / name, dest / name)
    return dest / "recipe" / "stable-diffusion.yaml"


def stages(result) -> dict:
    data = json.loads(result.stdout)
    return {s["stage"]: s for s in data["stages"]}


# --- without an upstream ------------------------------------------------------------------

def test_status_of_an_empty_deployment_says_what_a_deploy_would_do(tmp_path):
    recipe = ROOT / "recipe" / "stable-diffusion.yaml"
    result = sdrecipe("status", "--profile", "cpu", "--smoke", "--format", "json",
                      recipe=recipe, deploy=tmp_path / "deploy")
    assert result.returncode == 1, result.stderr
    found = stages(result)
    assert list(found) == list(STAGES)
    assert found["source"]["state"] == "missing" and "21f890f9da3c" in found["source"]["action"]
    assert found["artifacts"]["state"] == "skipped"  # smoke downloads nothing
    for stage in ("patches", "env", "preseed", "verify"):
        assert found[stage]["state"] == "missing", found[stage]
    text = sdrecipe("status", "--profile", "cpu", "--smoke", recipe=recipe, deploy=tmp_path / "d")
    assert str(tmp_path / "d") in text.stdout
    assert "would run: source, patches, env, preseed, verify" in text.stdout


def test_status_without_smoke_lists_the_model_files_to_fetch(tmp_path):
    recipe = ROOT / "recipe" / "stable-diffusion.yaml"
    found = stages(sdrecipe("status", "--profile", "cpu", "--format", "json",
                            recipe=recipe, deploy=tmp_path / "deploy"))
    assert found["artifacts"]["state"] == "missing"
    assert "models/ldm/stable-diffusion-v1/model.ckpt: not placed" in found["artifacts"]["reason"]
    assert found["artifacts"]["action"].startswith("fetch and place")
    assert found["preseed"]["state"] == "missing" and "TORCH_HOME" in found["preseed"]["reason"]


def test_source_files_are_the_deployed_tree_without_caches_sparse_files_or_models(tmp_path):
    repo = tmp_path / "stable-diffusion"
    (repo / "pkg").mkdir(parents=True)
    for name in ("a.py", "pkg/b.py", "big.gif"):
        (repo / name).write_text(name)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    subprocess.run(git + ["sparse-checkout", "set", "--no-cone", "/*", "!/big.gif"], check=True)
    (repo / "pkg" / "__pycache__").mkdir()
    (repo / "pkg" / "__pycache__" / "b.cpython-38.pyc").write_bytes(b"\0")
    (repo / "new_from_a_patch.py").write_text("added")
    (repo / "models").mkdir()
    (repo / "models" / "model.ckpt").write_bytes(b"weights")
    files = source_files(repo, skip={"models/model.ckpt"})
    assert files == ["a.py", "new_from_a_patch.py", "pkg/b.py"]


def test_deploy_source_must_be_a_checkout_and_nothing_is_left_behind(tmp_path):
    recipe = ROOT / "recipe" / "stable-diffusion.yaml"
    not_a_checkout = tmp_path / "sd-copy"
    not_a_checkout.mkdir()
    (not_a_checkout / "README.md").write_text("files, no .git")
    deploy = tmp_path / "deploy"
    result = sdrecipe("deploy", "--profile", "cpu", "--smoke", "--source", str(not_a_checkout),
                      recipe=recipe, deploy=deploy)
    assert result.returncode == 2
    assert f"{not_a_checkout} is not a git checkout" in result.stderr and "--source" in result.stderr
    assert not (deploy / "stable-diffusion").exists()
    assert [p.name for p in deploy.iterdir() if p.name.startswith(".stable")] == []


def test_verify_and_provenance_hash_the_patches_alike(tmp_path):
    """One set of input hashes: a patch edited after a verify shows in both at once."""
    from sdrecipe.config import load_config
    from sdrecipe.deploy import manifest
    from sdrecipe.layout import Deployment
    from sdrecipe.project import load_recipe
    from sdrecipe.stages.verify import verified_against
    from sdrecipe.target import Target
    recipe = load_recipe(copy_project(tmp_path / "project"))
    target = Target(recipe, Deployment(tmp_path / "deploy"), "cpu", load_config(), smoke=True)
    pinned = {e.file: e.sha256 for e in recipe.series("cpu")}
    assert verified_against(target)["patches"] == pinned
    patch = recipe.patch_dir / recipe.series("cpu")[0].file
    patch.write_bytes(patch.read_bytes() + b"\n")
    changed = verified_against(target)["patches"][patch.name]
    assert changed not in (None, pinned[patch.name])
    recorded = manifest(target, files={})
    assert {p["file"]: p["sha256"] for p in recorded["patches"]} == verified_against(target)["patches"]
    assert recorded["recipe"]["sha256"] == verified_against(target)["recipe"]


# --- with a real upstream checkout ---------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory, upstream):
    """One smoke deployment from nothing, with its timings: (recipe, deploy dir, result, seconds)."""
    if not Path(PY38).is_file():
        required_or_skip(f"no Python 3.8 at {PY38} (set SDRECIPE_TEST_PY38)")
    base = tmp_path_factory.mktemp("smoke")
    recipe = copy_project(base / "project")
    start = time.monotonic()
    result = sdrecipe("deploy", "--profile", "cpu", "--smoke", "--python", PY38,
                      "--source", str(upstream), recipe=recipe, deploy=base / "deploy")
    return recipe, base / "deploy", result, time.monotonic() - start


@pytest.mark.upstream
@pytest.mark.slow
def test_smoke_deploy_goes_from_nothing_to_a_verified_image_and_report(smoke):
    recipe, deploy, result, seconds = smoke
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((deploy / "reports" / "cpu" / "smoke" / "report.json").read_text())
    assert report["ok"] and report["smoke"] and len(report["images"]) == 1
    assert {c["name"] for c in report["checks"]} >= {"exit-code", "completion", "images",
                                                     "not-blank", "not-replacement", "timings"}
    assert report["timings"]["model_load_s"] > 0 and report["timings"]["sampling_s"] > 0
    prov = report["provenance"]
    assert prov["upstream_commit"] == "21f890f9da3cfbeaba8e2ac3c425ee9e998d5229"
    assert prov["patches"] and all(p["state"] == "applied" for p in prov["patches"])
    assert prov["runtime"]["device"] == "cpu" and prov["runtime"]["transformers"] == "4.19.2"
    assert prov["lock_hash"]
    assert report["settings"]["network"].startswith(("no network", "not isolated"))
    page = (deploy / "reports" / "cpu" / "smoke" / "report.html").read_text()
    assert "data:image/png;base64," in page and "PASSED" in page
    # the smoke models live apart from the deployment's real model folder
    assert not (deploy / "stable-diffusion" / "models" / "ldm" / "stable-diffusion-v1"
                / "model.ckpt").exists()
    print(f"\nsmoke deploy from nothing: {seconds:.0f} s")


@pytest.mark.upstream
@pytest.mark.slow
def test_after_a_smoke_deploy_plain_status_and_doctor_know_the_deployment(smoke):
    """No --profile, no --smoke: the commands ask the deployment what was deployed."""
    recipe, deploy, first, _ = smoke
    assert first.returncode == 0, first.stderr[-3000:]
    status = sdrecipe("status", recipe=recipe, deploy=deploy)
    assert status.returncode == 0, status.stdout
    assert "(profile cpu, smoke)" in status.stdout and "would do nothing" in status.stdout
    doctor = sdrecipe("doctor", recipe=recipe, deploy=deploy)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "no problems found" in doctor.stdout


@pytest.mark.upstream
@pytest.mark.slow
def test_a_second_deploy_is_a_no_op(smoke):
    recipe, deploy, first, _ = smoke
    assert first.returncode == 0, first.stderr[-3000:]
    before = (deploy / "provenance.json").read_text()
    start = time.monotonic()
    again = sdrecipe("deploy", "--profile", "cpu", "--smoke", recipe=recipe, deploy=deploy, check=True)
    seconds = time.monotonic() - start
    assert "-> running" not in again.stdout, again.stdout
    assert all(f"{stage:<10} done:" in again.stdout or f"{stage:<10} skipped:" in again.stdout
               for stage in STAGES), again.stdout
    assert (deploy / "provenance.json").read_text() == before  # not even rewritten
    print(f"\nno-op re-deploy: {seconds:.2f} s")


@pytest.mark.upstream
@pytest.mark.slow
def test_two_deployments_give_the_same_provenance_apart_from_volatile_fields(smoke, tmp_path,
                                                                            upstream):
    recipe, deploy, first, _ = smoke
    assert first.returncode == 0, first.stderr[-3000:]
    other = tmp_path / "second"
    sdrecipe("deploy", "--profile", "cpu", "--smoke", "--python", PY38, "--source", str(upstream),
             recipe=recipe, deploy=other, check=True)
    one = json.loads((deploy / "provenance.json").read_text())
    two = json.loads((other / "provenance.json").read_text())
    assert one["volatile"]["deployment"] != two["volatile"]["deployment"]
    assert stable_part(one) == stable_part(two)
    assert one["files"]["stable-diffusion/scripts/txt2img.py"]  # patched, hashed
    assert any(path.startswith("smoke/models/") for path in one["files"])
    assert (deploy / "provenance.json").read_text().index('"files"') > 0  # sorted keys
    assert list(one["files"]) == sorted(one["files"])


@pytest.fixture
def damaged(smoke):
    """The smoke deployment for one damage test; asserts it is whole again afterwards."""
    recipe, deploy, first, _ = smoke
    assert first.returncode == 0, first.stderr[-3000:]
    yield recipe, deploy
    after = sdrecipe("status", "--profile", "cpu", "--smoke", recipe=recipe, deploy=deploy)
    assert after.returncode == 0, f"the test left damage behind:\n{after.stdout}"


def status_of(recipe, deploy) -> dict:
    return stages(sdrecipe("status", "--profile", "cpu", "--smoke", "--format", "json",
                           recipe=recipe, deploy=deploy))


@pytest.mark.upstream
@pytest.mark.slow
def test_status_and_deploy_catch_a_modified_patch(damaged):
    recipe, deploy = damaged
    patch = sorted((recipe.parent.parent / "patches" / "stable-diffusion").glob("*.patch"))[1]
    original = patch.read_bytes()
    patch.write_bytes(original.replace(b"Description:", b"Description: (edited)", 1))
    try:
        found = status_of(recipe, deploy)
        assert found["patches"]["state"] == "blocked"
        assert f"patch {patch.name}" in found["patches"]["reason"]
        assert "modified patch" in found["patches"]["reason"]
        assert found["verify"]["state"] == "stale"  # verified with the old series
        refused = sdrecipe("deploy", "--profile", "cpu", "--smoke", recipe=recipe, deploy=deploy)
        assert refused.returncode == 2 and "modified patch" in refused.stderr
    finally:
        patch.write_bytes(original)


@pytest.mark.upstream
@pytest.mark.slow
def test_status_catches_a_changed_lock(damaged):
    recipe, deploy = damaged
    lock = recipe.parent.parent / "lock" / "cpu.conda-lock.yml"
    original = lock.read_bytes()
    lock.write_bytes(original + b"# changed after the build\n")
    try:
        found = status_of(recipe, deploy)
        assert found["env"]["state"] == "stale" and "lock changed" in found["env"]["reason"]
        assert found["verify"]["state"] == "stale"
        assert found["patches"]["state"] == "done"
    finally:
        lock.write_bytes(original)


@pytest.mark.upstream
@pytest.mark.slow
def test_status_catches_a_missing_model_file_and_deploy_repairs_it(damaged):
    recipe, deploy = damaged
    vocab = deploy / "smoke" / "models" / "clip-vit-large-patch14" / "vocab.json"
    vocab.unlink()
    found = status_of(recipe, deploy)
    assert found["preseed"]["state"] == "stale"
    assert "models/clip-vit-large-patch14/vocab.json" in found["preseed"]["reason"]
    repaired = sdrecipe("deploy", "--profile", "cpu", "--smoke", recipe=recipe, deploy=deploy,
                        check=True)
    assert "preseed    stale" in repaired.stdout and vocab.is_file()
    # the generator is deterministic: same bytes, so the last verify still holds
    assert "verify     done" in repaired.stdout


@pytest.mark.upstream
@pytest.mark.slow
@pytest.mark.parametrize("path, words", [
    ("ldm/modules/attention.py", "differ from what deploy recorded"),  # untouched by the series
    ("scripts/txt2img.py", "edited by hand"),  # a file the series patches
])
def test_status_and_deploy_catch_a_drifted_file(damaged, path, words):
    recipe, deploy = damaged
    target = deploy / "stable-diffusion" / path
    original = target.read_bytes()
    target.write_bytes(original + b"\n# a local edit\n")
    try:
        found = status_of(recipe, deploy)
        assert found["patches"]["state"] == "blocked" and found["patches"]["blocking"]
        assert words in found["patches"]["reason"] and path in found["patches"]["reason"]
        refused = sdrecipe("deploy", "--profile", "cpu", "--smoke", recipe=recipe, deploy=deploy)
        assert refused.returncode == 2 and path in refused.stderr
        assert target.read_bytes().endswith(b"# a local edit\n")  # the edit is never overwritten
    finally:
        target.write_bytes(original)


@pytest.mark.upstream
@pytest.mark.slow
def test_the_fix_status_suggests_runs_as_printed_and_fixes_it(damaged):
    """A patched file edited by hand blocks the deploy; the command status prints (with this
    deployment's --recipe and --deploy-dir filled in) runs as is and unblocks it."""
    recipe, deploy = damaged
    target = deploy / "stable-diffusion" / "scripts" / "txt2img.py"
    target.write_bytes(target.read_bytes() + b"\n# a local edit\n")
    bin_dir = str(Path(sys.executable).parent)  # where pip put the `sdrecipe` command
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SDRECIPE_")}
    environ.update(PATH=f"{bin_dir}:{environ['PATH']}", PYTHONPATH=str(ROOT / "src"))
    status = subprocess.run([sys.executable, "-m", "sdrecipe", "--recipe", str(recipe),
                             "--deploy-dir", str(deploy), "status", "--format", "json"],
                            capture_output=True, text=True, env=environ)
    patches = {s["stage"]: s for s in json.loads(status.stdout)["stages"]}["patches"]
    assert patches["blocking"] and "then: `" in patches["action"], patches
    fix = patches["action"].split("then: `", 1)[1].split("`", 1)[0]  # suggestions are backticked
    assert f"--deploy-dir {deploy}" in fix and f"--recipe {recipe}" in fix
    done = subprocess.run(["bash", "-c", fix], capture_output=True, text=True, env=environ)
    assert done.returncode == 0, done.stdout + done.stderr
    assert status_of(recipe, deploy)["patches"]["state"] == "done"
