"""A throwaway SLURM cluster on this machine: munged, slurmctld and two slurmd ("node1", "node2") on
one host with their own ports, NodeAddr=127.0.0.1, every state file in one temporary directory.

Needs root (slurmd starts jobs as their owner) and Debian's packages: slurmctld, slurmd, slurm-client,
munge. `LocalCluster(root).start()` returns once `sinfo` shows both nodes idle; `stop()` kills every
daemon it started (by pid) and is safe to call twice.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
INSTALL_HINT = ("apt-get install -y slurmctld slurmd slurm-client munge (Debian/Ubuntu; as root) "
                "enables the SLURM tests")


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None]
    if absent:
        return f"SLURM test cluster needs {', '.join(absent)}: {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd runs the jobs as their owner)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"no 'munge' user: {INSTALL_HINT}"
    if not Path("/etc/munge/munge.key").is_file():
        return f"no /etc/munge/munge.key: {INSTALL_HINT}"
    return None


def _free_ports(n: int, consecutive: bool = False) -> list[int]:
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        ports = list(range(base, base + n)) if consecutive else [base]
        ok = True
        for p in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return ports
    raise RuntimeError("no free ports")


def _sbin(name: str) -> str:
    return shutil.which(name) or name


class LocalCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int | None = None):
        self.root = Path(root).resolve()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus or os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # ---------------------------------------------------------------- setup
    def _write_conf(self) -> None:
        host = socket.gethostname()
        ctld_port = _free_ports(1)[0]
        node_ports = _free_ports(len(self.nodes), consecutive=True)
        for d in ("state", "spool", "log", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=lor2ctest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=15
InactiveLimit=0
MinJobAge=3600
Waittime=0
MessageTimeout=20
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={','.join(self.nodes)} NodeHostname={host} NodeAddr=127.0.0.1 Port=[{node_ports[0]}-{node_ports[-1]}] CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        d = self.munge_socket.parent
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        key = d / "munge.key"
        shutil.copyfile("/etc/munge/munge.key", key)
        key.chmod(0o400)
        for p in (d, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        # munged (user munge) must traverse our directory, which must not be group/world-writable
        self.root.chmod(0o755)
        cmd = [_sbin("munged"), "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
               f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"]
        self._spawn(cmd, "munged", user=munge.pw_uid, group=munge.pw_gid)
        self._wait(lambda: self.munge_socket.exists(), 20, "munged socket")

    def _spawn(self, cmd: list[str], name: str, **kw) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, env=self.env, **kw))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode} while waiting for {what}; "
                                       f"logs in {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{what} not ready after {timeout}s; logs in {self.root / 'log'}")

    def start(self, timeout: float = 60) -> "LocalCluster":
        self._write_conf()
        try:
            self._start_munge()
            self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
            self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld")
            for node in self.nodes:
                self._spawn([_sbin("slurmd"), "-D", "-N", node, "-f", str(self.conf)], f"slurmd.{node}")
            self._wait(self._all_idle, timeout, "idle nodes")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def stop(self) -> None:
        """Cancel every job, kill what start() spawned (newest first), then any process left that was
        started for this cluster (its environment names our slurm.conf). Safe to call twice."""
        if self.procs and self.run("scontrol", "ping", check=False).returncode == 0:
            self.run("scancel", "--full", "--quiet", "--user=root", check=False)
            deadline = time.monotonic() + 20
            while self.run("squeue", "-h", "-t", "R,CG", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs.clear()
        for pid in _pids_started_for(self.conf):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # ---------------------------------------------------------------- clients
    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        proc = subprocess.run([_sbin(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=60,
                              env={**self.env, **(env or {})}, cwd=cwd)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> int:
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) "
                                   f"after {timeout}s, waiting for {states}")
            time.sleep(0.5)


def _pids_started_for(conf: Path) -> list[int]:
    """Processes whose environment holds SLURM_CONF=<conf>: daemons, slurmstepd, job processes."""
    marker = f"SLURM_CONF={conf}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            pids.append(int(proc.name))
    return pids
