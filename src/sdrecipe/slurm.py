"""Slurm: job resources, the sbatch script, and asking Slurm about a job.

The seed ran its sample with `salloc -p kshdtest -N 1 -n 16 --gres=dcu:2`, then
`module load compiler/rocm/dtk-22.10.1`, `source .../activate ldm`, `export
LD_LIBRARY_PATH=...` by hand on the node. Here the recipe's `slurm:` section holds
each profile's resources (nodes, tasks, gres, time), the site's config holds the
partition, account and qos (they differ per cluster and are never hard-coded),
and one function writes the batch script every job uses: modules, the built
environment's activation, device visibility from the allocation, a node-local
MIOpen cache, then the payload in the deployment.

Status comes from `scontrol show job` (always there, even on clusters without
accounting) and from `sacct` only once `scontrol` has forgotten the job and the
cluster has accounting. Nothing here imitates Slurm: every answer is Slurm's own.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace

from . import __version__
from .errors import SdrecipeError

# gres name per accelerator kind of a profile: DCU clusters call theirs `dcu`.
GRES_NAME = {"dcu": "dcu", "cuda": "gpu", "none": None}
# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}){0,2})$")
JOB_ID_RE = re.compile(r"^\d+(_\d+)?$")
GRES_RE = re.compile(r"^[a-z][a-z0-9_]*(:[A-Za-z0-9_.-]+)?:\d+$")

TERMINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY",
                   "NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}


class JobRejected(SdrecipeError):
    """Slurm refused the job: it never started. The message carries Slurm's reason."""

    exit_code = 13


# --- the recipe's `slurm:` section ------------------------------------------------------


@dataclass(frozen=True)
class SlurmDefaults:
    """A profile's job resources, as the recipe states them."""

    nodes: int = 1
    ntasks: int = 1
    cpus_per_task: int | None = None
    gres: str | None = None
    time: str = "01:00:00"
    array_tasks: int = 4  # how many array tasks `generate` spreads prompts over


def parse_section(node, recipe) -> dict[str, SlurmDefaults]:
    """The recipe's `slurm:` section: job resources per profile, every field optional.

        slurm:
          dtk-22.10: {nodes: 1, ntasks: 16, gres: "dcu:2", time: "01:00:00", array_tasks: 4}

    nodes, ntasks, cpus_per_task: integers >= 1 (sbatch -N, -n, -c); gres: name[:type]:count,
    whose name must fit the profile's accelerator (dcu -> dcu, cuda -> gpu, none -> no
    gres); time: a Slurm time limit (minutes, HH:MM:SS, D-HH:MM:SS); array_tasks: how
    many array tasks `submit generate` spreads a prompt file over. Partition, account
    and qos are site configuration (config.py), so they are refused here.
    """
    out = {}
    for name, item in node.entries():
        if name not in recipe.profiles:
            raise item.error(f"unknown profile (the recipe defines: {', '.join(recipe.profiles)})")
        for site_key in ("partition", "account", "qos"):
            if item.has(site_key):
                raise item.get(site_key).error(
                    f"{site_key} is site configuration, not part of the recipe: set "
                    f"SDRECIPE_{site_key.upper()} or '{site_key}:' in the sdrecipe config file")
        item.keys(optional=("nodes", "ntasks", "cpus_per_task", "gres", "time", "array_tasks"))
        for key in ("nodes", "ntasks", "cpus_per_task", "array_tasks"):
            value = item.opt(key, int)
            if value is not None and value < 1:
                raise item.get(key).error("must be at least 1")
        time = item.opt("time", str, SlurmDefaults.time)
        if not TIME_RE.match(time):
            raise item.get("time").error("expected a Slurm time limit: minutes, HH:MM:SS or D-HH:MM:SS")
        gres = item.opt("gres", str)
        problem = gres_problem(gres, recipe.profiles[name].accelerator)
        if problem:
            raise item.get("gres").error(problem)
        out[name] = SlurmDefaults(nodes=item.opt("nodes", int, 1), ntasks=item.opt("ntasks", int, 1),
                                  cpus_per_task=item.opt("cpus_per_task", int), gres=gres, time=time,
                                  array_tasks=item.opt("array_tasks", int, SlurmDefaults.array_tasks))
    return out


def gres_problem(gres: str | None, accelerator: str) -> str | None:
    """Why `gres` does not fit a profile's accelerator, or None when it does."""
    expected = GRES_NAME[accelerator]
    if gres is None:
        return None
    if not GRES_RE.match(gres):
        return f"expected a gres like {expected or 'dcu'}:2 (name[:type]:count), got {gres!r}"
    if expected is None:
        return "the profile has no accelerator: leave gres out"
    if gres.split(":")[0] != expected:
        return f"this profile's devices are requested as {expected}:N, got {gres!r}"
    return None


def profile_defaults(recipe, profile: str) -> SlurmDefaults:
    recipe.profile(profile)
    return recipe.sections.get("slurm", {}).get(profile, SlurmDefaults())


# --- resources of one job ----------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    partition: str | None
    account: str | None
    qos: str | None
    nodes: int
    ntasks: int
    cpus_per_task: int | None
    gres: str | None
    time: str
    extra: tuple[str, ...] = ()  # further sbatch/salloc options, passed as given

    def options(self) -> list[str]:
        """The long options sbatch and salloc both understand."""
        pairs = [("partition", self.partition), ("account", self.account), ("qos", self.qos),
                 ("nodes", self.nodes), ("ntasks", self.ntasks),
                 ("cpus-per-task", self.cpus_per_task), ("gres", self.gres), ("time", self.time)]
        return [f"--{key}={value}" for key, value in pairs if value is not None] + list(self.extra)


def after_ok(job_id: str) -> tuple[str, ...]:
    """sbatch options that hold a job until `job_id` completed; should that job fail,
    Slurm cancels this one (reason DependencyNeverSatisfied) instead of queueing it forever."""
    if not JOB_ID_RE.match(job_id):
        raise SdrecipeError(f"--after {job_id!r}: expected a Slurm job id such as 1234 (the "
                            "number `sdrecipe submit ... --no-wait` printed)")
    return (f"--dependency=afterok:{job_id}", "--kill-on-invalid-dep=yes")


def resolve_resources(recipe, profile: str, config, overrides: dict) -> Resources:
    """Recipe defaults for the profile, the site's partition/account/qos, then the options."""
    base = profile_defaults(recipe, profile)
    resources = Resources(partition=config.get("partition"), account=config.get("account"),
                          qos=config.get("qos"), nodes=base.nodes, ntasks=base.ntasks,
                          cpus_per_task=base.cpus_per_task, gres=base.gres, time=base.time)
    given = {key: value for key, value in overrides.items() if value is not None}
    if "time" in given and not TIME_RE.match(given["time"]):
        raise SdrecipeError(f"--time {given['time']!r}: expected minutes, HH:MM:SS or D-HH:MM:SS")
    if given.get("gres") == "none":  # explicitly no devices
        given["gres"] = None
    elif "gres" in given:
        problem = gres_problem(given["gres"], recipe.profile(profile).accelerator)
        if problem:
            raise SdrecipeError(f"--gres for profile {profile}: {problem}")
    return replace(resources, **given)


# --- the batch script ----------------------------------------------------------------------

MODULE_INITS = ("${LMOD_PKG:-/usr/share/lmod/lmod}/init/bash", "/etc/profile.d/lmod.sh",
                "/etc/profile.d/modules.sh", "/usr/share/Modules/init/bash",
                "/usr/share/modules/init/bash")


def _module_setup() -> str:
    """Make `module` available in a non-login (batch) shell: source the first init found."""
    inits = " ".join(f'"{path}"' for path in MODULE_INITS)
    return "\n".join([
        "if ! type module >/dev/null 2>&1; then",
        f"  for init in {inits}; do",
        '    if [ -r "$init" ]; then . "$init"; break; fi',
        "  done",
        "fi"])


MODULE_SETUP = _module_setup()


def _module_lines(modules) -> str:
    """Load the profile's modules with Lmod or Environment Modules, failing loudly.

    Lmod's `load` swaps out another version of the same module (its one-name
    rule), while its `switch` fails when the module is not loaded yet;
    Environment Modules needs `switch` for the swap, as the seed's batch form did.
    """
    if not modules:
        return ""
    lines = ["# --- modules (Lmod or Environment Modules) ---", MODULE_SETUP,
             "if ! type module >/dev/null 2>&1; then",
             '  echo "sdrecipe: no module command in this batch shell (neither Lmod nor Environment '
             'Modules found on $(hostname)); ask your site how to load modules in jobs" >&2',
             "  exit 97",
             "fi"]
    for module in modules:
        quoted = shlex.quote(module)
        lines += [f'if [ -n "${{LMOD_VERSION:-}}" ]; then module load {quoted}; '
                  f"else module switch {quoted} 2>/dev/null || module load {quoted}; fi",
                  f'case ":${{LOADEDMODULES:-}}:" in *:{quoted}:*) '
                  f'echo "sdrecipe: loaded module {module}" ;; *) '
                  f'echo "sdrecipe: module {module} did not load (see the module error above; '
                  f'check: module avail {module})" >&2; exit 97 ;; esac']
    return "\n".join(lines) + "\n"


def _device_lines(accelerator: str) -> str:
    """Make the allocated devices the visible ones, from whatever Slurm exported.

    On ROCm, HIP_VISIBLE_DEVICES indexes inside ROCR_VISIBLE_DEVICES, so when Slurm
    set the latter we leave HIP alone. A count-only gres exports no indices:
    then the node's devices stay visible and the job says so.
    """
    if accelerator == "none":
        return ""
    var = "HIP_VISIBLE_DEVICES" if accelerator == "dcu" else "CUDA_VISIBLE_DEVICES"
    sources = ("CUDA_VISIBLE_DEVICES SLURM_STEP_GPUS SLURM_JOB_GPUS GPU_DEVICE_ORDINAL"
               if accelerator == "dcu" else "SLURM_STEP_GPUS SLURM_JOB_GPUS GPU_DEVICE_ORDINAL")
    lines = ["# --- devices: the ones Slurm allocated ---",
             f'if [ -z "${{{var}:-}}" ]' + (' && [ -z "${ROCR_VISIBLE_DEVICES:-}" ]'
                                            if accelerator == "dcu" else "") + "; then",
             f"  for source in {sources}; do",
             f'    if [ -n "${{!source:-}}" ]; then export {var}="${{!source}}"; break; fi',
             "  done",
             "fi",
             f'echo "sdrecipe: {var}=${{{var}:-<not set: Slurm exported no device list, all devices '
             'of the node are visible>}"']
    if accelerator == "dcu":
        lines += [
            "# --- MIOpen's kernel database on node-local disk, one per job (no NFS locking) ---",
            'for base in "${SLURM_TMPDIR:-}" "${TMPDIR:-}" /tmp; do',
            '  if [ -n "$base" ] && [ -d "$base" ] && [ -w "$base" ]; then break; fi',
            "done",
            'miopen_cache="$base/${USER:-$(id -un)}-$SLURM_JOB_ID/miopen"',
            'mkdir -p "$miopen_cache" && export MIOPEN_USER_DB_PATH="$miopen_cache" '
            'MIOPEN_CUSTOM_CACHE_DIR="$miopen_cache"',
            'trap \'rm -rf "$(dirname "$miopen_cache")"\' EXIT',
            "trap 'exit 143' TERM  # Slurm's SIGTERM at the time limit or scancel: still clean up",
            'echo "sdrecipe: MIOpen cache in $miopen_cache"']
    return "\n".join(lines) + "\n"


def _export_lines(environment) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in environment)


@dataclass(frozen=True)
class JobSpec:
    """Everything a batch script needs; `command` is the payload, already quoted."""

    name: str
    resources: Resources
    output: str  # the log file pattern (%j, %A, %a)
    modules: tuple[str, ...]
    activation: str  # bash file to source
    accelerator: str
    workdir: str
    command: str
    array: str | None = None  # e.g. "0-2" or "0-9%4"
    profile: str = ""
    environment: tuple[tuple[str, str], ...] = ()  # exported after the activation


def batch_script(spec: JobSpec) -> str:
    """The sbatch script: resources as #SBATCH lines, environment setup, the payload."""
    directives = [f"--job-name={spec.name}", *spec.resources.options(),
                  f"--output={spec.output}", f"--error={spec.output}"]
    if spec.array:
        directives.append(f"--array={spec.array}")
    header = "\n".join(f"#SBATCH {shlex.quote(d)}" for d in directives)
    return f"""#!/bin/bash
{header}
# Written by sdrecipe {__version__} for profile {spec.profile}. Resubmit as is with: sbatch <this file>
set -o pipefail
echo "sdrecipe: job ${{SLURM_JOB_ID:-?}}${{SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}} on $(hostname) at $(date '+%F %T')"
{_module_lines(spec.modules)}# --- the environment built by sdrecipe ---
if ! . {shlex.quote(spec.activation)}; then
  echo "sdrecipe: activating {spec.activation} failed" >&2
  exit 98
fi
{_export_lines(spec.environment)}{_device_lines(spec.accelerator)}cd {shlex.quote(spec.workdir)} || exit 98
{spec.command}
status=$?
echo "sdrecipe: payload exited with $status at $(date '+%F %T')"
exit $status
"""


# --- talking to Slurm ---------------------------------------------------------------------------


def _slurm(args: list[str], what: str) -> subprocess.CompletedProcess:
    if not shutil.which(args[0]):
        raise SdrecipeError(f"{args[0]} not found: run this on a login node of a Slurm cluster "
                            f"(to {what})")
    return subprocess.run(args, capture_output=True, text=True)


def sbatch(script) -> str:
    """Submit `script`; its job id, or `JobRejected` with sbatch's own reason."""
    done = _slurm(["sbatch", "--parsable", str(script)], "submit the job")
    if done.returncode != 0:
        reason = "\n".join(line.replace("sbatch: error: ", "").strip()
                           for line in done.stderr.splitlines() if line.strip())
        raise JobRejected(f"Slurm rejected the job, it never started: {reason or 'no reason given'}"
                          f"\n  script: {script}")
    return done.stdout.strip().split(";")[0]


def scancel(job_id: str):
    done = _slurm(["scancel", job_id], "cancel the job")
    if done.returncode != 0:
        raise SdrecipeError(f"scancel {job_id} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class TaskState:
    """One job, or one array task, as Slurm reports it."""

    job_id: str  # e.g. 12 or 12_3
    state: str
    reason: str
    exit_code: str  # "code:signal"
    log: str | None
    nodes: str | None
    time_limit: str | None = None
    elapsed: str | None = None  # [D-]HH:MM:SS run so far, or in all

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def started(self) -> bool:
        return bool(self.nodes) and self.nodes not in ("(null)", "None assigned")


_FIELD_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z/:_]*)=")


def parse_scontrol(line: str) -> dict:
    """`scontrol show job -o` prints Key=Value pairs; values may contain spaces."""
    marks = list(_FIELD_RE.finditer(line))
    return {m.group(1): line[m.end():(marks[i + 1].start() if i + 1 < len(marks) else None)].strip()
            for i, m in enumerate(marks)}


def _task_id(fields: dict) -> str:
    if fields.get("ArrayJobId"):
        return f"{fields['ArrayJobId']}_{fields.get('ArrayTaskId', '')}"
    return fields.get("JobId", "")


def query(job_id: str) -> list[TaskState] | None:
    """The job's tasks from scontrol (or sacct when scontrol forgot it); None if unknown."""
    done = _slurm(["scontrol", "show", "job", "-o", job_id], "ask for the job's state")
    if done.returncode == 0 and done.stdout.strip():
        tasks = []
        for line in done.stdout.splitlines():
            fields = parse_scontrol(line)
            if not fields.get("JobId"):
                continue
            tasks.append(TaskState(
                job_id=_task_id(fields), state=fields.get("JobState", "UNKNOWN"),
                reason=fields.get("Reason", ""), exit_code=fields.get("ExitCode", ""),
                log=fields.get("StdOut"), nodes=fields.get("NodeList") or None,
                time_limit=fields.get("TimeLimit"), elapsed=fields.get("RunTime")))
        return tasks
    if "Invalid job id" in done.stderr and accounting_enabled():
        return _query_sacct(job_id)
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        raise SdrecipeError(f"scontrol show job {job_id} failed: {done.stderr.strip()}")
    return None


def accounting_enabled() -> bool:
    done = _slurm(["scontrol", "show", "config"], "read the cluster's configuration")
    match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", done.stdout, re.M)
    return bool(match) and match.group(1) != "accounting_storage/none"


def _query_sacct(job_id: str) -> list[TaskState] | None:
    """The job's allocations (-X: not its steps) from the accounting database: how a job
    ended once the controller has purged it (OOM, timeout, node failure live only here).
    States read "CANCELLED by 0"; an array's pending tasks, "12_[3-9]", stay one line."""
    done = _slurm(["sacct", "-j", job_id, "-X", "-n", "-P",
                   "-o", "JobID,State,Reason,ExitCode,NodeList,Timelimit,Elapsed"],
                  "ask the accounting database for the job's state")
    if done.returncode != 0:
        raise SdrecipeError(f"sacct -j {job_id} failed: {done.stderr.strip()}")
    tasks = []
    for line in done.stdout.splitlines():
        job, state, reason, exit_code, nodes, limit, elapsed = (line.split("|") + [""] * 7)[:7]
        tasks.append(TaskState(job_id=job, state=state.split()[0] if state else "UNKNOWN",
                               reason=reason, exit_code=exit_code, log=None,
                               nodes=nodes or None, time_limit=limit, elapsed=elapsed or None))
    return tasks or None


def seconds_of(duration: str) -> int:
    """Slurm's [D-]HH:MM:SS (or MM:SS) as seconds, to compare elapsed times."""
    days, _, clock = duration.rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part or 0)
    return seconds + int(days or 0) * 86400


# --- interactive ------------------------------------------------------------------------------


def interactive_lines(modules, activation: str, workdir: str) -> list[str]:
    """What to run inside an allocation: the seed's module/activate/cd lines, generated."""
    lines = [f"module load {shlex.quote(m)}" for m in modules]
    return lines + [f". {shlex.quote(activation)}", f"cd {shlex.quote(workdir)}"]


def salloc_command(resources: Resources, job_name: str) -> list[str]:
    return ["salloc", f"--job-name={job_name}", *resources.options()]


def single_step(resources: Resources) -> list[str]:
    """srun of one task holding the whole allocation: inside `salloc -n 16`, a bare srun
    starts one copy per task (16 checkpoint loads fighting over 2 DCUs). The step keeps
    the allocation's gres (srun's default) and, on one node, all its CPUs, spelled out
    because Slurm 20.11 gave a step only the CPUs it asked for."""
    step = ["srun", "--nodes=1", "--ntasks=1"]
    if resources.nodes == 1:
        step.append(f"--cpus-per-task={resources.ntasks * (resources.cpus_per_task or 1)}")
    return step
