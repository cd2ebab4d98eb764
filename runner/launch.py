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
    # Each rank is one process on a shared CPU: one intra-op thread each avoids oversubscription.
    env.setdefault("OMP_NUM_THREADS", "1")
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
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
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pgid: int, grace_s: float = 5.0, popen: subprocess.Popen | None = None) -> None:
    """SIGTERM the whole group, wait up to grace_s, then SIGKILL whatever is left."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()
        if not group_alive(pgid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if popen is not None:
        popen.wait(timeout=5)
