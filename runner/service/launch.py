"""torchrun's command line and environment, and the process-group primitives every local stop uses.

The runner starts a local job through runner.service.launchers.local (the Job handle, the rank pids, cancel:
SIGTERM, grace, SIGKILL); the Slurm backend (runner.service.launchers.slurm) renders the same torchrun command
into its sbatch script. What lives here is shared: `torchrun_argv` (the exact command, which the launch
page previews), `job_env`, `die_with_launcher` (called first in every rank: PR_SET_PDEATHSIG, so the
kernel SIGKILLs a rank whose torchrun died), and `group_alive` / `terminate_group` / `kill_group` /
`stop_group` on a process group (torchrun runs in a session of its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from runner.spec.run_spec import RunSpec

REPO_ROOT = Path(__file__).resolve().parents[2]  # runner/service/launch.py
# torchrun's own wait between SIGTERM and SIGKILL for its ranks (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torch's
# default is 30 s). The runner's SIGKILL comes only after this, so torchrun can stop its ranks itself.
TORCHRUN_SHUTDOWN_S = 10
JOB_ENTRY = ("-m", "runner.job")
_PR_SET_PDEATHSIG = 1


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


def job_env(spec: RunSpec, gpus: list[str]) -> dict[str, str]:
    """The job's environment: the runner's own, with its GPUs named by UUID ([] for a CPU run)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(TORCHRUN_SHUTDOWN_S)
    if gpus:
        # By UUID: an index means whatever the CUDA order and the runner's own inherited CUDA_VISIBLE_DEVICES make
        # it mean (an inherited "4,5" renumbers them 0,1), a UUID names one device everywhere. cuda:i is the i-th.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    else:
        # Each rank is one process on a shared CPU: one intra-op thread each avoids oversubscription,
        # whatever the user's shell had set. No GPU is visible, so a CPU run never takes GPU memory.
        env["OMP_NUM_THREADS"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


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
