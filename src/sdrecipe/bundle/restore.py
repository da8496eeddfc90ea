"""Bringing a bundle onto a node with no network: its bytes into the caches, each hashed
on its way in, so the stages then find everything local and download nothing.

`open_for_deploy` serves `deploy --from-bundle` (the whole pipeline then runs offline);
`restore` serves `fetch --from-bundle` (source and model files only).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..artifacts import ArtifactLock, artifact_status, expected, fetch_artifacts, open_cache, select
from ..errors import SdrecipeError
from ..files import file_digest, sha256_file
from ..placement import ContentMismatch, place
from ..source import ensure_source
from .manifest import SOURCE_BUNDLE, artifact_path, open_bundle, read_manifest, verify_bundle


def open_for_deploy(target, bundle: Path) -> Path:
    """Check the bundle, then adopt what the target's profile needs into the caches (the
    model files unless smoke, every locked file of its environment); returns the bundle
    as a folder, for the stages to read the source and pins from."""
    folder, manifest = _open_checked(target.recipe, target.deployment, bundle)
    try:
        if not target.smoke:
            _check_pins(target.recipe, manifest, bundle, target.profile, False, None)
            _adopt_artifacts(folder, manifest, bundle, target.config)
        _adopt_packages(folder, manifest, bundle, target)
    except BaseException:
        discard_extraction(folder, bundle)
        raise
    return folder


def source_origin(folder: Path) -> dict:
    """`ensure_source`'s arguments for the bundle's source: its git bundle, or its copy of
    a checkout (made where git could not bundle the commit)."""
    source = read_manifest(folder)["upstream"]["source"]
    return {"bundle": folder / SOURCE_BUNDLE} if source == SOURCE_BUNDLE \
        else {"local": folder / source}


def pins(folder: Path) -> dict:
    """The model files' hashes the bundle vouches for (recipe key -> sha256, size)."""
    return read_manifest(folder)["artifacts"]


def restore(recipe, deployment, bundle: Path, profile: str, verify=False, with_optional=False,
            only=None):
    """Deploy source and artifacts from a bundle, with no network; returns the placements.

    A deployment already complete (checkout present, every stamp valid) does not
    need the bundle: a re-run then neither extracts nor rehashes gigabytes.
    """
    if not verify and (deployment.source / ".git").exists() and all(
            s.state == "done" for s in artifact_status(recipe, deployment, profile,
                                                       with_optional, only)):
        ensure_source(recipe, deployment.source, profile)  # checks the checkout, offline
        return fetch_artifacts(recipe, deployment, profile, with_optional=with_optional,
                               only=only, offline=True)
    folder, manifest = _open_checked(recipe, deployment, bundle)
    try:
        _check_pins(recipe, manifest, bundle, profile, with_optional, only)
        _adopt_artifacts(folder, manifest, bundle)
        ensure_source(recipe, deployment.source, profile, **source_origin(folder))
        placed = fetch_artifacts(recipe, deployment, profile, verify=verify,
                                 with_optional=with_optional, only=only,
                                 extra_pins=manifest["artifacts"], offline=True)
    finally:
        discard_extraction(folder, bundle)
    record_bundle_pins(recipe, placed, manifest["artifacts"])
    return placed


def discard_extraction(folder: Path, bundle: Path) -> None:
    """Remove a tar bundle's extraction once its files are in the caches and the deployment
    (a folder bundle is the user's: never touched)."""
    if Path(folder).resolve() != Path(bundle).resolve():
        shutil.rmtree(folder, ignore_errors=True)


def _open_checked(recipe, deployment, bundle: Path) -> tuple[Path, dict]:
    folder = open_bundle(Path(bundle), deployment.state / "bundle")
    try:
        manifest = verify_bundle(folder)
    except BaseException:
        discard_extraction(folder, bundle)
        raise
    commit = manifest["upstream"]["commit"]
    if commit != recipe.upstream.commit:  # the extraction stays: the message names its recipe
        raise SdrecipeError(
            f"{bundle} holds upstream commit {commit}, but {recipe.path} pins "
            f"{recipe.upstream.commit}; deploy the bundle's own recipe with "
            f"--recipe {folder / manifest['recipe']}")
    return folder, manifest


def _check_pins(recipe, manifest, bundle, profile, with_optional, only) -> None:
    """The bundle's hash of each file the recipe or lock pins must be that pin: a bundle
    vouches only for files this project has no hash of yet."""
    lock = ArtifactLock.for_recipe(recipe)
    for file in select(recipe, profile, with_optional, only):
        pin, _, origin = expected(file, lock)
        offered = manifest["artifacts"].get(file.key, {}).get("sha256")
        if pin and offered and offered != pin:
            where = recipe.path if origin == "recipe" else lock.path
            raise SdrecipeError(f"{bundle}: {file.place} is {offered} in the bundle, but {where} "
                                f"pins {pin}; refusing the bundle (nothing was placed or "
                                "cached): make it again from this recipe")


def _adopt_artifacts(folder, manifest, bundle, config=None) -> None:
    """Every artifact the cache lacks, hashed on its way in; one that does not hash to its
    name refuses the whole bundle before any of its files is cached."""
    cache = open_cache(config)
    staged = []
    with cache.lock():
        try:
            for sha in sorted({entry["sha256"] for entry in manifest["artifacts"].values()}):
                if cache.verified(sha):
                    continue
                rel = artifact_path(sha)
                incoming = cache.incoming("bundle:" + sha)
                incoming.parent.mkdir(parents=True, exist_ok=True)
                place(folder / rel, incoming)
                staged.append((incoming, sha, sha256_file(incoming)))
                if staged[-1][2] != sha:
                    raise ContentMismatch(
                        f"{bundle}: {rel} hashes to {staged[-1][2]}, not its name: a damaged or "
                        "crafted bundle; refusing it (nothing was placed or cached): copy the "
                        "bundle again, or make it again")
        except BaseException:
            for incoming, _, _ in staged:
                incoming.unlink(missing_ok=True)
            raise
        for incoming, sha, found in staged:
            cache.adopt(incoming, sha, found=found)


def _adopt_packages(folder: Path, manifest: dict, bundle: Path, target) -> None:
    """Each locked file of the profile's environment that the cache lacks, from the bundle
    into the cache folder the env build reads (`<cache>/pip/<sha256>/`, `conda-pkgs/`,
    `wheels/`); the lock on this node says what is needed and what each must hash to."""
    from ..environment.inputs import bundled_wheel_dir, pip_file_name
    from ..lock import load_lock
    lock = load_lock(target.recipe, target.profile, target.config)
    cache = Path(target.config.get("cache_dir")).expanduser()
    wanted = []  # (path in the bundle, cache path, digest kind, digest)
    for package in lock.pip + lock.venv:
        name = pip_file_name(package, lock)
        wanted.append((f"packages/pip/{package.sha256}/{name}",
                       cache / "pip" / package.sha256 / name, "sha256", package.sha256))
    for package in lock.conda:
        key, name = package.sha256 or package.md5, package.url.rsplit("/", 1)[-1]
        wanted.append((f"packages/conda/{key}/{name}", cache / "conda-pkgs" / key / name,
                       "sha256" if package.sha256 else "md5", key))
    for wheel in lock.platform_wheels:
        rel = f"packages/wheels/{wheel.filename}"
        vouched = wheel.sha256 or manifest["files"].get(rel, {}).get("sha256")
        wanted.append((rel, bundled_wheel_dir(target.config) / wheel.filename, "sha256",
                       vouched))
    missing = [rel for rel, dest, _, _ in wanted
               if not dest.is_file() and rel not in manifest["files"]]
    if missing:
        raise SdrecipeError(
            f"{bundle} lacks {len(missing)} file(s) of the {target.profile} environment "
            f"(e.g. {missing[0]}): it was made from another lock, or for other profiles; make "
            f"it again where the network is: sdrecipe bundle create --profile {target.profile}")
    for rel, dest, kind, digest in wanted:
        if not dest.is_file():
            _adopt_file(folder / rel, dest, kind, digest, bundle)


def _adopt_file(src: Path, dest: Path, kind: str, digest: str | None, bundle: Path) -> None:
    """`src` at `dest` only once its bytes hash to `digest`; nothing half-written stays."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    incoming = dest.with_name(f".{dest.name}.bundle-incoming")
    place(src, incoming)
    found = file_digest(incoming, kind)
    if digest is None or found != digest:
        incoming.unlink()
        raise ContentMismatch(f"{bundle}: {src.name} hashes to {kind} {found}, not the locked "
                              f"{digest}: a damaged or crafted bundle; refusing it: copy the "
                              "bundle again, or make it again")
    os.replace(incoming, dest)


def record_bundle_pins(recipe, placed, pins):
    """Hashes vouched for by the bundle become this project's trust-on-first-use record."""
    lock = ArtifactLock.for_recipe(recipe)
    for item in placed:
        if expected(item.file, lock)[0] is None and item.file.key in pins:
            pin = pins[item.file.key]
            lock.record(item.file.key, pin["size"], pin["sha256"])
    lock.save()
