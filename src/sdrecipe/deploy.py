"""`sdrecipe deploy` and `sdrecipe status`: every stage in order, each idempotent, with provenance.

    source -> artifacts -> patches -> env -> preseed -> verify

Each stage has a read-only *status* (done / stale / missing / skipped, with the
reason and what a re-run would do) and a *run*, which `deploy` calls only for a
stage that is not done; so a re-deploy over a complete deployment only reads
stamps, hashes the small source tree and exits in about a second. The stages
delegate to their owners: `source.ensure_source`, `artifacts.fetch_artifacts`,
`patches.apply_series`, `env.build_env`, `smoke.ensure_smoke_models`,
`verify.verify`.

`--smoke` runs the same pipeline on tiny generated models: the artifacts stage
is skipped (nothing is downloaded, above all not the gated 4 GB checkpoint) and
the preseed stage generates the models inside the environment. Without it,
preseed is the fetched `$TORCH_HOME` content (kornia's HardNet), which kornia
0.6.0 needs at import.

`<deploy>/provenance.json` records what was deployed: recipe, upstream commit,
patches, lock, tool version and the sha256 of every deployed file (the source
tree as patched, smoke models; model artifacts by their PINNED hashes, never
rehashed). Keys are sorted and paths relative, so two deployments from the same
recipe and locks give identical manifests except for the `volatile` block (time,
host, user, folder). `status` compares the tree against it to find drifted files.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .errors import SdrecipeError
from .files import atomic_write_text, sha256_file
from .report import deployed_inputs, input_hashes

STAGES = ("source", "artifacts", "patches", "env", "preseed", "verify")
MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class StageStatus:
    stage: str
    state: str  # done | stale | missing | skipped
    reason: str
    action: str  # what `sdrecipe deploy` would do; "stop: ..." when it cannot fix it itself

    @property
    def blocks(self) -> bool:
        return self.action.startswith("stop")


class VerifyFailed(SdrecipeError):
    exit_code = 1


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(deployment) -> dict | None:
    try:
        return json.loads(deployment.provenance.read_text())
    except (OSError, ValueError):
        return None


def stable_part(data: dict) -> dict:
    """A manifest without its volatile fields: what must be equal across deployments."""
    return {k: v for k, v in data.items() if k != "volatile"}


def source_files(source: Path, skip: set) -> list[str]:
    """The checkout's files as deployed: tracked ones (minus sparse-excluded) and untracked
    ones a patch may add; not caches (__pycache__) and not placed model files (`skip`)."""
    listing = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "-t",
                              "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
    files = set()
    for entry in filter(None, listing.split("\0")):
        tag, path = entry.split(" ", 1)
        if tag == "S" or "__pycache__" in path.split("/") or path.endswith(".pyc"):
            continue  # S: skip-worktree, left out of a sparse checkout on purpose
        if f"{source.name}/{path}" not in skip:
            files.add(path)
    return sorted(files)


class Target:
    """One deployment of one profile (smoke or not), with what this run learnt about it.

    Status checks share the expensive answers (tree state, lock hash, file hashes)
    through this object; `changed()` forgets them after a stage ran."""

    def __init__(self, recipe, deployment, profile: str, smoke: bool, opts: dict | None = None):
        self.recipe, self.deployment, self.profile, self.smoke = recipe, deployment, profile, smoke
        self.opts = opts or {}
        # one state per profile: the checkout and the env are shared by smoke and real runs
        self.state_file = deployment.state / f"deploy-{profile}.json"
        self.mode = "smoke" if smoke else "sample"
        try:
            self.state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            self.state = {}
        self._cache = {}

    def verified_fingerprint(self) -> dict | None:
        """The fingerprint of this mode's last passing verify."""
        return (self.state.get("verified") or {}).get(self.mode)

    def save_state(self) -> None:
        _write_json(self.state_file, self.state)

    def changed(self) -> None:
        self._cache.clear()

    def _memo(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    @property
    def has_source(self) -> bool:
        return (self.deployment.source / ".git").exists()

    def tree(self):
        from .patches import tree_state
        return self._memo("tree", lambda: tree_state(self.deployment.source, self.recipe, self.profile))

    def lock_sha256(self) -> str | None:
        from .lock import lock_path
        path = lock_path(self.recipe, self.profile)
        return self._memo("lock_sha256", lambda: sha256_file(path) if path.is_file() else None)

    def lock_content_hash(self) -> str | None:
        """conda-lock's content hash, remembered per lock file sha256 (parsing costs ~1 s)."""
        from .report import lock_hash
        memo = self.state.get("lock_memo", {})
        if memo.get("sha256") != self.lock_sha256() or self.lock_sha256() is None:
            memo = {"sha256": self.lock_sha256(), "content_hash": lock_hash(self.recipe, self.profile)}
            self.state["lock_memo"] = memo
        return memo["content_hash"]

    def artifact_pins(self) -> dict:
        """Placed model files -> their pinned sha256 (recipe or lock/artifacts.lock)."""
        if self.smoke:
            return {}
        from .artifacts import ArtifactLock, expected, select

        def compute():
            lock = ArtifactLock.for_recipe(self.recipe)
            return {f.target(self.deployment).relative_to(self.deployment.root).as_posix():
                    expected(f, lock)[0] for f in select(self.recipe, self.profile)}
        return self._memo("pins", compute)

    def model_paths(self) -> set:
        """Where any artifact of the recipe goes (any profile): not part of the source tree,
        even when provenance.json was last written by another profile or mode."""
        from .artifacts import artifact_files
        return {f.target(self.deployment).relative_to(self.deployment.root).as_posix()
                for f in artifact_files(self.recipe)}

    def smoke_hashes(self) -> dict:
        """The generated tiny models' sha256, hashed once per run (files and fingerprint)."""
        from .smoke import file_hashes
        return self._memo("smoke", lambda: file_hashes(self.deployment))

    def files(self) -> dict:
        """Relative path -> sha256 of every deployed file; model artifacts by pinned hash."""
        def compute():
            files, pins = {}, self.artifact_pins()
            if self.has_source:
                source = self.deployment.source
                for path in source_files(source, set(pins)):
                    full = source / path
                    files[f"{source.name}/{path}"] = sha256_file(full) if full.is_file() else None
            files.update(pins)
            if self.smoke:
                base = self.deployment.smoke.relative_to(self.deployment.root).as_posix()
                files.update({f"{base}/{k}": v for k, v in self.smoke_hashes().items()})
            return dict(sorted(files.items()))
        return self._memo("files", compute)

    def drifted(self) -> list[str]:
        """Deployed files that differ from provenance.json (none when there is none yet)."""
        recorded = (read_manifest(self.deployment) or {}).get("files")
        if not recorded:
            return []
        current = self.files()
        return sorted(p for p in set(recorded) | set(current) if recorded.get(p) != current.get(p))

    def input_hashes(self) -> dict:
        """The recipe's and the patches' sha256, as provenance records them."""
        return self._memo("inputs", lambda: input_hashes(self.recipe, self.profile))

    def patch_hashes(self) -> dict:
        return self.input_hashes()["patches"]

    def fingerprint(self) -> dict:
        """Everything a verify result depends on; any change makes the last verify stale."""
        from .env import env_record
        record = env_record(self.deployment, self.profile) or {}
        return {"recipe": self.input_hashes()["recipe_sha256"], "patches": self.patch_hashes(),
                "lock": self.lock_sha256(), "env": record.get("stamp"),
                "models": self.smoke_hashes() if self.smoke else self.artifact_pins()}

    def manifest(self) -> dict:
        from .env import env_record
        record = env_record(self.deployment, self.profile) or {}
        inputs = deployed_inputs(self.recipe, self.deployment, self.profile,
                                 tree=self.tree() if self.has_source else None,
                                 lock=self.lock_content_hash(), hashes=self.input_hashes())
        return {
            "schema": MANIFEST_SCHEMA,
            "tool": {"name": "sdrecipe", "version": __version__},
            "recipe": {"name": self.recipe.name, "sha256": inputs["recipe_sha256"]},
            "profile": self.profile, "smoke": self.smoke,
            "upstream": {"url": self.recipe.upstream.url, "commit": inputs["upstream_commit"]},
            "patches": inputs["patches"],
            "lock": {"content_hash": inputs["lock_hash"], "sha256": self.lock_sha256()},
            "env": {"backend": record.get("backend")},
            "files": self.files(),
            "verified": self.verified_fingerprint() == self.fingerprint(),
            "volatile": {"time": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
                         "host": platform.node(), "user": os.environ.get("USER", ""),
                         "deployment": str(self.deployment.root)},
        }


# --- stage status (read-only) ----------------------------------------------------------------

def _source_status(t: Target) -> StageStatus:
    import git
    if not t.has_source:
        from .source import configured_checkout
        origin = t.opts.get("source") or configured_checkout() or ", ".join(t.recipe.upstream.urls)
        return StageStatus("source", "missing", "no checkout",
                           f"get commit {t.recipe.upstream.commit[:12]} from {origin}")
    try:
        head = git.Repo(t.deployment.source).head.commit.hexsha
    except (git.GitError, ValueError) as exc:
        return StageStatus("source", "stale", f"not a usable git checkout ({exc})",
                           "stop: move the folder aside")
    if head != t.recipe.upstream.commit:
        return StageStatus("source", "stale", f"checkout at {head[:12]}, not the pinned "
                           f"{t.recipe.upstream.commit[:12]}", "stop: move the folder aside")
    return StageStatus("source", "done", f"{t.deployment.source} at the pinned commit "
                       f"{head[:12]}", "nothing")


def _artifacts_status(t: Target) -> StageStatus:
    if t.smoke:
        return StageStatus("artifacts", "skipped", "smoke mode downloads nothing "
                           "(tiny models are generated)", "nothing")
    from .artifacts import artifact_status
    files = artifact_status(t.recipe, t.deployment, t.profile)
    bad = [f for f in files if f.state != "done"]
    if not bad:
        return StageStatus("artifacts", "done", f"{len(files)} files placed and stamped", "nothing")
    word = "missing" if all(f.state == "missing" for f in bad) else "stale"
    listing = "; ".join(f"{f.file.place}: {f.reason}" for f in bad[:4])
    return StageStatus("artifacts", word, f"{len(bad)} of {len(files)} files: {listing}",
                       f"fetch and place {len(bad)} file(s)")


def _patches_status(t: Target) -> StageStatus:
    series = t.recipe.series(t.profile)
    actual = t.patch_hashes()
    for entry in series:
        if actual[entry.file] != entry.sha256:
            return StageStatus("patches", "stale", f"patch {entry.file} does not match its "
                               f"sha256 in {t.recipe.path.name} (modified patch)",
                               "stop: restore the patch, or re-pin it in the recipe "
                               "(sdrecipe lint names the sha256)")
    if not series:
        return StageStatus("patches", "done", f"the recipe has no patches for {t.profile}", "nothing")
    applied = t.state.get("patches") or {}
    changed = [e.file for e in series if applied and applied.get(e.file) != e.sha256]
    if not t.has_source:
        return StageStatus("patches", "missing", "no checkout yet", f"apply {len(series)} patches")
    tree = t.tree()
    if tree.drifted:
        return StageStatus("patches", "stale", f"edited by hand: {', '.join(tree.drifted)}",
                           "stop: save your edits, then `sdrecipe patch apply --force`")
    if tree.state == "pristine":
        return StageStatus("patches", "missing", "series not applied", f"apply {len(series)} patches")
    if tree.state != "applied":
        detail = tree.conflict or ", ".join(f"{p.entry.file} {p.state}" for p in tree.patches)
        return StageStatus("patches", "stale", f"series {tree.state}: {detail}", "complete the series")
    if changed:
        return StageStatus("patches", "stale", f"the recipe's series changed since it was applied: "
                           f"{', '.join(changed)}", "re-apply the series")
    edited = [p for p in t.drifted()
              if p.startswith(f"{t.deployment.source.name}/") and p not in t.model_paths()]
    if edited:
        return StageStatus("patches", "stale", f"deployed files differ from provenance.json: "
                           f"{', '.join(edited[:5])}",
                           f"stop: save your edits (git -C {t.deployment.source} diff), restore with "
                           "`git checkout -- <file>`, or deploy into a new --deploy-dir")
    return StageStatus("patches", "done", f"{len(series)} patches applied", "nothing")


def _env_status(t: Target) -> StageStatus:
    from .env import env_python, env_record
    record = env_record(t.deployment, t.profile)
    if record is None or not env_python(t.deployment, t.profile).exists():
        return StageStatus("env", "missing", "no environment built", f"build the {t.profile} environment")
    built_with = t.state.get("lock_sha256")
    if built_with and built_with != t.lock_sha256():
        return StageStatus("env", "stale", "the lock changed since the environment was built",
                           "rebuild the environment from the lock")
    return StageStatus("env", "done", f"{record.get('backend')} environment at {record.get('prefix')}",
                       "nothing")


def _preseed_status(t: Target) -> StageStatus:
    if t.smoke:
        from .smoke import smoke_state
        word, reason = smoke_state(t.deployment, t.profile)
        return StageStatus("preseed", word, reason,
                           "nothing" if word == "done" else "generate the tiny models in the env")
    from .artifacts import artifact_status
    seeded = [f for f in artifact_status(t.recipe, t.deployment, t.profile)
              if f.file.root == "torch_home"]
    bad = [f for f in seeded if f.state != "done"]
    if bad:
        return StageStatus("preseed", bad[0].state, f"$TORCH_HOME lacks {bad[0].file.place}: "
                           f"{bad[0].reason}", "placed by the artifacts stage")
    return StageStatus("preseed", "done", f"{len(seeded)} file(s) in $TORCH_HOME", "nothing")


def _verify_status(t: Target) -> StageStatus:
    from .report import read
    from .verify import report_dir
    out = report_dir(t.deployment, t.profile, t.smoke)
    data = read(out)
    if data is None:
        return StageStatus("verify", "missing", "no report yet", "run the verification sample")
    if not data.get("ok"):
        failed = ", ".join(c["name"] for c in data.get("checks", []) if not c.get("ok"))
        return StageStatus("verify", "stale", f"last verify failed ({failed}); {out / 'report.html'}",
                           "run the verification sample again")
    if t.verified_fingerprint() != t.fingerprint():
        return StageStatus("verify", "stale", "the deployment changed since it was verified",
                           "run the verification sample again")
    return StageStatus("verify", "done", f"passed: {out / 'report.html'}", "nothing")


STATUS = {"source": _source_status, "artifacts": _artifacts_status, "patches": _patches_status,
          "env": _env_status, "preseed": _preseed_status, "verify": _verify_status}


def stage_status(t: Target, stage: str) -> StageStatus:
    try:
        return STATUS[stage](t)
    except SdrecipeError as exc:
        return StageStatus(stage, "stale", str(exc), "stop: see the reason")


def status(recipe, deployment, profile: str, smoke: bool) -> list[StageStatus]:
    target = Target(recipe, deployment, profile, smoke)
    found = [stage_status(target, stage) for stage in STAGES]
    pending = [s.stage for s in found[:-1] if s.state not in ("done", "skipped")]
    if pending and found[-1].state == "done":  # verified, but what it verified is not whole now
        found[-1] = StageStatus("verify", "stale", f"passed, but {', '.join(pending)} must be "
                                "redone first", "verify again if that changes the deployment")
    return found


# --- running the stages ---------------------------------------------------------------------

def _run_source(t: Target) -> str:
    from .source import configured_checkout, ensure_source
    local = t.opts.get("source") or configured_checkout()
    ensure_source(t.recipe, t.deployment.source, t.profile, local=local)
    if local:
        return f"copied the checkout {local}"
    return f"cloned commit {t.recipe.upstream.commit[:12]}"


def _run_artifacts(t: Target) -> str:
    from .artifacts import fetch_artifacts
    placed = fetch_artifacts(t.recipe, t.deployment, t.profile)
    return f"{len(placed)} files in place"


def _run_patches(t: Target) -> str:
    from .patches import apply_series
    result = apply_series(t.deployment.source, t.recipe, t.profile)
    t.state["patches"] = {e.file: e.sha256 for e in t.recipe.series(t.profile)}
    return result


def _run_env(t: Target) -> str:
    from .env import build_and_check
    # a rebuild (the lock changed) keeps the backend chosen the first time: --python, --prefix
    for option in ("python", "prefix"):
        if t.opts.get(option):
            t.state[f"env_{option}"] = str(t.opts[option])
    # Smoke mode fetched no HardNet for kornia, so the import check would fail on it; the
    # smoke sample imports everything txt2img needs anyway (with a HardNet stand-in).
    built, check = build_and_check(t.recipe, t.deployment, t.profile,
                                   prefix=t.state.get("env_prefix"),
                                   python=t.state.get("env_python"), check=not t.smoke)
    t.state["lock_sha256"] = t.lock_sha256()
    if check is not None and not check.ok:
        raise SdrecipeError(f"the {t.profile} environment was built but its import check "
                            f"failed for: {check.failed}; run: sdrecipe doctor --profile {t.profile}")
    return f"{'built' if built.rebuilt else 'up to date'}: {built.prefix}"


def _run_preseed(t: Target) -> str:
    if t.smoke:
        from .smoke import ensure_smoke_models
        return ensure_smoke_models(t.deployment, t.profile)
    return "nothing beyond the artifacts stage"


def _run_verify(t: Target) -> str:
    from .verify import print_summary, report_dir, verify
    out = report_dir(t.deployment, t.profile, t.smoke)
    data = verify(t.recipe, t.deployment, t.profile, smoke=t.smoke, out=out)
    print_summary(data, out)
    if not data["ok"]:
        raise VerifyFailed(f"verification failed; report: {out / 'report.html'}")
    t.state.setdefault("verified", {})[t.mode] = t.fingerprint()
    return "passed"


RUN = {"source": _run_source, "artifacts": _run_artifacts, "patches": _run_patches,
       "env": _run_env, "preseed": _run_preseed, "verify": _run_verify}


def deploy(recipe, deployment, profile: str, smoke: bool = False, opts: dict | None = None,
           echo=print) -> dict:
    """Bring every stage to done, in order; returns {stage: (what happened, seconds)}.

    A stage whose status says "stop" (someone's edits, a modified patch) raises
    instead of being overwritten. provenance.json is rewritten only when it changed."""
    from filelock import FileLock
    deployment.state.mkdir(parents=True, exist_ok=True)
    done = {}
    with FileLock(str(deployment.state / "deploy.lock")):
        t = Target(recipe, deployment, profile, smoke, opts)
        for stage in STAGES:
            start = time.monotonic()
            found = stage_status(t, stage)
            if found.state in ("done", "skipped"):
                what = f"{found.state}: {found.reason}"
            elif found.blocks:
                raise SdrecipeError(f"{stage}: {found.state}: {found.reason}; "
                                    f"{found.action.removeprefix('stop: ')}")
            else:
                echo(f"{stage:<10} {found.state}: {found.reason} -> running")
                try:
                    what = RUN[stage](t)
                finally:
                    t.changed()
                    t.save_state()
            done[stage] = (what, round(time.monotonic() - start, 2))
            echo(f"{stage:<10} {what} ({done[stage][1]:.2f} s)")
        old = read_manifest(deployment)
        ran = any(not what.startswith(("done:", "skipped:")) for what, _ in done.values())
        if ran or old is None or old.get("files") != t.files():
            data = t.manifest()
            if old is None or stable_part(old) != stable_part(data):
                _write_json(deployment.provenance, data)
        t.save_state()
    return done


# --- commands -----------------------------------------------------------------------------

def deploy_command(ctx) -> int:
    args = ctx.args
    profile = ctx.profile()
    start = time.monotonic()
    print(f"deploy: profile {profile}{' (smoke)' if args.smoke else ''} into {ctx.deployment.root}")
    opts = {"python": args.python, "prefix": args.prefix, "source": args.source}
    deploy(ctx.recipe, ctx.deployment, profile, smoke=args.smoke, opts=opts)
    print(f"deploy: complete in {time.monotonic() - start:.1f} s; provenance: "
          f"{ctx.deployment.provenance}")
    return 0


def status_command(ctx) -> int:
    args = ctx.args
    profile = ctx.profile()
    stages = status(ctx.recipe, ctx.deployment, profile, args.smoke)
    pending = [s.stage for s in stages if s.state not in ("done", "skipped")]
    if args.format == "json":
        json.dump({"deployment": str(ctx.deployment.root), "profile": profile, "smoke": args.smoke,
                   "stages": [asdict(s) for s in stages]}, sys.stdout, indent=2)
        print()
    else:
        print(f"deployment {ctx.deployment.root} (profile {profile}{', smoke' if args.smoke else ''})")
        for s in stages:
            print(f"  {s.stage:<10} {s.state:<8} {s.reason}")
            if s.action != "nothing":
                print(f"  {'':<10} {'':<8} re-run: {s.action}")
        blocked = [s.stage for s in stages if s.blocks]
        print("a re-run of `sdrecipe deploy` would do nothing" if not pending else
              f"a re-run of `sdrecipe deploy` would stop at {blocked[0]} (see above)" if blocked else
              f"a re-run of `sdrecipe deploy` would run: {', '.join(pending)}")
    return 0 if not pending else 1
