"""The recipe's `artifacts:` section: model files, where they come from, where they go.

Each entry names a source (a Hugging Face repo at a commit, or plain URLs), a
destination folder under a deployment root (`models/...`: the upstream
checkout's models folder, read by the patched upstream through $SD_MODELS_DIR;
`torch_home/...`: the deployment's $TORCH_HOME), the profiles it serves and
whether it is optional. Each file may carry its size and sha256; a file without
them is trusted on first fetch and its hash recorded in `lock/artifacts.lock`,
which every later fetch enforces (and `sdrecipe lint` warns until it exists).

`fetch_artifacts` downloads what the cache lacks (through `transfer`, the one
downloader), then places each file from the cache and stamps it;
`artifact_status` reads the stamps, so a deployment's state costs one `lstat`
per file.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml
from filelock import FileLock

from .config import load_config
from .errors import SdrecipeError
from .files import atomic_write_text, sha256_file
from .lint import check
from .placement import (STAMP_FIELDS, Cache, ContentMismatch, contained, is_safe_relative,
                        place, read_stamp, stamp_differs, write_stamp)
from .schema import SHA1_RE, SHA256_RE, Node, load_yaml

ROOTS = ("models", "torch_home")
LOCK_FILE = "lock/artifacts.lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact entry, flattened: where from, what bytes, where to."""

    artifact: str
    repo: str | None  # Hugging Face repo, or None for a plain URL
    revision: str | None
    path: str | None  # path inside the repo
    url: str | None
    gated: bool
    size: int | None
    sha256: str | None
    root: str  # one of ROOTS
    dest: str  # relative to the root
    profiles: tuple[str, ...] | None
    optional: bool
    file: Path
    line: int | None

    @property
    def key(self) -> str:
        """Names the source bytes; the key of `lock/artifacts.lock`."""
        return f"hf://{self.repo}@{self.revision}/{self.path}" if self.repo else self.url

    @property
    def place(self) -> str:
        return f"{self.root}/{self.dest}"

    @property
    def revision_pinned(self) -> bool:
        return self.repo is None or bool(SHA1_RE.match(self.revision))

    def applies_to(self, profile: str) -> bool:
        return self.profiles is None or profile in self.profiles

    def urls(self, endpoints) -> list[str]:
        if self.repo is None:
            return [self.url]
        from .transfer import hf_resolve_urls
        return list(hf_resolve_urls(endpoints, self.repo, self.revision, self.path))

    def target(self, deployment, create=False) -> Path:
        """Where the file goes; refuses escapes; `create` makes the folders on the way."""
        return contained(root_dir(deployment, self.root), self.dest, create)

    def stamp(self, deployment) -> Path:
        return deployment.state / "stamps" / self.root / (self.dest + ".json")


def root_dir(deployment, root: str) -> Path:
    return {"models": deployment.models, "torch_home": deployment.torch_home}[root]


# --- the recipe section ---------------------------------------------------------------

def parse_section(node: Node, recipe) -> tuple[ArtifactFile, ...]:
    """Parse `artifacts:` (wired in by project.load_recipe); errors name file:line:field.

    The section is a list of entries:

        - name: sd-v1-4               # unique; `fetch --only NAME` selects by it
          description: ...            # optional, for humans
          hf: {repo: owner/name, revision: <40-hex commit>, gated: true}
                                      # a Hugging Face source; omit it for plain URLs
          into: models/ldm/stable-diffusion-v1
                                      # `models/...` or `torch_home/...` of the deployment
          profiles: [cpu]             # optional: only these profiles (default: all)
          optional: true              # optional: only with --with-optional (default: false)
          files:
            - path: sd-v1-4.ckpt      # in the repo (with `hf`), or `url: https://...`
              as: model.ckpt          # optional: name under `into` (default: `path`, or
                                      # the URL's last part)
              size: 4265380512        # optional: bytes
              sha256: fe4e...         # optional: else trusted on first use (lock/artifacts.lock)

    Paths in `into`, `path` and `as` are relative and never leave their folder.
    A `revision` that is not a commit sha loads, but `sdrecipe lint` warns.
    """
    files: list[ArtifactFile] = []
    names: set = set()
    places: dict[str, int | None] = {}
    for item in node.items():
        item.keys(required=("name", "into", "files"),
                  optional=("hf", "profiles", "optional", "description"))
        name = item.text("name", _NAME_RE, "a name of letters, digits, '.', '_' and '-'")
        if name in names:
            raise item.get("name").error(f"artifact {name!r} is listed twice")
        names.add(name)
        repo = revision = None
        gated = False
        if item.has("hf"):
            hf = item.get("hf").keys(required=("repo", "revision"), optional=("gated",))
            repo = hf.text("repo", _REPO_RE, "a Hugging Face repo id like owner/name")
            revision = hf.text("revision")
            gated = hf.opt("gated", bool, False)
        root, into = _parse_into(item.get("into", str))
        profiles = item.string_list("profiles", tuple(recipe.profiles))
        optional = item.opt("optional", bool, False)
        for entry in item.get("files", list).items():
            if repo:
                entry.keys(required=("path",), optional=("as", "size", "sha256"))
                path, url = _relative(entry.get("path", str)), None
                default_name = path
            else:
                entry.keys(required=("url",), optional=("as", "size", "sha256"))
                path, url = None, _url(entry.get("url", str))
                default_name = posixpath.basename(urlparse(url).path)
            name_as = _relative(entry.get("as", str)) if entry.has("as") else default_name
            dest = posixpath.join(into, name_as) if into else name_as
            if f"{root}/{dest}" in places:
                raise entry.error(f"{root}/{dest} is already the destination of the file "
                                  f"at line {places[f'{root}/{dest}']}")
            places[f"{root}/{dest}"] = entry.line
            size = entry.opt("size", int)
            if size is not None and size < 0:
                raise entry.get("size").error("must be a byte count >= 0")
            sha256 = (entry.text("sha256", SHA256_RE, "a 64-hex sha256")
                      if entry.has("sha256") else None)
            files.append(ArtifactFile(
                artifact=name, repo=repo, revision=revision, path=path, url=url, gated=gated,
                size=size, sha256=sha256, root=root, dest=dest, profiles=profiles,
                optional=optional, file=Path(node.file), line=entry.line))
    return tuple(files)


def _parse_into(node: Node) -> tuple[str, str]:
    root, _, rest = node.value.partition("/")
    if root not in ROOTS:
        raise node.error(f"must start with a deployment root ({', '.join(ROOTS)}), "
                         f"e.g. models/ldm/stable-diffusion-v1")
    rest = rest.rstrip("/")
    if rest and not is_safe_relative(rest):
        raise node.error("must be a relative path inside its root (no '..', '.', '//')")
    return root, rest


def _relative(node: Node) -> str:
    if not is_safe_relative(node.value):
        raise node.error(f"{node.value!r} must be a relative path that stays inside its "
                         "folder (no '..', no leading '/', no empty parts)")
    return node.value


def _url(node: Node) -> str:
    parsed = urlparse(node.value)
    if parsed.scheme not in ("https", "http") or not parsed.netloc:
        raise node.error(f"expected an https:// URL, got {node.value!r}")
    if not is_safe_relative(posixpath.basename(parsed.path)):
        raise node.error("the URL must end in a file name (or give `as:`)")
    return node.value


def artifact_files(recipe) -> tuple[ArtifactFile, ...]:
    return recipe.sections.get("artifacts", ())


def select(recipe, profile: str, with_optional=False, only=None, roots=ROOTS) -> list[ArtifactFile]:
    """The files a profile needs; `only` (artifact names) narrows, and may name optional ones;
    `roots` narrows to the models folder or $TORCH_HOME (deploy's artifacts and preseed)."""
    recipe.profile(profile)
    files = [f for f in artifact_files(recipe) if f.applies_to(profile) and f.root in roots]
    if only:
        known = {f.artifact for f in artifact_files(recipe)}
        unknown = sorted(set(only) - known)
        if unknown:
            raise SdrecipeError(f"unknown artifact(s) {', '.join(unknown)} "
                                f"(the recipe {recipe.path} has: {', '.join(sorted(known))})")
        return [f for f in files if f.artifact in only]
    return [f for f in files if with_optional or not f.optional]


# --- lock/artifacts.lock: trust on first use ---------------------------------------------

class ArtifactLock:
    """Sizes and sha256s learnt on a first fetch, enforced on every later one."""

    HEADER = ("# Written by `sdrecipe fetch`: size and sha256 of artifact files whose recipe\n"
              "# entry gives none (trust on first use). Later fetches enforce them. Commit it.\n"
              "# If an upstream file legitimately changed, delete its entry and fetch again.\n")

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.changed = False
        if path.is_file():
            root = load_yaml(path).keys(required=("version", "files"))
            for key, entry in root.get("files", dict).entries():
                entry.keys(required=("size", "sha256"))
                self.entries[key] = {"size": entry.get("size", int).value,
                                     "sha256": entry.text("sha256", SHA256_RE, "a 64-hex sha256")}

    @classmethod
    def for_recipe(cls, recipe) -> "ArtifactLock":
        return cls(recipe.root / LOCK_FILE)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def record(self, key: str, size: int, sha256: str) -> None:
        if self.entries.get(key) != {"size": size, "sha256": sha256}:
            self.entries[key] = {"size": size, "sha256": sha256}
            self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = yaml.safe_dump({"version": 1, "files": dict(sorted(self.entries.items()))},
                              sort_keys=False, width=200)
        atomic_write_text(self.path, self.HEADER + body)
        self.changed = False


def expected(file: ArtifactFile, lock: ArtifactLock, extra_pins=None):
    """(sha256, size, where the pin came from): the recipe, then the lock, then `extra_pins`."""
    if file.sha256:
        return file.sha256, file.size, "recipe"
    for origin, pins in (("lock", lock.entries), ("bundle", extra_pins or {})):
        if file.key in pins:
            return pins[file.key]["sha256"], pins[file.key]["size"], origin
    return None, file.size, None


# --- status ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ArtifactStatus:
    file: ArtifactFile
    target: Path
    state: str  # "done", "stale" or "missing"
    reason: str


def _status(file, deployment, sha256) -> ArtifactStatus:
    target = file.target(deployment)
    if not os.path.lexists(target):
        return ArtifactStatus(file, target, "missing", "not placed")
    stamp = read_stamp(file.stamp(deployment))
    if stamp is None:
        return ArtifactStatus(file, target, "stale", "no stamp: not placed by sdrecipe fetch")
    if sha256 is None:
        return ArtifactStatus(file, target, "stale", f"no recorded sha256 in {LOCK_FILE}")
    if stamp.get("sha256") != sha256:
        return ArtifactStatus(file, target, "stale", f"placed bytes are {stamp.get('sha256')}, "
                                                     f"expected {sha256}")
    differs = stamp_differs(stamp, target)
    if differs:
        return ArtifactStatus(file, target, "stale", differs)
    return ArtifactStatus(file, target, "done", f"placed by {stamp.get('method')}")


def artifact_status(recipe, deployment, profile: str, with_optional=False,
                    only=None, roots=ROOTS) -> list[ArtifactStatus]:
    """Each file's state from its stamp (no hashing): done, stale or missing, with why."""
    lock = ArtifactLock.for_recipe(recipe)
    return [_status(f, deployment, expected(f, lock)[0])
            for f in select(recipe, profile, with_optional, only, roots)]


# --- before use: the bytes a run will unpickle ------------------------------------------

@dataclass(frozen=True)
class Proven:
    target: Path
    sha256: str
    hashed: bool  # False: its stamp, ctime included, is unchanged since verified placement


def prove_pinned(target) -> list[Proven]:
    """Every file of the profile that a run loads (checkpoint, CLIP and safety-checker
    weights, HardNet: torch.load unpickles them) proven to be its pinned bytes, before
    anything loads it. A file whose stamp still matches in size, mtime, ctime, inode and
    device is the one hashed at placement (any write since moves ctime, which no user call
    can set back); any other is hashed now. Raises ContentMismatch naming the file."""
    recipe, deployment, profile = target.recipe, target.deployment, target.profile
    lock = ArtifactLock.for_recipe(recipe)
    proven = []
    for file in select(recipe, profile):
        placed = file.target(deployment)
        stamp = read_stamp(file.stamp(deployment))
        # unpinned here (a lock not committed where this recipe is): the hash its placement
        # was checked against, recorded in its stamp
        pin = expected(file, lock)[0] or (stamp or {}).get("sha256")
        if pin is None or not placed.is_file():
            why = "is not placed" if pin else f"has no pinned sha256 (recipe or {LOCK_FILE})"
            raise SdrecipeError(f"{placed} {why}: run {target.command('fetch')}")
        if stamp and stamp.get("sha256") == pin and not stamp_differs(stamp, placed, STAMP_FIELDS):
            proven.append(Proven(placed, pin, hashed=False))
            continue
        found = sha256_file(placed)
        if found != pin:
            raise ContentMismatch(f"{placed}: expected sha256 {pin}, found {found}: changed "
                                  f"since it was placed; nothing loaded it. Run "
                                  f"{target.command('fetch', '--verify')} to repair it")
        write_stamp(file.stamp(deployment), placed, pin, (stamp or {}).get("method", "adopted"),
                    file.key)
        proven.append(Proven(placed, pin, hashed=True))
    return proven


# --- fetch -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Placed:
    file: ArtifactFile
    target: Path
    action: str  # "in place", "verified", "adopted", "placed" or "repaired"
    method: str | None  # hardlink, reflink or copy, when placed this run


def cache_dir(config=None) -> Path:
    return Path((config or load_config()).get("cache_dir")).expanduser()


def open_cache(config=None) -> Cache:
    """The site's content cache, with its quarantine cap."""
    config = config or load_config()
    return Cache(cache_dir(config), quarantine_keep=config.get("quarantine_keep"))


def fetch_artifacts(recipe, deployment, profile: str, verify=False, with_optional=False,
                    only=None, extra_pins=None, offline=False, roots=ROOTS,
                    config=None) -> list[Placed]:
    """Make the profile's files present and correct in the deployment; report what was done.

    Files whose stamp matches are trusted (near-instant re-runs); `verify` rehashes
    everything placed and repairs what differs. A file already there without a valid
    stamp (copied by hand) is hashed once and adopted if its bytes are right, which
    spares a 4 GB download. `offline` (restore from a bundle) never downloads: what
    the cache lacks is an error. `extra_pins` (key -> size, sha256) are hashes
    vouched for by a bundle's manifest.
    """
    config = config or load_config()
    files = select(recipe, profile, with_optional, only, roots)
    lock = ArtifactLock.for_recipe(recipe)
    cache = open_cache(config)
    deployment.state.mkdir(parents=True, exist_ok=True)
    done: dict[ArtifactFile, Placed] = {}
    todo: list[ArtifactFile] = []
    with FileLock(str(deployment.state / "fetch.lock")):
        for file in files:
            sha256 = expected(file, lock, extra_pins)[0]
            status = _status(file, deployment, sha256)
            if status.state == "done" and not verify:
                done[file] = Placed(file, status.target, "in place", None)
            elif (verify or status.state == "stale") and status.state != "missing" \
                    and _rehash_ok(file, deployment, sha256, cache):
                action = "verified" if status.state == "done" else "adopted"
                done[file] = Placed(file, status.target, action, None)
            else:
                todo.append(file)
        if todo:
            with cache.lock():  # held while placing too: `cache gc` never takes an entry
                cache.register(deployment.root)  # between its fill and its stamp here
                hashes = fill_cache(todo, lock, cache, verify, offline, extra_pins, config)
                for file in todo:
                    target = file.target(deployment, create=True)
                    existed = os.path.lexists(target)
                    method = cache.place(hashes[file], target)
                    write_stamp(file.stamp(deployment), target, hashes[file], method, file.key)
                    done[file] = Placed(file, target, "repaired" if existed else "placed", method)
            _hide_from_git(deployment, todo)
        lock.save()
    return [done[f] for f in files]


def _hide_from_git(deployment, files) -> None:
    """List placed model files in the checkout's .git/info/exclude: `git status` stays
    clean and nobody commits a 4 GB checkpoint by accident."""
    exclude = deployment.source / ".git" / "info" / "exclude"
    if not exclude.parent.parent.is_dir():
        return
    have = exclude.read_text().splitlines() if exclude.is_file() else []
    source = deployment.source.resolve()
    new = []
    for file in files:
        target = file.target(deployment).resolve()
        if file.root == "models" and target.is_relative_to(source):
            pattern = "/" + target.relative_to(source).as_posix()
            if pattern not in have and pattern not in new:
                new.append(pattern)
    if new:
        exclude.parent.mkdir(exist_ok=True)
        lines = ["# model files placed by sdrecipe fetch", *new]
        with open(exclude, "a") as handle:
            handle.write("\n".join(lines) + "\n")


def _rehash_ok(file, deployment, sha256, cache) -> bool:
    """Rehash a placed file: stamp (and cache) it if right; if wrong, drop a shared cache copy."""
    target = file.target(deployment)
    if sha256 is None or os.path.islink(target) or not target.is_file():
        return False
    found = sha256_file(target)
    if found == sha256:
        method = (read_stamp(file.stamp(deployment)) or {}).get("method", "adopted")
        with cache.lock():
            cache.register(deployment.root)
            if not cache.verified(sha256):  # keep the bytes for other deployments and bundles
                incoming = cache.incoming(f"adopt:{target}")
                incoming.parent.mkdir(parents=True, exist_ok=True)
                place(target, incoming)
                cache.adopt(incoming, sha256, found=found, origin=str(target))
        write_stamp(file.stamp(deployment), target, sha256, method, file.key)
        return True
    if cache.has(sha256) and os.path.samefile(target, cache.path(sha256)):
        cache.quarantine(sha256)  # a hardlink shares the damage
    return False


def fill_cache(files, lock, cache, verify, offline, extra_pins, config) -> dict:
    """sha256 of each file, downloading into the cache what it lacks (trust on first use)."""
    hashes: dict[ArtifactFile, str] = {}
    wanted: dict[Path, tuple] = {}  # download destination -> (files, sha256, size)
    for file in files:
        sha256, size, _ = expected(file, lock, extra_pins)
        if sha256 and cache.verified(sha256, rehash=verify):  # else quarantined, or absent
            hashes[file] = sha256
            continue
        dest = cache.path(sha256) if sha256 else cache.incoming(file.key)
        wanted.setdefault(dest, ([], sha256, size))[0].append(file)
    if not wanted:
        return hashes
    if offline:
        missing = ", ".join(f.place for group, _, _ in wanted.values() for f in group)
        raise SdrecipeError(f"not in the bundle or the cache: {missing}. Make the bundle on a "
                            "node with network after `sdrecipe fetch` of this profile "
                            "(or pass --with-optional to bundle create)")
    from .transfer import TransferError  # the downloader (and requests) only when needed
    jobs = [(dest, group, sha256, size) for dest, (group, sha256, size) in wanted.items()]
    try:
        results = _download(jobs, cache, config)
    except TransferError as exc:
        _adopt(jobs, exc.results, cache, lock, hashes)  # keep what did arrive
        lock.save()
        hint = _lock_hint(exc, jobs, lock, extra_pins)
        if hint:
            raise SdrecipeError(f"{exc}\n{hint}") from exc
        raise
    finally:
        cache.trim_quarantine()  # the downloader quarantines every bad copy it gets
    _adopt(jobs, results, cache, lock, hashes)
    return hashes


def _adopt(jobs, results, cache, lock, hashes) -> None:
    """Move arrived files into the store by hash; record first-use hashes in the lock."""
    arrived = {result.dest: result for result in results}
    for dest, group, sha256, _ in jobs:
        result = arrived.get(dest)
        if result is None:
            continue
        if sha256 is None:  # named by the hash the downloader computed while writing it
            cache.adopt(dest, result.sha256, found=result.sha256)
            for file in group:
                lock.record(file.key, result.size, result.sha256)
        else:
            cache.seal(sha256)
        for file in group:
            hashes[file] = result.sha256


def _download(jobs, cache, config):
    """Run the one downloader over the jobs; results in job order."""
    from .transfer import Download, Transfer, endpoints_from
    endpoints = endpoints_from(config)
    downloads = [Download(urls=group[0].urls(endpoints), dest=dest, sha256=sha256, size=size,
                          gated=group[0].gated, label=group[0].place)
                 for dest, group, sha256, size in jobs]
    return Transfer.from_config(config, quarantine_dir=cache.root / "quarantine").fetch(downloads)


def _lock_hint(exc, jobs, lock, extra_pins) -> str | None:
    """Name the lock when a trust-on-first-use hash is what a download failed against."""
    from .transfer import IntegrityError
    mismatched = {f.download.label for f in exc.failures if isinstance(f, IntegrityError)}
    from_lock = [group[0].place for _, group, _, _ in jobs
                 if group[0].place in mismatched
                 and expected(group[0], lock, extra_pins)[2] == "lock"]
    if not from_lock:
        return None
    return (f"(the expected hashes of {', '.join(from_lock)} come from {lock.path}, recorded "
            "on first fetch; if upstream legitimately changed a file, delete its entry and "
            "fetch again)")


# --- garbage collection ------------------------------------------------------------------

def collect_garbage(config, dry_run: bool = False) -> list[tuple[Path, int, str]]:
    """`sdrecipe cache gc`: the cache's entries no registered deployment's stamps name (and
    that no other hardlink keeps), and quarantined copies beyond `quarantine_keep`; removed
    unless `dry_run`. Deployments that no longer exist are forgotten."""
    cache = open_cache(config)
    if not cache.root.is_dir():
        return []
    with cache.lock():
        referenced: set = set()
        for root, registration in cache.deployments().items():
            stamps = root / ".sdrecipe" / "stamps"
            if not (root / ".sdrecipe").is_dir():
                if not dry_run:
                    registration.unlink(missing_ok=True)
                continue
            referenced |= {(read_stamp(path) or {}).get("sha256") for path in stamps.rglob("*.json")}
        garbage = cache.garbage(referenced)
        if not dry_run:
            for path, _, _ in garbage:
                cache.remove(path)
    return garbage


# --- lint ------------------------------------------------------------------------------

@check("artifacts-pinned", "every artifact file has a commit-sha revision and a known sha256")
def _check_pinned(ctx):
    lock = ArtifactLock.for_recipe(ctx.recipe)
    for file in artifact_files(ctx.recipe):
        if not file.revision_pinned:
            yield ctx.warning("artifacts-pinned", file.file, file.line,
                              f"{file.place}: revision {file.revision!r} of {file.repo} is not "
                              "a commit sha; pin the 40-hex commit the file was taken from")
        if not file.sha256 and lock.get(file.key) is None:
            yield ctx.warning("artifacts-pinned", file.file, file.line,
                              f"{file.place}: no sha256 in the recipe or {LOCK_FILE}; the first "
                              "`sdrecipe fetch` records it (trust on first use): commit the lock")


@check("artifacts-lock", "lock/artifacts.lock has no entries the recipe no longer names")
def _check_lock_entries(ctx):
    lock = ArtifactLock.for_recipe(ctx.recipe)
    named = {file.key for file in artifact_files(ctx.recipe)}
    for key in sorted(set(lock.entries) - named):
        yield ctx.warning("artifacts-lock", lock.path, None,
                          f"entry {key} matches no artifact of the recipe (a changed revision "
                          "or URL?); delete it")
