"""Lint checks for the patch series: what CI can prove without (and with) the upstream.

Every finding names the patch file and line. Without a checkout, the committed
`lock/upstream.lock` stands in for the upstream: each patch's `index` pre-image
ids must match it, tracked through the series (a file's pre-image in a later
patch is the post-image of the earlier patch that touched it). With `--source`,
every profile's series is applied and reversed for real in a scratch index.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path

from .errors import SdrecipeError
from .lint import check
from .patchfile import locate_apply_error, parse_patch
from .upstream_lock import load_upstream_lock

# --- what a DEP-3 header may say ----------------------------------------------------

DEP3_REQUIRED = ("Description", "Author", "Origin", "Forwarded", "Last-Update")
DEP3_ALIASES = {"Subject": "Description", "From": "Author"}
DEP3_KNOWN = set(DEP3_REQUIRED) | set(DEP3_ALIASES) | {
    "Bug", "Reviewed-by", "Acked-by", "Applied-Upstream", "Signed-off-by"}
ORIGIN_KEYWORDS = ("upstream", "backport", "vendor", "other")
_URL_RE = re.compile(r"^https?://[^\s/$.?#][^\s<>]*$")
_COMMIT_RE = re.compile(r"^(commit:)?[0-9a-f]{7,40}$")  # DEP-3 spells a bare commit id `commit:<id>`
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# `<your name>` or TODO are left-over template text; `<a@b.org>` and `<https://..>` are not.
# Only a field's first line is searched for `<...>`, so a long Description may say `<repo>/models`.
_PLACEHOLDER_RE = re.compile(r"<(?![^<>]*@)(?!https?:)[^<>]*>")
_TODO_RE = re.compile(r"\b(TODO|FIXME|TBD|XXX)\b")


# --- helpers ---------------------------------------------------------------------------

def _rel(recipe, path) -> str:
    try:
        return str(Path(path).resolve().relative_to(recipe.root))
    except ValueError:
        return str(path)


def _existing_patches(ctx):
    """The parsed patch of every listed patch that exists."""
    for entry in ctx.recipe.patches:
        path = ctx.recipe.patch_dir / entry.file
        if path.is_file():
            yield parse_patch(path)


# --- the checks ---------------------------------------------------------------------------

@check("patch-series", "the recipe's series matches the patch files on disk")
def check_series(ctx):
    recipe = ctx.recipe
    listed = {e.file for e in recipe.patches}
    for entry in recipe.patches:
        if not (recipe.patch_dir / entry.file).is_file():
            yield ctx.error("patch-series", _rel(recipe, recipe.path), entry.line,
                            f"patch {entry.file} is listed but missing from "
                            f"{_rel(recipe, recipe.patch_dir)}/")
    if recipe.patch_dir.is_dir():
        for path in sorted(recipe.patch_dir.iterdir()):
            if path.suffix in (".patch", ".diff") and path.name not in listed:
                yield ctx.error("patch-series", _rel(recipe, path), None,
                                f"{path.name} is not listed in the recipe's patches.series "
                                f"({_rel(recipe, recipe.path)}); list it or delete it")


@check("patch-sha256", "each patch's sha256 matches the recipe")
def check_sha256(ctx):
    from .patches import patch_sha256_problems  # GitPython when a check runs, not on import
    recipe = ctx.recipe
    for entry, actual in patch_sha256_problems(recipe, recipe.patches):
        if actual is not None:  # a missing patch is patch-series' finding
            yield ctx.error("patch-sha256", _rel(recipe, recipe.path), entry.line,
                            f"{entry.file}: sha256 is {actual}, the recipe says {entry.sha256}; "
                            "if the patch was changed on purpose, update the recipe")


def _dep3_value_problems(name, value):
    if name == "Last-Update":
        try:
            if not _DATE_RE.match(value):
                raise ValueError
            datetime.date.fromisoformat(value)
        except ValueError:
            yield f"Last-Update must be an ISO date YYYY-MM-DD, got {value!r}"
    elif name == "Bug" or name.startswith("Bug-"):
        if not _URL_RE.match(value):
            yield f"{name} must be a URL (the upstream issue), got {value!r}"
    elif name == "Forwarded":
        if value not in ("no", "not-needed") and not _URL_RE.match(value):
            yield f"Forwarded must be `no`, `not-needed` or a URL, got {value!r}"
    elif name == "Origin":
        # DEP-3: a URL (or commit id), optionally after `<keyword>, `. A patch that claims
        # to come from upstream must be traceable; our own (vendor/other) may cite a text.
        keyword, _, rest = value.partition(", ")
        if keyword not in ORIGIN_KEYWORDS:
            keyword, rest = None, value
        traceable = bool(rest) and bool(_URL_RE.match(rest) or _COMMIT_RE.match(rest))
        if keyword in (None, "upstream", "backport") and not traceable:
            yield (f"Origin must be a URL or commit id, optionally after `upstream, ` or "
                   f"`backport, ` (free text only after `vendor, ` or `other, `), got {value!r}")
        elif rest.startswith(("http:", "https:")) and not traceable:
            yield f"Origin has a malformed URL: {rest!r}"
    elif name == "Applied-Upstream":
        if not (_URL_RE.match(value) or _COMMIT_RE.match(value)):
            yield f"Applied-Upstream must be a URL or commit id, got {value!r}"


@check("patch-dep3", "each patch opens with a valid DEP-3 header")
def check_dep3(ctx):
    for patch in _existing_patches(ctx):
        rel = _rel(ctx.recipe, patch.path)
        for line, message in patch.header_problems:
            yield ctx.error("patch-dep3", rel, line, message)
        seen = {}
        for line, name, value in patch.header:
            canonical = DEP3_ALIASES.get(name, name)
            if canonical in seen:
                yield ctx.error("patch-dep3", rel, line, f"{name} repeats line {seen[canonical]}")
            seen[canonical] = line
            if not value:
                yield ctx.error("patch-dep3", rel, line, f"{name} is empty")
                continue
            if canonical not in DEP3_KNOWN and not canonical.startswith(("Bug-", "X-")):
                yield ctx.warning("patch-dep3", rel, line, f"{name} is not a DEP-3 field")
            if _PLACEHOLDER_RE.search(value.split("\n")[0]) or _TODO_RE.search(value):
                yield ctx.error("patch-dep3", rel, line, f"{name} holds a template value: "
                                f"{value.splitlines()[0][:60]!r}; write the real value")
                continue
            for message in _dep3_value_problems(canonical, value):
                yield ctx.error("patch-dep3", rel, line, message)
        for required in DEP3_REQUIRED:
            if required not in seen:
                yield ctx.error("patch-dep3", rel, 1,
                                f"DEP-3 header lacks {required} (required: "
                                f"{', '.join(DEP3_REQUIRED)}; Bug optional, a URL)")


def _load_lock(ctx):
    try:
        return load_upstream_lock(ctx.recipe), None
    except SdrecipeError as exc:
        return None, str(exc)


@check("patch-format", "each patch is a -p1 git diff with a/ b/ paths, full index lines, "
                       "touching only upstream paths, each file once")
def check_format(ctx):
    lock, _ = _load_lock(ctx)
    for patch in _existing_patches(ctx):
        rel = _rel(ctx.recipe, patch.path)
        for line, message in patch.problems:
            yield ctx.error("patch-format", rel, line, message)
        seen = {}
        for section in patch.sections:
            line = section.line
            if section.old is None:
                yield ctx.error("patch-format", rel, line, "file diff without ---/+++ lines")
                continue
            for raw, prefix in ((section.old, "a/"), (section.new, "b/")):
                if raw != "/dev/null" and not raw.startswith(prefix):
                    yield ctx.error("patch-format", rel, section.old_line,
                                    f"path {raw!r} lacks the {prefix} prefix (use `git diff`, -p1)")
            path = section.path
            if path is None:
                yield ctx.error("patch-format", rel, line, "both sides are /dev/null")
                continue
            parts = Path(path).parts
            if path.startswith("/") or ".." in parts or (parts and parts[0] == ".git"):
                yield ctx.error("patch-format", rel, line, f"path {path!r} escapes the upstream tree")
            if path in seen:
                yield ctx.error("patch-format", rel, line,
                                f"{path} is touched twice (also line {seen[path]}); one diff per file")
            seen.setdefault(path, line)
            if section.index_line is None:
                yield ctx.error("patch-format", rel, line, f"{path}: no `index` line "
                                "(generate with `git diff --full-index`)")
            elif section.pre and (len(section.pre) != 40 or len(section.post) != 40):
                yield ctx.error("patch-format", rel, section.index_line,
                                f"{path}: abbreviated index line; regenerate with `git diff --full-index`")
            if lock is not None:
                old = section.old_path
                if old is not None and old not in lock.blobs:
                    yield ctx.error("patch-format", rel, section.old_line,
                                    f"{old} is not a file of the upstream at the pinned commit "
                                    f"({_rel(ctx.recipe, lock.path)})")
                if old is None and section.new_path in lock.blobs:
                    yield ctx.error("patch-format", rel, section.old_line,
                                    f"{section.new_path} is created, but the upstream already has it")


@check("patch-whitespace", "no CRLF line ends and no trailing whitespace added")
def check_whitespace(ctx):
    for patch in _existing_patches(ctx):
        rel = _rel(ctx.recipe, patch.path)
        crlf = [n for n, raw in enumerate(patch.data.split(b"\n"), 1) if raw.endswith(b"\r")]
        if crlf:
            more = f" (and {len(crlf) - 1} more lines)" if len(crlf) > 1 else ""
            yield ctx.error("patch-whitespace", rel, crlf[0], f"CRLF line end{more}; use LF")
        for section in patch.sections:
            for line, text in section.added:
                if text != text.rstrip():
                    yield ctx.error("patch-whitespace", rel, line,
                                    f"added line in {section.path} ends with whitespace")


def _project_files(root: Path):
    """Tracked and untracked-but-not-ignored files; a plain walk outside git."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout
        return [p for p in out.decode("utf-8", "replace").split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for base, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".git", "deploy", ".venv")]
            found += [os.path.relpath(os.path.join(base, f), root) for f in files]
        return found


@check("patch-debris", "no .orig, .rej or .pc/ debris in the project")
def check_debris(ctx):
    for path in _project_files(ctx.recipe.root):
        if path.endswith((".orig", ".rej")) or ".pc" in Path(path).parts:
            yield ctx.error("patch-debris", path, None,
                            "patch debris (from patch/quilt); delete it, never commit it")


def _series_findings(ctx, lock, profile):
    """Pre-image blob ids along one profile's series: (patch, line, message)."""
    expected = dict(lock.blobs)
    origin = dict.fromkeys(expected, "the upstream lock")
    for entry in ctx.recipe.series(profile):
        path = ctx.recipe.patch_dir / entry.file
        if not path.is_file():
            return
        for section in parse_patch(path).sections:
            if section.pre is None or len(section.pre) != 40:
                continue
            old, new = section.old_path, section.new_path
            want = expected.get(old) if old else None
            have = None if set(section.pre) == {"0"} else section.pre
            if have != want:
                yield (path, section.index_line,
                       f"{section.path}: pre-image blob {section.pre} does not match "
                       f"{want or 'a new file (0000000...)'} from {origin.get(old, 'the upstream lock')}; "
                       "the patch was not made against the pinned upstream plus the patches before it")
            if old:
                expected.pop(old, None)
            if new:
                expected[new] = section.post
                origin[new] = f"the post-image of {entry.file}"


@check("patch-index-blobs", "each patch's index pre-image ids match lock/upstream.lock, "
                            "tracked through the series")
def check_index_blobs(ctx):
    lock, problem = _load_lock(ctx)
    if lock is None:
        yield ctx.error("patch-index-blobs", _rel(ctx.recipe, ctx.recipe.root / "lock/upstream.lock"),
                        None, problem)
        return
    if lock.commit != ctx.recipe.upstream.commit:
        yield ctx.error("patch-index-blobs", _rel(ctx.recipe, lock.path), None,
                        f"locks commit {lock.commit}, the recipe pins {ctx.recipe.upstream.commit}; "
                        "regenerate it with `sdrecipe upstream-lock --source DIR`")
        return
    found: dict = {}
    for profile in ctx.recipe.profiles:
        for key in _series_findings(ctx, lock, profile):
            found.setdefault(key, []).append(profile)
    yield from _per_profile(ctx, "patch-index-blobs", found)


def _per_profile(ctx, check_name, found):
    """One finding per (patch, line, message), naming the profiles it concerns."""
    for (path, line, message), profiles in found.items():
        which = "" if len(profiles) == len(ctx.recipe.profiles) else \
            f" (profile {', '.join(profiles)})"
        yield ctx.error(check_name, _rel(ctx.recipe, path), line, message + which)


def _apply_findings(plan):
    """(patch path, line, message) for one profile's plan: where it stops, and index lines
    whose post-image id differs from what applying really gives."""
    for step in plan.steps:
        if step.error:
            yield step.path, locate_apply_error(step.path, step.error), step.error
            return
        for section in parse_patch(step.path).sections:
            post = step.files.get(section.path, (None, None))[1]
            if post and section.post and len(section.post) == 40 and post != section.post:
                yield (step.path, section.index_line,
                       f"{section.path}: applying gives blob {post}, the index line says "
                       f"{section.post}: a hunk was edited after the diff was made")


@check("patch-applies", "with --source: every profile's series applies in order with zero "
                        "fuzz and reverses cleanly", needs_source=True)
def check_applies(ctx):
    from .checkout import check_pinned_head  # GitPython when a check runs, not on import
    from .patches import Scratch, plan_series
    try:
        checkout = check_pinned_head(ctx.source, ctx.recipe)
    except SdrecipeError as exc:
        yield ctx.error("patch-applies", str(ctx.source), None, str(exc))
        return
    found: dict = {}
    with Scratch(checkout) as scratch:
        for profile in ctx.recipe.profiles:
            plan = plan_series(scratch, ctx.recipe, profile, reverse_check=True)
            for key in _apply_findings(plan):
                found.setdefault(key, []).append(profile)
    yield from _per_profile(ctx, "patch-applies", found)
