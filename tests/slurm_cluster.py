"""A real single-node Slurm cluster (munge + slurmctld + slurmd) and Lmod, on loopback.

The slurm tests drive Debian's `slurm-wlm` (22.05) for real: this module writes a
slurm.conf for one node named after this host (32 CPUs declared with
`config_overrides`, so the seed's `-n 16` fits on a 2-core CI machine beside a
long-running test job; `Gres=dcu:2` as a count-only generic resource, and
`gpu:2` on device nodes made with mknod, so Slurm's gpu plugin exports
CUDA_VISIBLE_DEVICES as on a CUDA site), starts `munged` as the munge user with
its own key, socket and PID file, then `slurmctld` and `slurmd` in the foreground, each
on a free loopback port, all state under one temporary folder. No accounting
daemon: `sacct` does not work, which is how most test clusters and some sites
look, so the poller under test must work from `scontrol`. `MinJobAge` keeps
finished jobs visible to `scontrol` for 10 minutes.

It also writes an Lmod module tree with `compiler/rocm/dtk-22.10.1.lua`, which
sets `DTK_TEST_LOADED=1` and `ROCM_PATH`, so a job can show that its `module
load` really happened.

`SlurmCluster.start()` returns once the node is idle; `stop()` cancels the jobs
still queued or running (their slurmstepd would outlive slurmd), then ends every
daemon it started, by PID. `python tests/slurm_cluster.py` starts one by hand and
prints the environment to use it until Ctrl-C (or `kill PID`).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue",
           "scancel")
LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
DTK_MODULE = "compiler/rocm/dtk-22.10.1"
NODE_CPUS = 32
DCU_COUNT = 2
GPU_COUNT = 2


def missing_requirements() -> list[str]:
    """What this machine lacks to run the cluster: programs, Lmod, root (slurmd starts each
    job as its user, and munged runs as the munge user)."""
    missing = [tool for tool in TOOLS if not shutil.which(tool)
               and not Path("/usr/sbin", tool).exists()]
    if not LMOD_INIT.exists():
        missing.append(str(LMOD_INIT))
    if os.geteuid() != 0:
        missing.append("root (CI runs as root)")
    return missing


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))



def _die_with_parent():
    """A test run killed outright (SIGKILL, a CI timeout) runs no finalizer: the kernel
    then ends the daemons it started (PR_SET_PDEATHSIG), so none outlives the run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

class SlurmCluster:
    """One munged, one slurmctld, one slurmd; everything under `root`."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="sdrecipe-slurm-"))
        self.root.chmod(0o755)  # munged and job users must traverse it
        self.node = socket.gethostname().split(".")[0]
        self.partition = "sdtest"
        self.conf = self.root / "etc" / "slurm.conf"
        self.modules = self.root / "modulefiles"
        self.processes: dict[str, subprocess.Popen] = {}
        self.gpus = 0  # gpu gres devices, once configured

    # --- configuration ---------------------------------------------------------------
    @property
    def env(self) -> dict:
        """What a client needs: SLURM_CONF, and Lmod's module path with the test module."""
        return {"SLURM_CONF": str(self.conf), "MODULEPATH": str(self.modules)}

    def _gpu_devices(self) -> Path | None:
        """Device nodes for the gpu gres (copies of /dev/null's), or None where mknod is refused."""
        devices = self.root / "dev"
        devices.mkdir(exist_ok=True)
        try:
            for index in range(GPU_COUNT):
                os.mknod(devices / f"gpu{index}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            return None
        return devices

    def _write_config(self):
        etc = self.root / "etc"
        for sub in ("etc", "state", f"spool/{self.node}", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        devices = self._gpu_devices()
        self.gpus = GPU_COUNT if devices else 0
        gres = f"dcu:{DCU_COUNT}" + (f",gpu:{GPU_COUNT}" if devices else "")
        ctld_port, slurmd_port = _free_port(), _free_port()
        (etc / "slurm.conf").write_text(f"""\
# Written by tests/slurm_cluster.py: a throwaway single-node cluster.
ClusterName=sdtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.root}/munge/munge.socket
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/{self.node}
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=dcu,gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
MinJobAge=600
KillWait=2
OverTimeLimit=0
InactiveLimit=0
MessageTimeout=5
SlurmctldTimeout=10
SlurmdTimeout=30
MaxArraySize=1001
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory=1000 Gres={gres} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        (etc / "gres.conf").write_text(
            f"Name=dcu Count={DCU_COUNT} Flags=CountOnly\n"
            + (f"Name=gpu File={devices}/gpu[0-{GPU_COUNT - 1}]\n" if devices else ""))
        module = self.modules / f"{DTK_MODULE}.lua"
        module.parent.mkdir(parents=True, exist_ok=True)
        module.write_text(f"""\
-- Test stand-in for the DTK 22.10.1 module of a DCU cluster (tests/slurm_cluster.py).
whatis("DTK 22.10.1 test module")
setenv("DTK_TEST_LOADED", "1")
setenv("ROCM_PATH", "{self.root}/dtk-22.10.1")
""")

    # --- daemons ---------------------------------------------------------------------
    def _start_munge(self):
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755, exist_ok=True)
        key = munge_dir / "munge.key"
        subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], check=True,
                       capture_output=True)
        key.chmod(0o600)
        munge = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self._spawn("munged", [_tool("munged"), "--foreground", "--force",
                               f"--socket={munge_dir}/munge.socket",
                               f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
                               f"--log-file={munge_dir}/munged.log",
                               f"--seed-file={munge_dir}/munged.seed"], user="munge")
        self._wait_for(lambda: (munge_dir / "munge.socket").exists(), "munged's socket")

    def _spawn(self, name, argv, user=None):
        log = open(self.root / "log" / f"{name}.out", "ab")
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.processes[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                env=env, user=user, start_new_session=True,
                                                preexec_fn=_die_with_parent)
        log.close()

    def _wait_for(self, ready, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting "
                                       f"for {what}; logs in {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}; logs in {self.root / 'log'}")

    def scontrol(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("scontrol"), *args], capture_output=True, text=True,
                              env=dict(os.environ, **self.env))

    def _node_idle(self) -> bool:
        out = self.scontrol("show", "node", self.node, "-o").stdout
        return "State=IDLE" in out

    def start(self) -> "SlurmCluster":
        self._write_config()
        try:
            self._start_munge()
            self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait_for(lambda: self.scontrol("ping").returncode == 0, "slurmctld")
            self._spawn("slurmd", [_tool("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait_for(self._node_idle, f"node {self.node} to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _cancel_jobs(self, timeout=15.0):
        """Cancel what is still queued or running: slurmstepd and job processes outlive slurmd."""
        def jobs():
            done = subprocess.run([_tool("squeue"), "-h", "-o", "%A"], capture_output=True,
                                  text=True, env=dict(os.environ, **self.env))
            return sorted(set(done.stdout.split())) if done.returncode == 0 else []
        pending = jobs()
        if pending:
            subprocess.run([_tool("scancel"), *pending], capture_output=True,
                           env=dict(os.environ, **self.env))
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            time.sleep(0.2)
            pending = jobs()

    def stop(self):
        """Cancel leftover jobs, then end every daemon this cluster started, by PID, newest first."""
        alive = [name for name, proc in self.processes.items() if proc.poll() is None]
        if {"slurmctld", "slurmd"} <= set(alive):
            self._cancel_jobs()
        for name, proc in reversed(list(self.processes.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes.clear()

    def remove(self):
        shutil.rmtree(self.root, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so `kill PID` also stops the daemons
    cluster = SlurmCluster().start()
    print("cluster up; in another shell:")
    for key, value in cluster.env.items():
        print(f"  export {key}={value}")
    print(f"  source {LMOD_INIT}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        cluster.remove()
