"""A real single-node Slurm cluster (munge + slurmctld + slurmd) and Lmod, on loopback.

The slurm tests drive Debian's `slurm-wlm` (22.05) for real: this module writes a
slurm.conf for one node named after this host (32 CPUs declared with
`config_overrides`, so the seed's `-n 16` fits on a 2-core CI machine beside a
long-running test job; `Gres=dcu:2` as a count-only generic resource, and
`gpu:2` on device nodes made with mknod, so Slurm's gpu plugin exports
CUDA_VISIBLE_DEVICES as on a CUDA site), starts `munged` as the munge user with
its own key, socket and PID file, then `slurmctld` and `slurmd` in the foreground, each
on a free loopback port, all state under one temporary folder. By default no
accounting daemon: `sacct` does not work, which is how most test clusters and some
sites look, so the poller under test must work from `scontrol`. `MinJobAge` keeps
finished jobs visible to `scontrol` for 10 minutes.

`SlurmCluster(accounting=True)` adds real accounting: a private MariaDB (its own
datadir made by mariadb-install-db, its own socket, TCP on 127.0.0.1 at a free
port, run as the mysql user; never the system service), `slurmdbd` on loopback
storing into it, `AccountingStorageType=accounting_storage/slurmdbd`, the cluster,
an account and root registered with `sacctmgr`, and `jobacct_gather/linux` with
memory as a consumable resource (20 MB per CPU unless asked); where the machine has
cgroup v1's memory controller, `task/cgroup` with `ConstrainRAMSpace`, so a job over
its `--mem` is killed by the kernel and ends OUT_OF_MEMORY as on a site
(`oom_enforced`). Job ids start at a random `FirstJobId`, so two such clusters on
one machine never share a cgroup path.
`min_job_age` short (2 s) makes `scontrol` forget finished jobs quickly, so the
end state can only come from `sacct`.

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
import random
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
ACCOUNTING_TOOLS = ("slurmdbd", "sacctmgr", "sacct", "mariadbd", "mariadb-install-db", "mariadb")
LMOD_INIT = Path("/usr/share/lmod/lmod/init/bash")
DTK_MODULE = "compiler/rocm/dtk-22.10.1"
NODE_CPUS = 32
DCU_COUNT = 2
GPU_COUNT = 2


def missing_requirements(accounting: bool = False) -> list[str]:
    """What this machine lacks to run the cluster: programs, Lmod, root (slurmd starts each
    job as its user, and munged runs as the munge user)."""
    tools = TOOLS + (ACCOUNTING_TOOLS if accounting else ())
    missing = [tool for tool in tools if not shutil.which(tool)
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



def _cgroup_v1_memory() -> bool:
    """Whether cgroup v1's memory controller is mounted writable (task/cgroup can then
    confine a job's memory, and the kernel's OOM kill marks it OUT_OF_MEMORY)."""
    memory = Path("/sys/fs/cgroup/memory")
    return (memory / "memory.limit_in_bytes").exists() and os.access(memory, os.W_OK)


def _die_with_parent():
    """A test run killed outright (SIGKILL, a CI timeout) runs no finalizer: the kernel
    then ends the daemons it started (PR_SET_PDEATHSIG), so none outlives the run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

class SlurmCluster:
    """One munged, one slurmctld, one slurmd (with accounting: a MariaDB and a slurmdbd);
    everything under `root`."""

    def __init__(self, root: Path | None = None, accounting: bool = False,
                 min_job_age: int = 600):
        self.accounting = accounting
        self.min_job_age = min_job_age
        self.oom_enforced = accounting and _cgroup_v1_memory()
        self.first_job_id = random.randrange(100_000, 50_000_000) if accounting else 1
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
        accounting = (f"""\
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self._write_dbd_config()}
AccountingStoragePass={self.root}/munge/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
DefMemPerCPU=20
FirstJobId={self.first_job_id}
""" if self.accounting else """\
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
""")
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
TaskPlugin={"task/cgroup" if self.oom_enforced else "task/none"}
SelectType=select/cons_tres
SelectTypeParameters={"CR_Core_Memory" if self.accounting else "CR_Core"}
SlurmdParameters=config_overrides
GresTypes=dcu,gpu
{accounting}JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
MinJobAge={self.min_job_age}
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
        if self.oom_enforced:
            (etc / "cgroup.conf").write_text(
                "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nConstrainRAMSpace=yes\n"
                "ConstrainSwapSpace=yes\nAllowedSwapSpace=0\n")
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

    def _write_dbd_config(self) -> int:
        """slurmdbd.conf beside slurm.conf (where slurmdbd looks for it); returns its port."""
        self.db_port, self.db_password = _free_port(), os.urandom(12).hex()
        dbd_port = _free_port()
        dbd_conf = self.root / "etc" / "slurmdbd.conf"
        dbd_conf.write_text(f"""\
# Written by tests/slurm_cluster.py: accounting into a private MariaDB on loopback.
AuthType=auth/munge
AuthInfo=socket={self.root}/munge/munge.socket
DbdAddr=127.0.0.1
DbdHost={self.node}
DbdPort={dbd_port}
SlurmUser=root
PidFile={self.root}/slurmdbd.pid
LogFile={self.root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.db_port}
StorageUser=slurm
StoragePass={self.db_password}
StorageLoc=slurm_acct_db
""")
        dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read
        return dbd_port

    # --- daemons ---------------------------------------------------------------------
    def _start_mariadb(self):
        """A MariaDB of its own: datadir, socket and port here, run as the mysql user; then
        the user slurmdbd connects as (over 127.0.0.1, with a random password)."""
        base = self.root / "mariadb"
        data, self.db_socket = base / "data", base / "mariadb.sock"
        data.mkdir(parents=True)
        mysql = pwd.getpwnam("mysql")
        os.chown(base, mysql.pw_uid, mysql.pw_gid)
        subprocess.run([_tool("mariadb-install-db"), "--no-defaults", f"--datadir={data}",
                        "--user=mysql", "--auth-root-authentication-method=socket",
                        "--skip-test-db"], check=True, capture_output=True)
        self._spawn("mariadbd", [_tool("mariadbd"), "--no-defaults", f"--datadir={data}",
                                 f"--socket={self.db_socket}", f"--port={self.db_port}",
                                 "--bind-address=127.0.0.1", f"--pid-file={base}/mariadb.pid",
                                 f"--log-error={base}/error.log", "--skip-log-bin",
                                 "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M",
                                 "--innodb-flush-log-at-trx-commit=0", "--innodb-lock-wait-timeout=900"],
                    user="mysql")
        self._wait_for(lambda: self._sql("SELECT 1").returncode == 0, "mariadbd")
        done = self._sql(f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}'; "
                         "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';")
        if done.returncode != 0:
            raise RuntimeError(f"creating the slurm database user failed: {done.stderr}")

    def _sql(self, statement: str) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("mariadb"), "--no-defaults", f"--socket={self.db_socket}",
                               "-u", "root", "-e", statement], capture_output=True, text=True)

    def sacctmgr(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([_tool("sacctmgr"), "-i", *args], capture_output=True, text=True,
                              env=dict(os.environ, **self.env))

    def _start_accounting(self):
        self._start_mariadb()
        self._spawn("slurmdbd", [_tool("slurmdbd"), "-D"])
        self._wait_for(lambda: self.sacctmgr("show", "cluster").returncode == 0, "slurmdbd")
        for args in (("add", "cluster", "sdtest"), ("add", "account", "sdtest", "cluster=sdtest"),
                     ("add", "user", "root", "account=sdtest", "cluster=sdtest")):
            done = self.sacctmgr(*args)
            if done.returncode != 0 and "Nothing new added" not in done.stdout + done.stderr:
                raise RuntimeError(f"sacctmgr {' '.join(args)} failed: {done.stdout}{done.stderr}")

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
            if self.accounting:
                self._start_accounting()
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
            self._cancel_jobs()  # (slurmctld, stopped before slurmdbd, hands it the last records)
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
