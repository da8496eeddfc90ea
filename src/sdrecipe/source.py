"""The upstream checkout at the pinned commit: cloned once, verified, never moved.

`ensure_source` tries the recipe's URLs in order (mirrors first). From each it
asks for the pinned commit alone (`git fetch --depth 1 <url> <sha>`), which
servers allow for protocol v2 or `uploadpack.allowReachableSHA1InWant`; when a
server refuses, it fetches the branches and looks for the commit there. A URL
that does not have the commit (a fork, a stale mirror) is skipped with its
reason. The clone is made in a temporary sibling folder and renamed into place,
so an interrupted run leaves nothing half-made.

With `local=DIR` (`--source`, `$SDRECIPE_UPSTREAM`, config `upstream_checkout`)
the checkout is copied from a local one instead: work tree and `.git` as files,
because a site's shared copy may be a sparse clone that lacks the blobs of the
files it leaves out, which git cannot clone, fetch or borrow (alternates) from.
The copy must pass the same checks as an existing checkout, before and after.

An existing checkout is reused only if HEAD is the pinned commit and its tracked
files are either pristine or carry OUR patch series (`patches.tree_state`);
anything else is someone's work, which we refuse to touch.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import git

from .errors import SdrecipeError

# A ref that keeps the pinned commit alive (and names it in source bundles).
PINNED_REF = "refs/sdrecipe/pinned"
log = logging.getLogger("sdrecipe.source")


class _Unusable(Exception):
    """This URL cannot provide the pinned commit; try the next one."""


def ensure_source(recipe, dest, profile: str | None = None, bundle: Path | None = None,
                  local: Path | str | None = None, config=None) -> Path:
    """Return `dest` as a checkout of the pinned commit, cloning it if absent.

    `bundle` (a git bundle file made by `sdrecipe bundle create`) replaces the
    network: the commit is read from it and nothing else is contacted. `local`
    (a checkout of the pinned commit) is copied instead; nothing is contacted either.
    `config` gives the CA bundle that https mirrors are verified against.
    """
    dest = Path(dest)
    pinned = recipe.upstream.commit
    if (dest / ".git").exists():
        check_existing(recipe, dest, profile)
        return dest
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise SdrecipeError(f"{dest} exists and is not a git checkout; move it aside "
                            "(or choose another --deploy-dir) and run again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial"
    if local:
        _copy_local(recipe, Path(local).expanduser().resolve(), staging, profile)
        _move_into_place(staging, dest)
        return dest
    # git runs inside the new clone: local paths must not stay relative to our cwd.
    sources = [str(Path(bundle).resolve())] if bundle else [
        os.path.abspath(url) if os.path.exists(url) else url for url in recipe.upstream.urls]
    failures = []
    try:  # the staging clone never outlives a failure; one left by a kill goes next run
        for url in sources:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                _clone_pinned(staging, url, pinned, from_bundle=bundle is not None,
                              ca_bundle=config.get("ca_bundle") if config else None)
                break
            except _Unusable as exc:
                failures.append(f"  {url}: {exc}")
        else:
            raise _no_source(recipe, failures)
        _move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for failure in failures:
        log.warning("skipped a source that could not serve %s:\n%s", pinned[:12], failure)
    return dest


def _no_source(recipe, failures) -> SdrecipeError:
    pinned = recipe.upstream.commit
    return SdrecipeError(
        f"cannot get upstream commit {pinned} from any source:\n" + "\n".join(failures)
        + f"\nCheck upstream.url and upstream.mirrors in {recipe.path}, or your network. "
        "Offline, use a checkout of the pinned commit you already have (deploy --source DIR, "
        "or SDRECIPE_UPSTREAM=DIR) or an offline bundle (fetch --from-bundle DIR).")


def _move_into_place(staging: Path, dest: Path) -> None:
    if dest.exists():
        dest.rmdir()  # an empty folder we may replace
    os.replace(staging, dest)


def _copy_local(recipe, local: Path, staging: Path, profile: str | None) -> None:
    """Copy a local checkout of the pinned commit, .git included, as plain files; check both."""
    if not (local / ".git").is_dir():
        raise SdrecipeError(f"{local} is not a git checkout with its own .git folder; "
                            f"{POINT_ELSEWHERE}")
    check_existing(recipe, local, profile, POINT_ELSEWHERE)  # refuse before copying gigabytes
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            shutil.copytree(local, staging, symlinks=True)
        except OSError as exc:  # shutil.Error too: it lists every file it could not copy
            raise SdrecipeError(f"cannot copy the checkout {local}: {str(exc)[:500]}; "
                                "fix the permissions or free some space and run again") from exc
        check_existing(recipe, staging, profile, POINT_ELSEWHERE)  # the copy is what we checked
        git.Repo(staging).git.update_ref(PINNED_REF, recipe.upstream.commit)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # an interrupted copy leaves nothing
        raise


def _clone_pinned(staging: Path, url: str, pinned: str, from_bundle: bool,
                  ca_bundle: str | None) -> None:
    repo = git.Repo.init(staging)
    from .transfer import ca_bundle_environ
    # fail, never prompt, on auth; verify https mirrors against the site's CA bundle
    repo.git.update_environment(GIT_TERMINAL_PROMPT="0", **ca_bundle_environ(ca_bundle))
    try:
        if from_bundle:
            # Bundles made from a shallow clone lack the parents: declare the
            # boundary so git does not look for them.
            (staging / ".git" / "shallow").write_text(pinned + "\n")
            repo.git.fetch("--no-tags", url, PINNED_REF)
        else:
            _fetch_commit(repo, url, pinned)
        if repo.git.cat_file("-t", pinned) != "commit":
            raise _Unusable(f"{pinned} is not a commit there")
        repo.git.update_ref(PINNED_REF, pinned)
        repo.git.checkout("-q", "--detach", pinned)
        if not from_bundle:
            repo.create_remote("origin", url)
    except git.GitCommandError as exc:
        raise _Unusable(git_reason(exc)) from exc
    head = repo.head.commit.hexsha
    if head != pinned:
        raise _Unusable(f"checked out {head}, not the pinned {pinned}")


def _fetch_commit(repo: git.Repo, url: str, pinned: str) -> None:
    """Fetch only the pinned commit; else all branches and tags, if the server refuses."""
    try:
        repo.git.fetch("--depth", "1", "--no-tags", url, pinned)
        return
    except git.GitCommandError as exc:
        single_commit_error = git_reason(exc)
    try:
        repo.git.fetch("--tags", url, "+refs/heads/*:refs/remotes/mirror/*")
    except git.GitCommandError as exc:
        raise _Unusable(git_reason(exc)) from exc
    try:
        repo.git.cat_file("-e", f"{pinned}^{{commit}}")
    except git.GitCommandError:
        raise _Unusable(f"does not have commit {pinned} (a fork or a stale mirror?); "
                        f"fetching it alone said: {single_commit_error}") from None


def git_reason(exc: git.GitCommandError) -> str:
    """What git said went wrong: its first fatal/error lines, without GitPython's framing."""
    text = exc.stderr if isinstance(exc.stderr, str) else str(exc)
    lines = [line.strip().removeprefix("stderr:").strip().strip("'").strip()
             for line in text.splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if "fatal:" in line or "error:" in line]
    picked = list(dict.fromkeys(errors or lines[-1:]))[:2]
    return "; ".join(picked) or f"git exited with {exc.status}"


MOVE_ASIDE = ("sdrecipe does not move checkouts it did not make: move it aside "
              "(or choose another --deploy-dir) and run again")
POINT_ELSEWHERE = ("point --source (or $SDRECIPE_UPSTREAM, or the upstream_checkout setting) "
                   "at a checkout of the pinned commit, or unset it to clone")


def check_existing(recipe, dest: Path, profile: str | None = None, remedy: str = MOVE_ASIDE) -> None:
    """Refuse a checkout at another commit, or with changes that are not our series. Only
    reads: git must not refresh the index of a checkout that is not ours (a site's shared
    copy, a bundle's, whose manifest would no longer match)."""
    pinned = recipe.upstream.commit
    try:
        repo = git.Repo(dest)
        head = repo.head.commit.hexsha
    except (git.InvalidGitRepositoryError, ValueError) as exc:
        raise SdrecipeError(f"{dest} is not a usable git checkout ({exc}); {remedy}") from exc
    if head != pinned:
        raise SdrecipeError(f"{dest} is a checkout of commit {head}, not the pinned {pinned}; "
                            f"{remedy}")
    with tempfile.TemporaryDirectory(prefix="sdrecipe-index-") as scratch:
        index = Path(repo.git_dir) / "index"
        if index.is_file():  # git diff refreshes the index it reads: let it refresh a copy
            shutil.copyfile(index, Path(scratch) / "index")
        repo.git.update_environment(GIT_INDEX_FILE=str(Path(scratch) / "index"))
        try:
            changed = set(repo.git.diff("--name-only", "HEAD").splitlines())  # tracked only
        except git.GitCommandError as exc:
            raise SdrecipeError(f"{dest}: git cannot compare the checkout with its commit "
                                f"({git_reason(exc)}): a damaged clone; {remedy}") from exc
    if not changed:
        return
    from .patches import series_paths, tree_state
    outside = sorted(changed - series_paths(recipe))
    drifted = []
    if not outside:
        drifted = list(tree_state(dest, recipe, profile or next(iter(recipe.profiles))).drifted)
    foreign = outside + drifted
    if not foreign:
        return  # only our patch series, applied in full or in part
    listing = ", ".join(foreign[:10]) + (" ..." if len(foreign) > 10 else "")
    raise SdrecipeError(
        f"{dest} has changes that are not the recipe's patch series: {listing}. "
        "Save them elsewhere (git diff > my.patch), then restore those files with "
        "`git checkout -- <file>` (or move the checkout aside) and run again")
