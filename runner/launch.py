"""Starting and stopping a job: torchrun in its own process session, and every rank it starts.

torchrun starts each rank in a session of its own, so a signal to torchrun's process group never
reaches the ranks. A job therefore belongs to its run by two means: each rank asks the kernel to
SIGKILL it when torchrun dies (`die_with_launcher`, PR_SET_PDEATHSIG), and the runner records every
rank pid (torchrun's children, and the pid each rank reports in its `started` event) with its start
time, so it can signal the ranks directly and tell whether the last of them is gone, also after a
runner restart. Stop = SIGTERM to torchrun and every rank, then SIGKILL once torchrun's own grace
(TORCHRUN_SHUTDOWN_S) has passed, as TorchX's local scheduler and Ray's job supervisor do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from runner.spec import RunSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
# torchrun's own wait between SIGTERM and SIGKILL for its ranks (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torch's
# default is 30 s). The runner's SIGKILL comes only after this, so torchrun can stop its ranks itself.
TORCHRUN_SHUTDOWN_S = 10
JOB_ENTRY = ("-m", "runner.job")
_PR_SET_PDEATHSIG = 1


@dataclass
class Job:
    run_id: int
    pid: int  # torchrun's pid, which is also the process group id (start_new_session)
    run_dir: Path
    popen: subprocess.Popen | None = None  # None for a job adopted after a runner restart
    ranks: dict[int, float] = field(default_factory=dict)  # rank pid -> its start time (psutil create_time)

    def returncode(self) -> int | None:
        """torchrun's exit status once it is gone (None while it runs; -1 if adopted and not ours to reap)."""
        if self.popen is not None:
            return self.popen.poll()
        return None if group_alive(self.pid) else -1

    def discover_ranks(self) -> bool:
        """Record torchrun's children (its ranks) while torchrun runs; True when one was new."""
        if self.returncode() is not None:
            return False  # an exited torchrun's pid may belong to someone else by now
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return False
        new = False
        for child in children:
            if child.pid not in self.ranks:
                try:
                    self.ranks[child.pid] = child.create_time()
                    new = True
                except psutil.Error:
                    continue
        return new

    def add_rank(self, pid: int, reported_at: float) -> bool:
        """Record a pid a rank reported itself (its `started` event); True when it was new and is alive.

        A process with that pid that started after the report is not the rank (the id was reused).
        """
        if pid in self.ranks or pid <= 1:
            return False
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            return False
        if created > reported_at + 1.0:
            return False
        self.ranks[pid] = created
        return True

    def live_ranks(self) -> list[int]:
        return [pid for pid, created in self.ranks.items() if rank_alive(pid, created)]

    def alive(self) -> bool:
        """True while torchrun or any recorded rank (or a process in a rank's group) still runs."""
        return self.returncode() is None or bool(self.live_ranks())

    def signal_ranks(self, sig: signal.Signals) -> int:
        """Send `sig` to each live rank's process group (a rank leads its own session); returns how many."""
        sent = 0
        for pid in self.live_ranks():
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                try:  # not a group leader (another launcher): the process itself
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
            except PermissionError:
                continue
            sent += 1
        return sent

    def rank_pids_doc(self) -> list[list[float]]:
        """The recorded ranks as stored in runs.rank_pids: [[pid, start time], ...]."""
        return [[pid, created] for pid, created in sorted(self.ranks.items())]


def ranks_from_doc(doc: list | None) -> dict[int, float]:
    return {int(pid): float(created) for pid, created in (doc or [])}


def rank_alive(pid: int, created: float) -> bool:
    """The rank with this pid and start time still runs, or a process of its group does.

    A process now holding the pid but started at another time means the id was reused, so the rank and
    its group are gone (Linux never hands out an id that a live group still uses).
    """
    if pid <= 1:
        return False
    try:
        proc = psutil.Process(pid)
        same = abs(proc.create_time() - created) < 1.0
        if same and proc.status() != psutil.STATUS_ZOMBIE:
            return True
        if not same:
            return False
    except psutil.NoSuchProcess:
        pass
    except psutil.Error:
        return True  # cannot look: assume it runs rather than free its devices early
    return group_alive(pid)


def die_with_launcher() -> None:
    """Called first in every rank: the kernel SIGKILLs this rank when torchrun, its parent, dies.

    torchrun puts each rank in a session of its own, so nothing else takes a rank down with a torchrun
    that was killed. Linux only (prctl); a no-op elsewhere or outside torchrun. torchrun may already
    be gone when this runs (the rank imports torch first): then the parent is no longer a torch launcher
    and the rank leaves at once.
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return
    try:
        parent = " ".join(psutil.Process(os.getppid()).cmdline())
    except psutil.Error:
        parent = ""
    if "torch" not in parent:
        print(f"the launcher is gone (parent is now {parent or os.getppid()!r}); exiting", file=sys.stderr, flush=True)
        os._exit(1)


def job_env(spec: RunSpec, gpus: list[int]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(TORCHRUN_SHUTDOWN_S)
    if gpus:
        # NVML numbers GPUs by PCI bus; make CUDA number them the same way so index g is the same device.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    else:
        # Each rank is one process on a shared CPU: one intra-op thread each avoids oversubscription,
        # whatever the user's shell had set. No GPU is visible, so a CPU run never takes GPU memory.
        env["OMP_NUM_THREADS"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def start_job(run_id: int, spec: RunSpec, run_dir: Path, gpus: list[int], entry: Sequence[str] = JOB_ENTRY) -> Job:
    """Spawn torchrun for `spec` (spec.json must already be in run_dir); stdout+stderr -> torchrun.log.

    `entry` is what torchrun runs per rank (runner.job; a test may give a script of its own).
    """
    spec_path = str(run_dir / "spec.json")
    argv = (
        torchrun_argv(spec, spec_path)
        if tuple(entry) == JOB_ENTRY
        else [*torchrun_launcher(spec.world_size), *entry, spec_path]
    )
    with open(run_dir / "torchrun.log", "ab") as log:
        popen = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=job_env(spec, gpus),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Job(run_id=run_id, pid=popen.pid, run_dir=run_dir, popen=popen)


def group_alive(pgid: int) -> bool:
    """True while any process of the group runs; a group of zombies waiting to be reaped counts as gone."""
    if pgid <= 0:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg succeeds on zombies too (an adopted job's torchrun is reaped by init, maybe late).
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (OSError, psutil.Error):
            continue
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send `sig` to the group; False when no process of it is left."""
    if pgid <= 0:  # never signal our own group (0) or every process (-1)
        return False
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def terminate_group(pgid: int) -> bool:
    """SIGTERM to torchrun and every rank (torchrun forwards it too); False when the group is gone."""
    return _signal_group(pgid, signal.SIGTERM)


def kill_group(pgid: int) -> bool:
    """SIGKILL whatever of the group is left; False when the group is gone."""
    return _signal_group(pgid, signal.SIGKILL)


def stop_group(pgid: int, grace_s: float = 5.0, popen: subprocess.Popen | None = None) -> None:
    """Blocking stop: SIGTERM the whole group, wait up to grace_s, then SIGKILL whatever is left."""
    if not terminate_group(pgid):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not group_alive(pgid):
            return
        time.sleep(0.1)
    if kill_group(pgid):
        if popen is not None:
            popen.wait(timeout=5)
        deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)


def torchrun_launcher(nproc: int, port: int = 0, python: str | None = None) -> list[str]:
    """torchrun for `nproc` local ranks, up to (not including) the entry point it should run.

    Port 0 (the runner's choice) lets the launcher bind its rendezvous store itself, so concurrent runs
    never race for a port between picking a free one and torchrun binding it. python: sys.executable.
    """
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--max-restarts", "0",
    ]  # fmt: skip


def torchrun_argv(spec: RunSpec, spec_path: str, port: int = 0, python: str | None = None) -> list[str]:
    """The exact command a run starts with (argv list, never a shell string); the launch page previews it."""
    return [*torchrun_launcher(spec.world_size, port, python), "-m", "runner.job", spec_path]
