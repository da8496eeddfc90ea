"""Shared pytest fixtures. Each owner adds its fixtures in its own block."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ helpers: mirror_server, ...


# --- HTTP mirror (transfer; also used by artifacts) ------------------------------------
@pytest.fixture
def mirror():
    """A running Hugging Face-layout HTTP mirror on 127.0.0.1 (see tests/mirror_server.py);
    stopped after the test."""
    from mirror_server import MirrorServer

    with MirrorServer() as server:
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A throwaway CA and a 127.0.0.1/localhost server certificate (PEM files)."""
    from mirror_server import make_tls_files

    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_mirror(tls_files):
    """The mirror over HTTPS with a certificate from `tls_files.ca` (not trusted by default)."""
    from mirror_server import MirrorServer

    with MirrorServer(tls=tls_files) as server:
        yield server


@pytest.fixture
def no_hf_credentials(monkeypatch, tmp_path):
    """No token or CA bundle leaks in from the developer's or CI's environment."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT",
                 "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SDRECIPE_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


# --- the real pinned upstream (deploy, verify and Slurm end-to-end tests) -------------------
def required_or_skip(message: str):
    """Where CI runs (CI=true), a missing requirement fails the test instead of skipping it:
    the end-to-end tests are what guards the pipeline, so CI must never pass without them."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run this test: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def upstream() -> Path:
    """A checkout of the pinned upstream commit: $SDRECIPE_UPSTREAM (.ci/run makes one with
    ../shared/upstream/checkout.sh, else clones the recipe's URL). Never copied into the repo."""
    path = os.environ.get("SDRECIPE_UPSTREAM")
    if not path or not Path(path, "scripts", "txt2img.py").is_file():
        required_or_skip("set SDRECIPE_UPSTREAM to a checkout of the pinned upstream commit "
                         "(../shared/upstream/checkout.sh DEST makes one offline)")
    return Path(path)


# --- the tiny upstream and its series (patch_fixtures.py), served for fetching (fetch_fixtures.py)
from fetch_fixtures import world  # noqa: E402, F401 -- defined beside the helpers they use
from patch_fixtures import template, tiny  # noqa: E402, F401


# --- Slurm + Lmod cluster (slurm) ---------------------------------------------------------
def running_slurm_cluster(packages: str, **options):
    """Start a SlurmCluster(**options) (skip, or fail in CI, when this machine lacks what it
    needs: `packages` says what to install), yield it, then stop its daemons by PID and
    remove its folder, whatever the tests did."""
    from slurm_cluster import SlurmCluster, missing_requirements

    missing = missing_requirements(accounting=options.get("accounting", False))
    if missing:
        required_or_skip(f"the Slurm test cluster needs {', '.join(missing)}: as root, "
                         f"apt-get install {packages} (bash .ci/run does)")
    cluster = SlurmCluster(**options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        cluster.remove()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real single-node Slurm cluster with munge and an Lmod module tree (see
    tests/slurm_cluster.py), shared by every slurm test."""
    yield from running_slurm_cluster("slurm-wlm munge lmod")
