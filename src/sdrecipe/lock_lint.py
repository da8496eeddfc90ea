"""Lint of each committed lock against itself (`lock-integrity`), beside `stale-lock`
(lock.py), which compares a lock with env/. A lock is edited by tools, but a hand edit
or a merge can leave it inconsistent in ways its content hash does not see: a version
changed without its URL, an entry without a hash, a machine's path, a package twice.
Each finding names the lock's file and line."""

from __future__ import annotations

from packaging.utils import (InvalidSdistFilename, InvalidWheelFilename, canonicalize_name,
                             parse_sdist_filename, parse_wheel_filename)
from packaging.version import InvalidVersion, Version

from .errors import RecipeError, SdrecipeError
from .lint import check
from .lock import TARGET_PLATFORM, VENV_CATEGORY, _file_name, load_env_spec, lock_path
from .schema import load_yaml

CHECK = "lock-integrity"
CATEGORIES = ("main", VENV_CATEGORY)


def _file_release(filename: str):
    """(name, version) that a wheel's or an sdist's file name states, or None."""
    try:
        if filename.endswith(".whl"):
            name, version = parse_wheel_filename(filename)[:2]
        else:
            name, version = parse_sdist_filename(filename)
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None
    return canonicalize_name(name), version


def _same_version(text, version: Version) -> bool:
    try:
        return Version(str(text)) == version
    except InvalidVersion:
        return False


def _entry_findings(entry, platforms, tofu: set) -> list[tuple[int | None, str]]:
    """(line, message) for what is wrong with one package entry."""
    found = []
    value = entry.value if isinstance(entry.value, dict) else {}
    name, manager, url = value.get("name"), value.get("manager"), str(value.get("url") or "")

    def at(key):
        return entry.get(key).line if entry.has(key) else entry.line

    if url.startswith("file:") or url.startswith("/"):
        found.append((at("url"), f"{name}: {url} is a path on one machine; a committed lock "
                                 "names files by URL (PyPI, a channel) or, for a platform "
                                 "wheel, by its file name alone"))
    hashes = value.get("hash") or {}
    filename = _file_name(url)
    if manager == "pip" and not hashes.get("sha256") and filename not in tofu:
        found.append((at("hash"), f"{name}: no sha256 (only the profile's platform_wheels may "
                                  "wait for their first sight)"))
    if manager == "conda" and not (hashes.get("sha256") or hashes.get("md5")):
        found.append((at("hash"), f"{name}: no md5 or sha256"))
    if manager == "pip" and url:
        release = _file_release(filename)
        if release is None:
            found.append((at("url"), f"{name}: {filename} is not a wheel or sdist file name"))
        elif release[0] != canonicalize_name(str(name)) or \
                not _same_version(value.get("version"), release[1]):
            found.append((at("version"), f"{name} {value.get('version')} does not match its "
                                         f"file {filename} ({release[0]} {release[1]}): "
                                         "relock instead of editing the lock"))
    if value.get("platform") not in platforms:
        found.append((at("platform"), f"{name}: platform {value.get('platform')} is not one of "
                                      f"the lock's platforms ({', '.join(platforms)})"))
    category = value.get("category", "main")
    if category not in CATEGORIES:
        found.append((at("category"), f"{name}: unknown category {category!r} (known: "
                                      f"{', '.join(CATEGORIES)})"))
    elif bool(value.get("optional")) != (category != "main"):
        found.append((at("optional"), f"{name}: category {category} must have optional: "
                                      f"{str(category != 'main').lower()}"))
    return found


def lock_findings(recipe, profile: str) -> list[tuple[str, int | None, str]]:
    """(file, line, message) of every inconsistency of the profile's lock with itself."""
    path = lock_path(recipe, profile)
    relative = str(path.relative_to(recipe.root))
    if not path.is_file():
        return []  # stale-lock reports it
    root = load_yaml(path)
    metadata = root.get("metadata", dict)
    platforms = list(metadata.value.get("platforms") or [])
    findings = []
    if platforms != [TARGET_PLATFORM]:
        findings.append((relative, metadata.get("platforms").line if metadata.has("platforms")
                         else metadata.line, f"platforms must be [{TARGET_PLATFORM}]"))
    for source in metadata.get("sources", list).items() if metadata.has("sources") else ():
        if str(source.value).startswith("/") or ":" in str(source.value):
            findings.append((relative, source.line, f"source {source.value} must be relative "
                                                    "to the lock's folder"))
    tofu = set(load_env_spec(recipe, profile).platform_wheels)
    seen: dict[tuple[str, str], int | None] = {}
    for entry in root.get("package", list).items():
        for line, message in _entry_findings(entry, platforms, tofu):
            findings.append((relative, line, message))
        value = entry.value if isinstance(entry.value, dict) else {}
        key = (str(value.get("manager")), canonicalize_name(str(value.get("name"))))
        if key in seen:
            findings.append((relative, entry.line, f"{key[1]} is locked twice ({key[0]}; first "
                                                   f"at line {seen[key]})"))
        else:
            seen[key] = entry.line
    return findings


@check(CHECK, "each lock agrees with itself: names and versions match the files, every "
              "entry hashed (platform wheels: after first sight), no machine paths, "
              "categories and platforms consistent, no package twice")
def check_lock_integrity(ctx):
    for name, profile in ctx.recipe.profiles.items():
        if not profile.env:
            continue
        try:
            found = lock_findings(ctx.recipe, name)
        except (RecipeError, SdrecipeError) as exc:
            yield ctx.error(CHECK, f"lock/{name}.conda-lock.yml", getattr(exc, "line", None),
                            str(exc))
            continue
        for file, line, message in found:
            yield ctx.error(CHECK, file, line, message)
