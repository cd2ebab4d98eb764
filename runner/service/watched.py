"""One run the runner watches: its processes and limits, and what it reads from the run folder into storage.

Watched holds a running job's state between runner ticks; `job` is the backend's handle (runner.service.launchers). ingest_events() reads the new lines of
events.jsonl (runner.spec.records events) and stores steps, spans and progress; store_log_tails() keeps
the latest part of each log in the database; outcome() decides, once every process is gone, the
terminal status from what the launcher collected (exit code, result.json), the stop decision and the failure
diagnosis. No torch import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sqlalchemy import Engine

from runner.job.metrics import step_number
from runner.service.failures import diagnose_failure, with_node
from runner.service.launchers.base import Collected, Handle
from runner.service.logs import LOG_TAIL_BYTES, log_names, log_path, read_log_tail
from runner.service.telemetry import Sampler
from runner.spec.records import Error, RunStatus, Span, Started, Step, parse_event
from runner.spec.run_spec import RunSpec
from storage import runner_rows as rows


@dataclass
class Watched:
    """A run this runner watches: its processes, spec and devices, and how far its folder has been read."""

    job: Handle  # runner.service.launchers.local.Job, runner.service.launchers.slurm.SlurmJob
    spec: RunSpec
    gpus: list[int]
    started: float
    sampler: Sampler
    events_offset: int = 0
    stopping: RunStatus | None = None  # CANCELLED or FAILED once we decided to stop it
    stop_reason: str | None = None
    last_sample: float = 0.0
    errors: list[Error] = field(default_factory=list)
    diverged: str | None = None  # "loss became NaN at step 3" once a step reported a non-finite loss
    orphans_stopped: bool = False  # the launcher exited while processes lived on, and they were told to stop
    stored_ranks: int = -1  # how many rank pids storage holds (-1: pid not stored yet)
    finalize_failures: int = 0
    log_sizes: dict[str, int] = field(default_factory=dict)  # log name -> size when its tail was last stored
    sample_error: str | None = None  # the sampler's last failure, told once

    def ingest_events(self, engine: Engine, run_id: int) -> None:
        """Read the new complete lines of events.jsonl since the stored offset."""
        path = self.job.run_dir / "events.jsonl"
        if not path.exists():
            return
        with path.open("rb") as f:
            f.seek(self.events_offset)
            chunk = f.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        steps: list[Step] = []
        spans: list[Span] = []
        for line in chunk[: end + 1].splitlines():
            e = parse_event(line)  # None: a line no rank of ours wrote in this shape, not a reason to stop
            if isinstance(e, Step):
                steps.append(e)
                if e.loss is not None and not math.isfinite(e.loss) and self.diverged is None:
                    # The step as the rank logs print it ("step 3/5")
                    self.diverged = f"loss became {number_name(e.loss)} at step {step_number(e.step)}"
            elif isinstance(e, Span):
                spans.append(e)
            elif isinstance(e, Error):
                self.errors.append(e)
            elif isinstance(e, Started) and e.pid:
                self.job.add_rank(e.pid, e.t)
        self.events_offset += end + 1
        rows.add_step_metrics(engine, run_id, steps)
        rows.add_spans(engine, run_id, spans)
        values = {"events_offset": self.events_offset}
        if steps:
            values["progress_step"] = steps[-1].step + 1
        rows.update_run(engine, run_id, **values)

    def samples(self, run_id: int) -> list[dict]:
        """The sampler's rows now; [] when sampling fails, said once per distinct error in the runner's log.

        Telemetry is a side figure: a sampler that fails (NVML's own failures are already backed off inside it,
        runner/service/nvml.py) must never keep a run from being watched or finalized."""
        try:
            got = self.sampler.sample()
        except Exception as exc:  # noqa: BLE001 -- whatever it is, the run's outcome matters more
            said = f"{type(exc).__name__}: {exc}"[:300]
            if said != self.sample_error:
                print(f"run {run_id}: telemetry not sampled ({said})", flush=True)
            self.sample_error = said
            return []
        self.sample_error = None
        return got

    def store_log_tails(self, engine: Engine, run_id: int) -> None:
        """The latest LOG_TAIL_BYTES of each log that grew, into the database (teammates read them there)."""
        for name in log_names(self.job.run_dir):
            try:
                size = log_path(self.job.run_dir, name).stat().st_size
            except OSError:
                continue
            if self.log_sizes.get(name) == size:
                continue
            got = read_log_tail(self.job.run_dir, name, LOG_TAIL_BYTES)
            if got is None:
                continue
            text, size = got
            rows.store_log_tail(engine, run_id, name, text.replace("\x00", ""), size)
            self.log_sizes[name] = size

    def outcome(self, collected: Collected) -> tuple[RunStatus, dict]:
        """The terminal status and stored fields for a job whose every process is gone (launcher.collect)."""
        code, result, unreadable = collected.exit_code, collected.result, collected.unreadable
        if self.stopping == RunStatus.CANCELLED:
            return RunStatus.CANCELLED, dict(result=None, error=self.stop_reason, exit_code=code)
        if self.stopping == RunStatus.FAILED:
            return RunStatus.FAILED, dict(error=self.stop_reason, exit_code=code)
        if result is not None and code in (0, -1):
            loss = result.loss
            diverged = self.diverged
            if diverged is None and isinstance(loss, float) and not math.isfinite(loss):
                diverged = f"loss became {number_name(loss)} by the last step"
            if diverged:
                # The timings are real, so the result is kept; the run still did not train.
                return RunStatus.FAILED, dict(result=result, exit_code=0,
                                              error=f"{diverged}: training diverged (try a smaller learning rate)")  # fmt: skip
            return RunStatus.SUCCEEDED, dict(result=result, exit_code=0)
        if unreadable and code in (0, -1):
            return RunStatus.FAILED, dict(error=unreadable, exit_code=code)
        failed_rank, error, tb = diagnose_failure(self.job.run_dir, self.errors)
        error = with_node(error, self.job.run_dir, failed_rank)
        if self.orphans_stopped:
            error = f"torchrun ended (exit {code}) while ranks still ran; the runner stopped them ({error})"
        if self.diverged:
            error = f"{error} (after its {self.diverged})"
        if collected.note:
            error = f"{error} ({collected.note})"
        return RunStatus.FAILED, dict(error=error, traceback=tb, exit_code=code, failed_rank=failed_rank)


def number_name(x: float) -> str:
    return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")
