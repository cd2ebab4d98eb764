"""The launcher interface: how the runner starts, watches, stops and collects a run on one backend.

A backend is where the rank processes run: "local" (torchrun on this machine, runner.service.launchers.local)
or "slurm" (one sbatch job with one torchrun per node, runner.service.launchers.slurm). The runner talks to
a `Launcher` only:

- `submit(run_id, spec, run_dir, gpus) -> handle`: start the job (spec.json is already in run_dir; gpus: the
  UUIDs of the GPUs the runner booked on this machine, [] on CPU or where a scheduler places the job);
  the handle carries the backend's job id (`handle.job_id`: torchrun's pid, or the Slurm job id);
- `record(handle)`: the columns to store so a restarted runner can find the job again, and
  `attach(run_id, row)`: the handle rebuilt from a stored run row (re-attach after a restart);
- `poll(handle) -> JobState`: still running, or the exit code once every process is gone;
- `cancel(handle)`: called on every runner tick while a run is being stopped; the first call sends
  SIGTERM, a later one SIGKILL once the backend's grace has passed (never blocking the runner);
- `logs(handle)`: the names of the run's logs, read through runner.service.logs (the one log reader);
- `collect(handle) -> Collected`: once done, the exit code and the result.json the job left.

No torch import here: the app imports the runner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from runner.service.logs import log_names
from runner.spec.records import Result
from runner.spec.run_spec import RunSpec, SpecProblem

BACKENDS = ("local", "slurm")


@dataclass(frozen=True)
class JobState:
    """What poll() saw: `exit_code` is None while the job's launcher (torchrun, the batch job) runs.

    `lingering`: the launcher has exited but processes of the job still live (they hold their devices);
    `pending`: the scheduler has not started the job yet; `state`: the backend's own word for it.
    """

    exit_code: int | None
    lingering: bool = False
    pending: bool = False
    state: str = ""

    @property
    def done(self) -> bool:
        """Every process of the job is gone: its outcome can be collected."""
        return self.exit_code is not None and not self.lingering


@dataclass(frozen=True)
class Collected:
    """A finished job: its exit code (-1 when unknown) and its result.json, if it left a readable one."""

    exit_code: int
    result: Result | None = None
    unreadable: str | None = None  # why a result.json that is there cannot be read
    note: str | None = None  # what the backend says about the end ("Slurm job 12 ended TIMEOUT")


class Handle(Protocol):
    """A started job as the runner holds it; each backend's handle has more (pids, a Slurm job id)."""

    run_id: int
    run_dir: Path
    backend: str

    @property
    def job_id(self) -> str: ...

    def add_rank(self, pid: int, reported_at: float) -> bool: ...


@runtime_checkable
class Launcher(Protocol):
    backend: str  # "local" | "slurm"
    submit_failure: str  # how a refused submit is told ("could not start torchrun")
    places_locally: bool  # the runner picks this machine's GPUs / CPU slots (False: the scheduler does)
    entry: tuple[str, ...]  # what torchrun runs per rank ("-m", "runner.job"; a test may give its own)

    def submit(self, run_id: int, spec: RunSpec, run_dir: Path, gpus: list[str]) -> Any: ...
    def attach(self, run_id: int, row: dict[str, Any]) -> Any: ...
    def record(self, handle: Any) -> dict[str, Any]: ...
    def track(self, handle: Any) -> None: ...
    def poll(self, handle: Any) -> JobState: ...
    def cancel(self, handle: Any) -> None: ...
    def logs(self, handle: Any) -> list[str]: ...
    def collect(self, handle: Any) -> Collected: ...
    def sampler(self, handle: Any, started: float, gpus: list[str]) -> Any: ...
    def problems(self, spec: RunSpec) -> list[SpecProblem]: ...


def read_result(run_dir: Path, exit_code: int) -> Collected:
    """The result.json a job left in its folder (rank 0 writes it last), with the exit code."""
    path = Path(run_dir) / "result.json"
    if not path.exists():
        return Collected(exit_code)
    try:
        return Collected(exit_code, Result.from_dict(json.loads(path.read_text())))
    except (OSError, ValueError, TypeError) as exc:
        return Collected(exit_code, None, f"its result.json cannot be read ({exc})")


def run_logs(run_dir: Path) -> list[str]:
    """The logs of a run folder ('torchrun' first, then each rank's), as runner.service.logs lists them."""
    return log_names(run_dir)
