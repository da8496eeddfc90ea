"""The `sdrecipe` command: arguments in, one command module called, one line out on error.

Each verb has an `_add_<verb>` function that declares its arguments and a small
handler that builds the run's `Target` once (recipe, deployment, profile, config,
mode), or for the verbs of no one profile (lint, upstream-lock, lock, bundle) just
what they use, and calls `commands.<verb>` with explicit keyword arguments: no
module below sees argparse. `SdrecipeError` becomes one line on stderr and its exit
code (2, or 1 for a failed verification); an OSError the engine met unprepared also
becomes one line naming its path (exit 2); `--debug` adds the traceback; Ctrl-C exits 130. Command modules are
imported only when their verb runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __version__, console
from .errors import SdrecipeError


class CommandParser(argparse.ArgumentParser):
    """Every (sub)command also takes the global options after its name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _global_options(self, default=argparse.SUPPRESS)


def _global_options(parser, default=None):
    parser.add_argument("--recipe", default=default,
                        help="recipe file (default: $SDRECIPE_RECIPE or "
                             "recipe/stable-diffusion.yaml of this checkout)")
    parser.add_argument("--deploy-dir", default=default,
                        help="deployment folder (default: $SDRECIPE_DEPLOY_DIR "
                             "or ./deploy beside the recipe)")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="show debug logs (every run's full log is also kept in "
                             "<deploy>/.sdrecipe/logs/)")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, also show its traceback (for a bug report)")


def _profile_option(parser, help_text="a profile of the recipe (default: detected on this "
                                      "machine)"):
    parser.add_argument("--profile", metavar="PROFILE", help=help_text)


def _smoke_option(parser, help_text):
    parser.add_argument("--smoke", action="store_true", default=None, help=help_text)


# --- the run context ---------------------------------------------------------------------------

def _recipe(args):
    from .project import load_recipe
    from .recipe import find_recipe
    return load_recipe(find_recipe(getattr(args, "recipe", None)))


def _deployment(args, recipe):
    """--deploy-dir, else $SDRECIPE_DEPLOY_DIR, else the project's deploy/ (not created)."""
    from .layout import deployment_dir
    return deployment_dir(getattr(args, "deploy_dir", None), recipe.root)


def _target(args, smoke=None, log: str | None = None, detect: bool = False, **options):
    """The frozen run context. Not given: the profile and mode of the deployment's last
    deploy (`detect`: this machine's profile first, for deploy itself), else the detected
    profile, real mode. `log`: keep this run's log in the deployment under that name."""
    from .config import load_config
    from .target import Options, Target, last_deployed
    recipe = _recipe(args)
    deployment = _deployment(args, recipe)
    profile = getattr(args, "profile", None)
    last = last_deployed(deployment)
    if not profile and last and not detect:
        profile = last[0]
    if not profile:
        from .doctor import detect_profile
        profile = detect_profile()
    recipe.profile(profile)
    if smoke is None:
        smoke = bool(last and last == (profile, True))
    if log:
        console.keep_log(deployment, log)
    return Target(recipe, deployment, profile, load_config(), smoke, Options(**options))


# --- the verbs -----------------------------------------------------------------------------------

def _add_deploy(sub):
    parser = sub.add_parser("deploy", help="fetch, patch, build, preseed and verify: every stage "
                                           "that is not done yet")
    _profile_option(parser)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny generated models instead of the real weights: no model is "
                             "downloaded, the whole pipeline runs in minutes")
    parser.add_argument("--python", metavar="PATH",
                        help="build the environment as a venv of this Python 3.8 (no conda)")
    parser.add_argument("--prefix", type=Path, help="environment folder (default: "
                                                    "<deploy>/envs/<profile>)")
    parser.add_argument("--source", metavar="DIR",
                        help="copy this local checkout of the pinned commit instead of cloning "
                             "(default: $SDRECIPE_UPSTREAM or the upstream_checkout setting)")
    parser.add_argument("--from-bundle", type=Path, metavar="BUNDLE",
                        help="deploy from an offline bundle (folder or tar, `bundle create`): "
                             "source, model files, environment files; no network needed")

    def run(args):
        from .commands import deploy
        return deploy.run(_target(args, smoke=args.smoke, log="deploy", detect=True,
                                  source=args.source, python=args.python, prefix=args.prefix,
                                  bundle=args.from_bundle))
    parser.set_defaults(handler=run)


def _add_status(sub):
    parser = sub.add_parser("status", help="each deploy stage: done, stale, missing or blocked, "
                                           "why, and what a re-run would do")
    _profile_option(parser)
    _smoke_option(parser, "the smoke deployment's status (default: the mode last deployed)")
    parser.add_argument("--format", choices=("text", "json"), default="text")

    def run(args):
        from .commands import status
        return status.run(_target(args, smoke=args.smoke), format=args.format)
    parser.set_defaults(handler=run)


def _add_verify(sub):
    parser = sub.add_parser("verify", help="run a short txt2img sample in the built environment, "
                                           "offline; check it and write report.json/report.html")
    _profile_option(parser)
    _smoke_option(parser, "use the tiny generated models (default: the mode last deployed)")
    parser.add_argument("--out", help="report folder (default: <deploy>/reports/<profile>/"
                                      "sample or .../smoke)")

    def run(args):
        from .commands import verify
        return verify.run(_target(args, smoke=args.smoke, log="verify"), out_dir=args.out)
    parser.set_defaults(handler=run)


def _add_env(sub):
    parser = sub.add_parser("env", help="build a profile's environment from its lock, or check it")
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="create the environment from the lock (no solver)")
    _profile_option(build)
    build.add_argument("--prefix", type=Path,
                       help="environment folder (default: <deploy>/envs/<profile>)")
    build.add_argument("--python", metavar="PATH",
                       help="build a venv of this interpreter instead of a conda environment")
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")

    def run_build(args):
        from .commands import env
        return env.build(_target(args, log="env-build", python=args.python, prefix=args.prefix),
                         force=args.force)
    build.set_defaults(handler=run_build)
    check = actions.add_parser("check", help="run the offline import check in the environment")
    _profile_option(check)

    def run_check(args):
        from .commands import env
        return env.check(_target(args))
    check.set_defaults(handler=run_check)


def _add_fetch(sub):
    parser = sub.add_parser("fetch", help="clone the pinned upstream and fetch the profile's "
                                          "model files into the deployment")
    _profile_option(parser)
    parser.add_argument("--verify", action="store_true",
                        help="rehash every placed file (default: trust size/mtime/inode stamps)")
    parser.add_argument("--with-optional", action="store_true",
                        help="also fetch optional artifacts (e.g. sd-v1-4-full-ema)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="only these artifacts, by recipe name (may name optional ones)")
    parser.add_argument("--from-bundle", type=Path, metavar="BUNDLE",
                        help="restore from an offline bundle (folder or tar); no network")
    parser.add_argument("--connections", type=int, metavar="N",
                        help="parallel connections per large file (default: config "
                             "`connections`, 8; 1 = one stream)")

    def run(args):
        from .commands import fetch
        return fetch.run(_target(args, smoke=False, log="fetch"), verify=args.verify,
                         with_optional=args.with_optional, only=args.only,
                         from_bundle=args.from_bundle, connections=args.connections)
    parser.set_defaults(handler=run)


def _add_patch(sub):
    parser = sub.add_parser("patch", help="apply, revert or inspect the patch series on a checkout")
    actions = parser.add_subparsers(dest="action", required=True)
    for name, help_text in (("apply", "apply the series for a profile, all or nothing"),
                            ("revert", "restore the pristine pinned tree"),
                            ("status", "show each patch as applied, not applied or conflicting")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--source", required=True, type=Path, help="upstream checkout")
        _profile_option(action)
        if name == "status":
            action.set_defaults(force=False)
        else:
            action.add_argument("--force", action="store_true",
                                help="overwrite files edited by hand (drift)")

        def run(args, verb=name):
            from .commands import patch
            return patch.run(_target(args), action=verb, source=args.source, force=args.force)
        action.set_defaults(handler=run)


def _add_lint(sub):
    parser = sub.add_parser("lint", help="check the recipe, patch series and locks (CI gate)")
    parser.add_argument("--source", type=Path,
                        help="a checkout at the pinned commit: also apply/reverse every series")
    parser.add_argument("--format", choices=("text", "json"), default="text")

    def run(args):
        from .commands import lint
        return lint.run(_recipe(args), source=args.source, format=args.format)
    parser.set_defaults(handler=run)


def _add_upstream_lock(sub):
    parser = sub.add_parser("upstream-lock",
                            help="write lock/upstream.lock from a checkout at the pinned commit")
    parser.add_argument("--source", required=True, type=Path)

    def run(args):
        from .commands import upstream_lock
        return upstream_lock.run(_recipe(args), source=args.source)
    parser.set_defaults(handler=run)


def _add_doctor(sub):
    parser = sub.add_parser("doctor", help="diagnose a deployment and name the fix for each problem")
    _profile_option(parser)
    _smoke_option(parser, "diagnose the smoke deployment (default: the mode last deployed)")

    def run(args):
        from .commands import doctor
        return doctor.run(_target(args, smoke=args.smoke))
    parser.set_defaults(handler=run)


def _add_bundle(sub):
    parser = sub.add_parser("bundle", help="pack an offline bundle for nodes without network")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="write everything a node without network needs: "
                                               "source, model files, every locked environment "
                                               "file, the engine and its wheels, the recipe")
    create.add_argument("out", type=Path, help="the bundle to write: a folder (made again in "
                                               "place: only what changed is rewritten) or .tar")
    create.add_argument("--profile", dest="profiles", action="append", metavar="PROFILE",
                        help="profiles to serve (repeatable; default: all of the recipe's)")
    create.add_argument("--smoke", action="store_true",
                        help="for smoke deploys: no model files (they are generated)")
    create.add_argument("--with-optional", action="store_true", help="include optional artifacts")
    create.add_argument("--format", choices=("dir", "tar"), default="dir",
                        help="a folder (default; rsync-friendly) or one tar file")
    create.add_argument("--source", metavar="DIR",
                        help="a local checkout of the pinned commit to bundle instead of "
                             "cloning (default: $SDRECIPE_UPSTREAM or the upstream_checkout "
                             "setting)")

    def run(args):
        from .commands import bundle
        from .config import load_config
        recipe = _recipe(args)
        config = load_config()
        return bundle.create(recipe, _deployment(args, recipe), config, args.out,
                             profiles=args.profiles, smoke=args.smoke,
                             with_optional=args.with_optional, format=args.format,
                             source=args.source or config.get("upstream_checkout"))
    create.set_defaults(handler=run)


SLURM_RESOURCES = (
    ("partition", str, "partition (default: $SDRECIPE_PARTITION or the config file)"),
    ("account", str, "account to charge"), ("qos", str, "quality of service"),
    ("nodes", int, "nodes"), ("ntasks", int, "tasks"), ("cpus_per_task", int, "CPUs per task"),
    ("gres", str, "generic resources, e.g. dcu:2 or gpu:1 ('none': no devices)"),
    ("time", str, "time limit: minutes, HH:MM:SS or D-HH:MM:SS"))


def _slurm_resource_options(parser):
    group = parser.add_argument_group("Slurm resources (default: the recipe's slurm: section "
                                      "for the profile; partition/account/qos from site config)")
    for name, kind, help_text in SLURM_RESOURCES:
        group.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    group.add_argument("--sbatch-arg", action="append", metavar="OPTION",
                       help="one more sbatch/salloc option as is, e.g. --sbatch-arg=--mem=64G "
                            "(repeatable)")


def _slurm_request(args) -> dict:
    """The Slurm resources asked (None: the recipe's, then the site's) and extra options."""
    return {"resources": {name: getattr(args, name) for name, _, _ in SLURM_RESOURCES},
            "sbatch_args": tuple(args.sbatch_arg or ())}


def _add_submit(sub):
    from .batch import SAMPLERS
    from .watch import EXIT_HELP
    parser = sub.add_parser("submit", help="run verify or a prompt batch as a Slurm job, "
                                           "follow it and collect its results",
                            epilog=EXIT_HELP)
    kinds = parser.add_subparsers(dest="kind", required=True)
    verify = kinds.add_parser("verify", help="run sdrecipe verify in a job; collect report.json",
                              epilog=EXIT_HELP)
    _smoke_option(verify, "verify on tiny models, seconds (default: the mode last deployed)")
    generate = kinds.add_parser("generate", help="a job array over a prompt file; gallery.html",
                                epilog=EXIT_HELP)
    generate.add_argument("--prompts", required=True, type=Path,
                          help="prompt file: one prompt per line, # comments")
    generate.add_argument("--out", help="output folder (default: <deploy>/outputs/<prompt file name>)")
    generate.add_argument("--array-tasks", type=int, help="array tasks to spread prompts over "
                                                          "(default: the recipe's array_tasks)")
    generate.add_argument("--max-running", type=int, help="run at most this many tasks at once")
    generate.add_argument("--sampler", choices=SAMPLERS, help="default plms")
    generate.add_argument("--steps", type=int, help="sampling steps (default 50)")
    generate.add_argument("--n-samples", type=int, help="images per pass (default 3)")
    generate.add_argument("--n-iter", type=int, help="passes per prompt (default 1)")
    generate.add_argument("--height", type=int, help="default 512")
    generate.add_argument("--width", type=int, help="default 512")
    generate.add_argument("--scale", type=float, help="guidance scale (default 7.5)")
    generate.add_argument("--seed", type=int, help="seed of every prompt (default 42)")
    generate.add_argument("--precision", choices=("full", "autocast"),
                          help="default: the recipe's verify precision for the profile")
    _smoke_option(generate, "the tiny models of deploy --smoke, a rehearsal of the batch "
                            "(default: the mode last deployed)")
    generate.add_argument("--after", metavar="JOBID",
                          help="start once job JOBID completed (afterok), e.g. a verify job "
                               "submitted with --no-wait; cancelled by Slurm if it fails")

    def submission(args) -> dict:
        return dict(_slurm_request(args), dry_run=args.dry_run, no_wait=args.no_wait,
                    quiet=args.quiet)

    def run_verify(args):
        from .commands import submit
        return submit.verify(_target(args, smoke=args.smoke), **submission(args))

    def run_generate(args):
        from .commands import submit
        from .jobs import Sampling
        sampling = Sampling(sampler=args.sampler, steps=args.steps, n_samples=args.n_samples,
                            n_iter=args.n_iter, height=args.height, width=args.width,
                            scale=args.scale, seed=args.seed, precision=args.precision)
        return submit.generate(_target(args, smoke=args.smoke), args.prompts, out_dir=args.out,
                               array_tasks=args.array_tasks, max_running=args.max_running,
                               sampling=sampling, after=args.after, **submission(args))
    for kind, run in ((verify, run_verify), (generate, run_generate)):
        _profile_option(kind)
        _slurm_resource_options(kind)
        kind.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
        kind.add_argument("--no-wait", action="store_true", help="submit and return")
        kind.add_argument("--quiet", action="store_true", help="do not print the job's log")
        kind.set_defaults(handler=run)


def _add_salloc(sub):
    parser = sub.add_parser("salloc", help="print (or --run) the interactive sequence: "
                                           "salloc, a shell on the node, module and environment")
    _profile_option(parser)
    _slurm_resource_options(parser)
    # dest "start": "command" is the verb's dest
    parser.add_argument("--run", dest="start", action="store_true",
                        help="run it: salloc + one srun task (--pty bash), set up")
    parser.add_argument("node_command", metavar="command", nargs="*",
                        help="with --run: run this command on the node instead of a shell")

    def run(args):
        from .commands import salloc
        return salloc.run(_target(args), **_slurm_request(args), start=args.start,
                          command=args.node_command)
    parser.set_defaults(handler=run)


def _add_jobs(sub):
    parser = sub.add_parser("jobs", help="this deployment's Slurm jobs: id, kind, state, elapsed, "
                                         "where the report or gallery is")
    _profile_option(parser, "only this profile's jobs (default: all)")

    def run(args):
        from .commands import jobs_list
        return jobs_list.run(_target(args), profile=args.profile)
    parser.set_defaults(handler=run)


def _add_lock(sub):
    parser = sub.add_parser("lock", help="resolve env/ into lock/<profile>.conda-lock.yml "
                                         "(conda part by py-rattler, pip part by uv)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--profile", metavar="PROFILE", help="the profile to lock")
    which.add_argument("--all", action="store_true", help="lock every profile of the recipe")
    parser.add_argument("--pip-only", action="store_true",
                        help="lock the pip part only (where conda channels are unreachable); "
                             "a conda part already locked from the same inputs is kept")

    def run(args):
        from .commands import lock
        from .config import load_config
        profiles = None if args.all else [args.profile]
        return lock.run(_recipe(args), load_config(), profiles=profiles, pip_only=args.pip_only)
    parser.set_defaults(handler=run)


def _add_cache(sub):
    parser = sub.add_parser("cache", help="the shared content cache of model files")
    actions = parser.add_subparsers(dest="action", required=True)
    gc = actions.add_parser("gc", help="remove cache entries no deployment uses, and "
                                       "quarantined bad copies beyond quarantine_keep")
    gc.add_argument("--dry-run", action="store_true", help="list what would go and its size")

    def run(args):
        from .commands import cache
        from .config import load_config
        return cache.gc(load_config(), dry_run=args.dry_run)
    gc.set_defaults(handler=run)


COMMANDS = (_add_deploy, _add_status, _add_verify, _add_fetch, _add_env, _add_doctor, _add_patch,
            _add_lint, _add_upstream_lock, _add_bundle, _add_submit, _add_salloc, _add_jobs,
            _add_lock, _add_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdrecipe",
        description="Deploy CompVis/stable-diffusion on an HPC cluster from a pinned, patched, "
                    "locked recipe.")
    parser.add_argument("--version", action="version", version=f"sdrecipe {__version__}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=CommandParser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        with console.session(verbose=bool(getattr(args, "verbose", False))):
            return int(args.handler(args) or 0)
    except SdrecipeError as exc:
        _traceback(debug)
        console.err(f"sdrecipe: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        console.err("sdrecipe: interrupted")
        return 130
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "sdrecipe":
            raise
        console.err(f"sdrecipe: error: {exc}: {missing_dependencies_hint()}")
        return 2
    except OSError as exc:  # the last resort: a path the engine met unprepared
        _traceback(debug)
        console.err(f"sdrecipe: error: {os_error_line(exc)}")
        return 2


def _traceback(debug: bool) -> None:
    if debug:
        import traceback
        console.err(traceback.format_exc().rstrip())


def os_error_line(exc: OSError) -> str:
    """A filesystem failure as one line: the path, what the system said, what to do."""
    import errno
    where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name)
    advice = {errno.ENOSPC: "free some space, or point the folder elsewhere",
              errno.EDQUOT: "your quota is full: free some space, or point the folder elsewhere",
              errno.EROFS: "it is read-only: choose another --deploy-dir (or verify --out DIR)",
              errno.EACCES: "make it writable, or choose another --deploy-dir "
                            "(or verify --out DIR)",
              errno.EPERM: "make it writable, or choose another --deploy-dir"}
    return (f"{where or 'a file'}: {exc.strerror or exc}; "
            f"{advice.get(exc.errno, 'check that path and run again (--debug shows where)')}")


def missing_dependencies_hint() -> str:
    import sys
    project = Path(__file__).resolve().parents[2]
    return (f"its dependencies are missing for {sys.executable}; run: {sys.executable} -m pip "
            f"install -e '{project}'")
