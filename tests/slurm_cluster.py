"""A real two-node Slurm cluster on this one machine, started and stopped by our own code (no systemd).

Debian's slurmctld, slurmd, slurm-client and munge packages provide the binaries (`make test` installs them
when missing). Everything lives under one folder: slurm.conf, the munge key, socket and logs, the
controller's state, one spool folder per node, the daemons' logs and pid files. One munged (its own socket,
named to Slurm by `AuthInfo=socket=...`), one slurmctld and two slurmd started with `-N n1` / `-N n2`, both
nodes at NodeAddr 127.0.0.1 on their own port, in one partition (`lab`). Clients need only `SLURM_CONF`
(see `env()`); no machine-wide configuration is read or written.

    cluster = SlurmCluster(Path("/tmp/x")).start()   # returns once `sinfo` shows both nodes idle
    subprocess.run(["sbatch", ...], env=cluster.env())
    cluster.stop()                                     # no daemon, slurmstepd or job process outlives it

The daemons run in their own sessions, so the cluster outlives the process that started it (`make
slurm-dev`); `stop()` finds them again from the pid files under the folder, and the slurmstepd and job
processes from their working folder (slurmd's, under ours) and the jobs' SLURM_CONF.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

try:
    import pytest
except ImportError:  # `make slurm-dev` runs this module with the app's requirements only (no pytest)
    pytest = None

PARTITION = "lab"
NODES = ("n1", "n2")
DAEMONS = ("slurmctld", "slurmd", "munged")
BINARIES = ("slurmctld", "slurmd", "munged", "sinfo", "sbatch", "srun", "scancel", "squeue", "scontrol")
MARKER = "LAB_SLURM_CLUSTER"  # set in the daemons' environment: the cluster's folder


def missing_binaries() -> list[str]:
    """The Slurm/munge commands not found on PATH (with /usr/sbin added: Debian puts the daemons there)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    return [name for name in BINARIES if not shutil.which(name, path=path)]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
    if not found:
        raise RuntimeError(f"{name} not found: install Debian's slurmctld slurmd slurm-client munge (make test does)")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


class SlurmCluster:
    """Two slurmd (n1, n2), one slurmctld and one munged, all under `root`."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root).resolve()
        self.cpus = max(2, cpus or os.cpu_count() or 2)
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.spool_dir = self.root / "spool"
        self.pids_file = self.root / "pids.json"
        self.ports_file = self.root / "ports.json"
        self.partition = PARTITION
        self.nodes = NODES
        self._popen: list[subprocess.Popen] = []  # the daemons this process started (reaped on stop)

    # ----- what clients need
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for Slurm clients (sinfo, sbatch, srun, ...) talking to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_"))]:
            if name != "SLURM_CONF":
                del env[name]  # a job's own variables (pytest run inside an allocation) must not leak in
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
        return env

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; its output as text."""
        return subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=timeout, check=check)

    def node_states(self) -> dict[str, str]:
        """{node: state} from `sinfo -h -o "%n %t"` (e.g. {"n1": "idle", "n2": "alloc"}); {} if it fails."""
        try:
            out = self.run("sinfo", "-h", "-N", "-o", "%n %t", timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if out.returncode != 0:
            return {}
        states = {}
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    # ----- start
    def _ports(self) -> dict[str, int]:
        """The controller's and each node's port: the previous start's where still free, else new free ones."""
        try:
            ports = json.loads(self.ports_file.read_text())
            if set(ports) == {"slurmctld", *self.nodes} and all(_port_free(p) for p in ports.values()):
                return ports
        except (OSError, ValueError):
            pass
        ports = dict(zip(["slurmctld", *self.nodes], _free_ports(1 + len(self.nodes)), strict=True))
        self.ports_file.write_text(json.dumps(ports))
        return ports

    def _write_conf(self, ports: dict[str, int]) -> None:
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={n} Port={ports[n]} CPUs={self.cpus} State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            f"""# Written by tests/slurm_cluster.py: a two-node cluster on one machine, all under {self.root}
ClusterName=lab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports[self.nodes[0]]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.state_dir}
SlurmdSpoolDir={self.spool_dir}/%n
SlurmctldPidFile={self.run_dir}/slurmctld.pid
SlurmdPidFile={self.run_dir}/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
MailProg=/bin/true
KillWait=5
Waittime=0
{nodes}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )

    def _spawn(self, name: str, argv: list[str]) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env[MARKER] = str(self.root)
        out = open(self.log_dir / f"{name}.out", "ab")  # the daemon's stderr: it keeps its own copy open
        try:
            proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=self.root, start_new_session=True
            )
        finally:
            out.close()
        self._popen.append(proc)
        pids = self._read_pids()
        pids[name] = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time()}
        self.pids_file.write_text(json.dumps(pids))
        return proc.pid

    def _start_munged(self) -> None:
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chmod(self.munge_dir, 0o755)  # munged wants its socket's folder searchable by every client
        self.munge_socket.unlink(missing_ok=True)  # a stale socket of a killed munged would pass for ready
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.munge_dir / 'munged.pid'}",
                f"--log-file={self.log_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
        )
        self._wait(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")

    def start(self, timeout: float = 30) -> SlurmCluster:
        """Start munged, slurmctld and both slurmd; return once `sinfo` shows both nodes idle.

        A cluster already running under this folder is left as it is (start is idempotent).
        """
        if self.running():
            self._wait_idle(timeout)
            return self
        self.stop()  # leftovers of a half-dead cluster (one daemon died): start from nothing running
        if len(str(self.munge_socket)) > 100:
            raise RuntimeError(f"cluster folder too deep for a unix socket path: {self.munge_socket}")
        for d in (self.root, self.munge_dir, self.log_dir, self.run_dir, self.state_dir, self.spool_dir):
            d.mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.spool_dir / n).mkdir(exist_ok=True)
        self._write_conf(self._ports())
        try:
            self._start_munged()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for n in self.nodes:
                self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [name for name, proc in self._daemons().items() if proc is None]
            if dead:
                raise RuntimeError(f"Slurm cluster under {self.root}: {what}; {', '.join(dead)} exited\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"Slurm cluster under {self.root}: {what} within {timeout:.0f} s\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        """Both nodes idle, or (a restart that recovered running jobs) responding and in use."""

        def ready() -> bool:
            states = self.node_states()
            return all(states.get(n) in ("idle", "mix", "alloc", "comp") for n in self.nodes)

        self._wait(ready, timeout, f"nodes {', '.join(self.nodes)} not idle in `sinfo`")

    def logs(self, tail: int = 25) -> str:
        """The last lines of every daemon's log (for error messages).

        A daemon's `.out` (its stderr) is shown only while it has no `.log`: before it opens its log file
        (a bad slurm.conf, a missing plugin) the reason is there, afterwards it repeats the log."""
        parts = []
        paths = sorted(self.log_dir.glob("*")) if self.log_dir.exists() else []
        for path in paths:
            if path.suffix == ".out" and path.with_suffix(".log") in paths:
                continue
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            if lines:
                parts.append(f"--- {path}\n" + "\n".join(lines))
        states = self.node_states() if self.conf.exists() else {}
        parts.append(f"--- sinfo: {states or 'no answer'}")
        return "\n".join(parts)

    # ----- processes
    def _read_pids(self) -> dict[str, dict]:
        try:
            return json.loads(self.pids_file.read_text())
        except (OSError, ValueError):
            return {}

    def _daemons(self) -> dict[str, psutil.Process | None]:
        """{name: process or None if gone} for every daemon recorded in the pid file."""
        found = {}
        for name, rec in self._read_pids().items():
            try:
                proc = psutil.Process(rec["pid"])
                alive = proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - rec["create_time"]) < 1
                found[name] = proc if alive else None
            except psutil.Error:
                found[name] = None
        return found

    def running(self) -> bool:
        """True while munged, slurmctld and both slurmd of this folder are alive."""
        daemons = self._daemons()
        expected = {"munged", "slurmctld", *(f"slurmd-{n}" for n in self.nodes)}
        return expected <= set(daemons) and all(daemons[name] is not None for name in expected)

    def _ours(self, stepd: psutil.Process) -> bool:
        """Whether a slurmstepd belongs to this cluster: its working folder (slurmd's) or a log it writes is
        under ours. (Its environment cannot tell: slurmstepd writes its title over it.)"""
        prefix = str(self.root) + os.sep
        try:
            if (stepd.cwd() + os.sep).startswith(prefix) or _environ(stepd).get(MARKER) == str(self.root):
                return True
            return any(f.path.startswith(prefix) for f in stepd.open_files())
        except (psutil.Error, OSError):
            return False

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the daemons, slurmstepd (see `_ours`), the jobs' processes
        (their SLURM_CONF is ours and they carry a SLURM_JOB_ID), and all their descendants."""
        found: dict[int, psutil.Process] = {p.pid: p for p in self._daemons().values() if p is not None}
        conf = str(self.conf)
        for proc in psutil.process_iter(["name"]):
            if proc.pid in found or proc.pid == os.getpid():
                continue
            if proc.info["name"] == "slurmstepd":
                if self._ours(proc):
                    found[proc.pid] = proc
                continue
            env = _environ(proc)
            if env.get(MARKER) == str(self.root) or (env.get("SLURM_CONF") == conf and "SLURM_JOB_ID" in env):
                found[proc.pid] = proc
        for proc in list(found.values()):
            try:
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
            except psutil.Error:
                pass
        return [proc for proc in found.values() if _alive(proc)]

    def jobs(self) -> dict[str, str]:
        """{job id: state} of every job slurmctld still knows (finished ones for MinJobAge, 300 s)."""
        out = self.run("squeue", "-h", "-t", "all", "-o", "%i %T", timeout=10, check=False)
        return dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())

    def wait_job(self, job_id: str | int, timeout: float = 60) -> str:
        """Wait until a job has ended; its final state (COMPLETED, FAILED, CANCELLED, ...).

        Polls squeue every 0.2 s (`sbatch --wait` polls every few seconds, too slowly for tests)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.jobs().get(str(job_id), "UNKNOWN")
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "UNKNOWN"):
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def cancel_all(self, timeout: float = 10) -> None:
        """scancel every job of the partition and wait (up to `timeout`) until none is active."""
        try:
            self.run("scancel", "-p", self.partition, timeout=10, check=False)
            deadline = time.monotonic() + timeout
            active = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED")
            while time.monotonic() < deadline and any(s in active for s in self.jobs().values()):
                time.sleep(0.2)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def stop(self, grace: float = 5) -> None:
        """Stop every process of the cluster: its jobs cancelled (then slurmstepd and whatever of the jobs is
        left killed), the daemons sent TERM, then KILL after `grace`.

        The folder stays (a later start reuses its state and ports); nothing of the cluster keeps running.
        """
        daemons = {name: proc for name, proc in self._daemons().items() if proc is not None}
        if "slurmctld" in daemons and self.conf.exists():
            self.cancel_all(grace)  # so the saved state a later start recovers has no job left running
        daemon_pids = {p.pid for p in daemons.values()}
        for name in ("slurmctld", "munged"):  # their helpers (slurmscriptd) are theirs to end on TERM
            try:
                daemon_pids |= {c.pid for c in daemons[name].children(recursive=True)} if name in daemons else set()
            except psutil.Error:
                pass
        others = [p for p in self.processes() if p.pid not in daemon_pids]
        for proc in others:  # slurmstepd and the jobs: nothing to save
            try:
                proc.kill()
            except psutil.Error:
                pass
        # slurmd first (so none re-registers), then the controller, then munge
        order = [f"slurmd-{n}" for n in self.nodes] + ["slurmctld", "munged"]
        procs = [daemons[name] for name in order if name in daemons]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        psutil.wait_procs(procs + others, timeout=grace)
        for _ in range(3):  # KILL what is left, including anything the cluster started meanwhile
            left = [p for p in procs if _alive(p)] + self.processes()
            if not left:
                break
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=5)
        for popen in self._popen:
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._popen.clear()
        try:
            self.pids_file.unlink()
        except FileNotFoundError:
            pass


if pytest is not None:

    @pytest.fixture(scope="session")
    def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
        """One two-node cluster (n1, n2; partition `lab`) for the test session, stopped at its end.

        Skips only when the Slurm or munge binaries are missing (`make test` installs them). A test module
        uses it with `pytest_plugins = ["tests.slurm_cluster"]`; give subprocesses `slurm_cluster.env()`.
        A test cancels the jobs it submits (or calls `cancel_all()`) so the next one finds both nodes idle.
        """
        missing = missing_binaries()
        if missing:
            pytest.skip(
                f"Slurm binaries missing ({', '.join(missing)}): `make test` installs Debian's slurmctld slurmd slurm-client munge"
            )
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        cluster.start()
        yield cluster
        cluster.stop()
