"""Starting and stopping a job: torchrun in its own process session, cancelled as a whole.

Stop = SIGTERM to the whole process group, a grace period, then SIGKILL (as TorchX's local
scheduler and Ray's job supervisor do). Liveness is checked by process group, so a job keeps being
watched after the runner restarts, and the runner never needs to be the job's parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from runner.spec import RunSpec, torchrun_argv

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    run_id: int
    pid: int  # torchrun's pid, which is also the process group id (start_new_session)
    run_dir: Path
    popen: subprocess.Popen | None = None  # None for a job adopted after a runner restart

    def returncode(self) -> int | None:
        """Exit status once torchrun is gone (None while it runs; -1 if adopted and not ours to reap)."""
        if self.popen is not None:
            return self.popen.poll()
        return None if group_alive(self.pid) else -1


def job_env(spec: RunSpec, gpus: list[int]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
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


def start_job(run_id: int, spec: RunSpec, run_dir: Path, gpus: list[int]) -> Job:
    """Spawn torchrun for `spec` (spec.json must already be in run_dir); stdout+stderr -> torchrun.log."""
    argv = torchrun_argv(spec, str(run_dir / "spec.json"))
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
