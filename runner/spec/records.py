"""What crosses a process boundary, typed once: run states, the job's events, per-rank figures, result.json.

The job (runner/job/rank.py) writes events.jsonl lines and result.json with these records; the runner
(runner/service/loop.py) reads them back with parse_event() and Result.from_dict(); storage stores them
(storage/runner_rows.py, storage/ranks.py); pages read the stored shapes. Torch-free: the app imports it.

Compatibility: the JSON shapes are those earlier versions wrote. An event line is
{"kind", "rank", "t", ...fields}; a line that is not one of ours parses to None. Result.from_dict and
RankFigures.from_dict accept files from earlier versions: a missing key reads as None, and keys this
version does not declare are kept (in `other` / `strategy`) and written back out unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar


class RunStatus(StrEnum):
    """A run's state; a terminal one never changes again (finish_run refuses to move a run out of it)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"

    @property
    def is_terminal(self) -> bool:
        return self not in (RunStatus.QUEUED, RunStatus.RUNNING)


TERMINAL_STATUSES: tuple[RunStatus, ...] = tuple(s for s in RunStatus if s.is_terminal)


# ---- events.jsonl ------------------------------------------------------------------------------
def _finite(value: Any) -> float:
    """A number a column cannot hold empty; ValueError (the line is skipped) when it is not a finite number."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {value}")
    return number


def _loss(value: Any) -> float | None:
    """A loss as reported: None, or a float that may be NaN or infinite (a diverged run says so)."""
    return None if value is None else float(value)


@dataclass(frozen=True)
class Event:
    """One line of events.jsonl: which rank wrote it and when (Unix seconds)."""

    kind: ClassVar[str] = ""
    rank: int
    t: float

    def to_json_line(self) -> str:
        """The line as written to events.jsonl (one write per line; ranks share the file)."""
        return json.dumps({"kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(rank=int(d["rank"]), t=_finite(d["t"]))


@dataclass(frozen=True)
class Started(Event):
    """A rank joined its process group; its pid lets the runner watch it (torchrun gives each rank a session)."""

    kind: ClassVar[str] = "started"
    world_size: int = 0
    device: str = ""
    backend: str = ""
    pid: int | None = None
    host: str | None = None  # the node it runs on (SLURMD_NODENAME under Slurm, else the host name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Started:
        pid = d.get("pid")
        return cls(rank=int(d["rank"]), t=_finite(d["t"]), world_size=int(d.get("world_size") or 0),
                   device=str(d.get("device") or ""), backend=str(d.get("backend") or ""),
                   pid=int(pid) if pid else None, host=d.get("host") or None)  # fmt: skip


@dataclass(frozen=True)
class Step(Event):
    """One training/forward/generate step as rank 0 saw it (0-based `step`; a non-finite loss is kept).

    `loss` is the run's loss over the global batch, whichever ranks computed it (runner/job/losses.py);
    `eval_loss` the held-out loss after this step, on the steps the spec's eval_every picks."""

    kind: ClassVar[str] = "step"
    step: int = 0
    total_steps: int = 0
    warmup: bool = False
    step_time_s: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        return cls(rank=int(d.get("rank") or 0), t=_finite(d["t"]), step=int(d["step"]),
                   total_steps=int(d.get("total_steps") or 0), warmup=bool(d.get("warmup")),
                   step_time_s=_finite(d["step_time_s"]), loss=_loss(d.get("loss")),
                   eval_loss=_loss(d.get("eval_loss")))  # fmt: skip


@dataclass(frozen=True)
class Span(Event):
    """A timeline span of a pipeline stage: one microbatch's forward or backward, start/end in step seconds."""

    kind: ClassVar[str] = "span"
    step: int = 0
    stage: int = 0
    microbatch: int = 0
    phase: str = ""
    start: float = 0.0
    end: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Span:
        return cls(rank=int(d["rank"]), t=float(d.get("t") or 0.0), step=int(d["step"]), stage=int(d["stage"]),
                   microbatch=int(d["microbatch"]), phase=str(d["phase"]), start=_finite(d["start"]),
                   end=_finite(d["end"]))  # fmt: skip


@dataclass(frozen=True)
class Error(Event):
    """A rank raised: the exception's one line and its traceback."""

    kind: ClassVar[str] = "error"
    error: str = ""
    traceback: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Error:
        tb = d.get("traceback")
        return cls(rank=int(d["rank"]), t=float(d.get("t") or 0.0), error=str(d.get("error") or ""),
                   traceback=None if tb is None else str(tb))  # fmt: skip


@dataclass(frozen=True)
class Finished(Event):
    """A rank completed its job (rank 0 has written result.json by then)."""

    kind: ClassVar[str] = "finished"


EVENT_KINDS: dict[str, type[Event]] = {c.kind: c for c in (Started, Step, Span, Error, Finished)}


def parse_event(line: str | bytes) -> Event | None:
    """The event one line of events.jsonl holds, or None for a line not in any of our shapes."""
    try:
        d = json.loads(line)
        cls = EVENT_KINDS.get(d.get("kind")) if isinstance(d, dict) else None
        return cls.from_dict(d) if cls is not None else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


# ---- per-rank figures and result.json ----------------------------------------------------------
def _declared(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in ("strategy", "other"))


@dataclass
class RankFigures:
    """One rank's figures after the timed steps (rank 0 gathers every rank's into result.json's `ranks`).

    `strategy` holds what the strategy itself reports (ParallelGPT.figures(): a pipeline stage's
    in-flight microbatches, activation bytes, theoretical bubble, ...); on disk and in storage they sit
    beside the declared figures, as one flat object, as earlier versions wrote them.
    """

    rank: int
    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    param_count: int | None = None
    param_bytes: int | None = None
    optimizer_bytes: int | None = None
    peak_mem_bytes: int | None = None
    peak_rss_bytes: int | None = None
    mem_baseline_bytes: int | None = None
    peak_rss_scope: str | None = None
    peak_tensor_bytes: int | None = None  # the most bytes its tensors held at once (runner/job/resources.py)
    cublas_workspace_bytes: int | None = None  # CUDA: cuBLAS workspaces in the run's peak, not in the tensor peak
    cpu_wait_s: float | None = None
    cpu_core: int | None = None
    cpu_oversubscribed: bool | None = None
    cpu_cores: int | None = None
    compute_s: float | None = None
    comm_s: float | None = None
    idle_s: float | None = None
    comm_bytes: dict[str, int] | None = None
    comm_wire_bytes: dict[str, int] | None = None
    comm_calls: dict[str, int] | None = None
    loss: float | None = None
    device_name: str | None = None
    host: str | None = None  # the node it ran on: SLURMD_NODENAME under Slurm, else the host name
    bubble_fraction: float | None = None  # measured: the share of the step this stage stood idle
    # The machine while the timed steps ran (runner/job/load.py): this rank's own CPU seconds; on the first rank
    # of each host, the busy seconds of the job's cores (the launcher's own left out), their count, the window
    # and the 1-minute load average at its start and end.
    timed_cpu_s: float | None = None
    host_busy_cpu_s: float | None = None
    host_cpu_cores: int | None = None
    load_window_s: float | None = None
    load_avg_1m: list[float] | None = None
    strategy: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _declared(RankFigures)}, **self.strategy}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankFigures:
        names = _declared(cls)
        return cls(**{k: d.get(k) for k in names}, strategy={k: v for k, v in d.items() if k not in names})


@dataclass
class Result:
    """result.json: the run's summary (rank 0 writes it) and every rank's figures.

    `other` keeps keys this version does not declare (from an older or newer job, or added by storage,
    such as `non_finite`), so reading and writing a result loses nothing.
    """

    run_id: int | None = None
    world_size: int | None = None
    device: str | None = None
    backend: str | None = None
    device_names: list[str] | None = None
    torch_version: str | None = None
    hostname: str | None = None
    step_time_s_p50: float | None = None
    step_time_s_p90: float | None = None
    step_time_s_mean: float | None = None
    step_times_s: list[float] | None = None
    tokens_per_s: float | None = None
    flops_per_step: float | None = None
    achieved_gflops: float | None = None
    peak_flops: float | None = None
    mfu: float | None = None
    loss: float | None = None
    bubble_fraction: float | None = None
    bubble_fraction_theory: float | None = None
    verify: dict[str, Any] | None = None
    cpu_oversubscribed: bool | None = None
    cpu_cores: int | None = None
    cpu_pinned: bool | None = None
    # Other processes' share of the job's cores during the timed steps (the largest over its hosts), known to
    # within +-resolution, and the 1-minute load average at the start and end (runner/job/load.py).
    others_cpu_share: float | None = None
    others_cpu_share_resolution: float | None = None
    load_avg_1m_start: float | None = None
    load_avg_1m_end: float | None = None
    # generate on text: the prompt of the batch's first row (as text), the ids it continued with, and those
    # ids decoded with the corpus's tokenizer (bytes for byte-level text)
    prompt: str | None = None
    generated_ids: list[int] | None = None
    generated_text: str | None = None
    ranks: list[RankFigures] = field(default_factory=list)
    other: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-rank figures (what the runs row's `result` column holds)."""
        return {**{k: getattr(self, k) for k in _declared(Result) if k != "ranks"}, **self.other}

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "ranks": [r.to_dict() for r in self.ranks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        """A result from any version's result.json (or a stored summary plus ranks); ValueError if not an object."""
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        names = _declared(cls)
        values = {k: d.get(k) for k in names if k != "ranks"}
        ranks = [RankFigures.from_dict(r) for r in d.get("ranks") or [] if isinstance(r, dict)]
        return cls(**values, ranks=ranks, other={k: v for k, v in d.items() if k not in names})
