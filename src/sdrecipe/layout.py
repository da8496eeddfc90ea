"""Where a deployment keeps its parts: one folder, owned by sdrecipe, nothing in $HOME.

    <deploy>/stable-diffusion/        upstream checkout at the pinned commit, patched
    <deploy>/stable-diffusion/models/ model files placed by `fetch` (hardlinks into the cache)
    <deploy>/torch-home/              $TORCH_HOME: torch.hub's preseeded checkpoints
    <deploy>/hf-home/                 $HF_HOME: kept empty and offline
    <deploy>/envs/<profile>/          the built environment
    <deploy>/modulefiles/sdrecipe/    Lmod modulefiles, one per built profile (`module use` it)
    <deploy>/reports/<profile>/       verify reports (sample/ and smoke/)
    <deploy>/smoke/                   smoke mode's tiny generated models, config, $TORCH_HOME
    <deploy>/jobs/                    Slurm jobs: each submission's script, log and report
    <deploy>/outputs/<batch>/         prompt batches: a folder per prompt, gallery.html
    <deploy>/.sdrecipe/records/       each stage's record (stages/__init__.py: the record rules)
    <deploy>/.sdrecipe/logs/          a log file of each run
    <deploy>/.sdrecipe/               placement stamps, locks
    <deploy>/provenance.json          what was deployed, by hash
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Deployment:
    root: Path

    @property
    def source(self) -> Path:
        return self.root / "stable-diffusion"

    @property
    def models(self) -> Path:
        return self.source / "models"

    @property
    def torch_home(self) -> Path:
        return self.root / "torch-home"

    @property
    def hf_home(self) -> Path:
        return self.root / "hf-home"

    @property
    def state(self) -> Path:
        return self.root / ".sdrecipe"

    def record(self, stage: str, profile: str | None = None, mode: str | None = None) -> Path:
        """A stage's record: one per deployment (source), per profile, or per profile and
        mode (smoke or sample) where the two make different things."""
        folder = self.state / "records" / (profile or "")
        return folder / (f"{stage}-{mode}.json" if mode else f"{stage}.json")

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    def env_prefix(self, profile: str) -> Path:
        return self.root / "envs" / profile

    @property
    def modulefiles(self) -> Path:
        return self.root / "modulefiles"

    def reports(self, profile: str) -> Path:
        return self.root / "reports" / profile

    @property
    def smoke(self) -> Path:
        return self.root / "smoke"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"


def deployment_dir(explicit: str | None, project_root: Path) -> Deployment:
    """--deploy-dir, else $SDRECIPE_DEPLOY_DIR, else `<project>/deploy`."""
    chosen = explicit or os.environ.get("SDRECIPE_DEPLOY_DIR") or project_root / "deploy"
    return Deployment(Path(chosen).expanduser().resolve())
