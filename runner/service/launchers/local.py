"""The local backend: torchrun on this machine, in a process session of its own, and every rank it starts.

torchrun starts each rank in a session of its own, so a signal to torchrun's process group never
reaches the ranks. A job therefore belongs to its run by two means: each rank asks the kernel to
SIGKILL it when torchrun dies (runner.service.launch.die_with_launcher, PR_SET_PDEATHSIG), and the runner
records every rank pid (torchrun's children, and the pid each rank reports in its `started` event)
with its start time, so it can signal the ranks directly and tell whether the last of them is gone,
also after a runner restart (the handle is rebuilt from runs.pid and runs.rank_pids). Cancel =
SIGTERM to torchrun and every rank, then SIGKILL once torchrun's own grace (TORCHRUN_SHUTDOWN_S)
has passed, as TorchX's local scheduler and Ray's job supervisor do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from runner.service.launch import (
    JOB_ENTRY,
    REPO_ROOT,
    TORCHRUN_SHUTDOWN_S,
    group_alive,
    job_env,
    kill_group,
    terminate_group,
    torchrun_argv,
    torchrun_launcher,
)
from runner.service.launchers.base import Collected, JobState, read_result, run_logs
from runner.service.telemetry import Sampler
from runner.spec.run_spec import RunSpec, SpecProblem

# SIGKILL only after torchrun had its own grace to stop its ranks (it SIGKILLs them after TORCHRUN_SHUTDOWN_S).
CANCEL_GRACE_S = TORCHRUN_SHUTDOWN_S + 5.0
ORPHAN_GRACE_S = 5.0  # ranks left after torchrun exited: SIGTERM, then SIGKILL this much later


@dataclass
class Job:
    """The local handle: torchrun's pid (also its process group id) and every rank pid seen."""

    run_id: int
    pid: int  # torchrun's pid, which is also the process group id (start_new_session)
    run_dir: Path
    popen: subprocess.Popen | None = None  # None for a job adopted after a runner restart
    ranks: dict[int, float] = field(default_factory=dict)  # rank pid -> its start time (psutil create_time)
    kill_at: float | None = None  # once cancel() sent SIGTERM: the monotonic time SIGKILL follows
    backend = "local"

    @property
    def job_id(self) -> str:
        return str(self.pid) if self.pid else ""

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


def start_job(run_id: int, spec: RunSpec, run_dir: Path, gpus: list[str], entry: Sequence[str] = JOB_ENTRY) -> Job:
    """Spawn torchrun for `spec` (spec.json must already be in run_dir) on the GPUs of these UUIDs ([] on CPU);
    stdout+stderr -> torchrun.log.

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


class LocalLauncher:
    """torchrun on this machine; the runner places runs on this machine's free GPUs or CPU slots."""

    backend = "local"
    submit_failure = "could not start torchrun"
    places_locally = True

    def __init__(self, entry: Sequence[str] = JOB_ENTRY):
        self.entry: tuple[str, ...] = tuple(entry)

    def submit(self, run_id: int, spec: RunSpec, run_dir: Path, gpus: list[str]) -> Job:
        return start_job(run_id, spec, run_dir, gpus, entry=self.entry)

    def attach(self, run_id: int, row: dict[str, Any]) -> Job:
        """The handle of a run a runner (maybe an earlier one) started: its stored torchrun pid and rank pids."""
        pid = row.get("pid") or 0
        return Job(run_id=run_id, pid=int(pid), run_dir=Path(row.get("run_dir") or "."),
                   ranks=ranks_from_doc(row.get("rank_pids")))  # fmt: skip

    def record(self, job: Job) -> dict[str, Any]:
        return {"pid": job.pid, "rank_pids": job.rank_pids_doc(), "backend_job_id": job.job_id}

    def track(self, job: Job) -> None:
        job.discover_ranks()

    def poll(self, job: Job) -> JobState:
        code = job.returncode()
        return JobState(code, lingering=code is not None and bool(job.live_ranks()))

    def cancel(self, job: Job) -> None:
        """SIGTERM to torchrun (it stops its ranks, SIGKILL after its own grace) and to every rank (each in its
        own session, out of torchrun's group); SIGKILL on a later call once the grace has passed, and again
        ORPHAN_GRACE_S later if something is still left. Never blocks."""
        now = time.monotonic()
        running = job.returncode() is None
        if job.kill_at is None:
            if running:
                terminate_group(job.pid)
            job.signal_ranks(signal.SIGTERM)
            job.kill_at = now + (CANCEL_GRACE_S if running else ORPHAN_GRACE_S)
        elif now >= job.kill_at:
            if running:
                kill_group(job.pid)
            job.signal_ranks(signal.SIGKILL)
            job.kill_at = now + ORPHAN_GRACE_S

    def logs(self, job: Job) -> list[str]:
        return run_logs(job.run_dir)

    def collect(self, job: Job) -> Collected:
        code = job.returncode()
        if job.kill_at is not None:
            kill_group(job.pid)  # stopped: take anything left in torchrun's group along
        return read_result(job.run_dir, -1 if code is None else code)

    def sampler(self, job: Job, started: float, gpus: list[str]) -> Sampler:
        """NVML by UUID for the run's GPUs (named gpu<its CUDA index in the job>), else psutil per rank."""
        return Sampler(job.pid, started, gpu_uuids=gpus)

    def problems(self, spec: RunSpec) -> list[SpecProblem]:
        """Only what is particular to this machine's launcher (GPUs, cores and memory: the spec's own validation).

        api.submit refuses nodes for a machine already; a run queued for a host that had not reported yet (or by
        an older client) is refused here, not run on one machine as if it had its nodes."""
        if spec.nodes is not None:
            return [SpecProblem("nodes", f"nodes={spec.nodes} only apply to a Slurm partition: leave nodes empty for "
                                         "a machine's own runner, or send the run to a Slurm runner's host")]  # fmt: skip
        return []
