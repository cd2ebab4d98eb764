"""What the runner writes while it serves runs: pick and claim queued runs, progress, metrics, telemetry, spans,
log tails, and the final status with the result.

Only runner/service/loop.py calls these. Claiming a queued run is one conditional UPDATE whose row count
says who won; finishing is conditional too, so a run that already ended keeps its ending. Numbers are
made finite before they are stored (PostgreSQL's JSON refuses NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, delete, insert, or_, select, update

from runner.spec.records import Result, RunStatus, Span, Step
from storage import ranks
from storage.hosts import this_host
from storage.models import (
    RankResult,
    Run,
    RunLog,
    RunnerLease,
    StepMetric,
    TelemetrySample,
    TimelineSpan,
    utcnow,
)


def finite_json(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """`value` with every NaN or infinity replaced by None, and the paths where that happened.

    PostgreSQL's JSON refuses NaN and SQLite's stores a token no other JSON reader accepts; a diverged
    run's loss is exactly that, so results are made finite before they are stored.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None, [f"{path or 'value'} = {value}"]
    if isinstance(value, dict):
        out, where = {}, []
        for k, v in value.items():
            out[k], w = finite_json(v, f"{path}.{k}" if path else str(k))
            where += w
        return out, where
    if isinstance(value, (list, tuple)):
        out_list, where = [], []
        for i, v in enumerate(value):
            item, w = finite_json(v, f"{path}[{i}]")
            out_list.append(item)
            where += w
        return out_list, where
    return value, []


def queued_runs(engine: Engine, host: str | None = None) -> list[dict[str, Any]]:
    """Queued runs, oldest first, with what the runner needs to place them; with `host`, only those that may
    run there (aimed at it, or at any host)."""
    q = select(Run.id, Run.spec, Run.world_size, Run.target_host, Run.set_id).where(Run.status == "queued")
    q = q.order_by(Run.id)
    if host is not None:
        q = q.where(or_(Run.target_host.is_(None), Run.target_host == host))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def running_sets(engine: Engine) -> dict[int, int]:
    """{set id: a run of that comparison set running now, on any host}: the next run of a set waits for it."""
    q = select(Run.set_id, Run.id).where(Run.status == "running", Run.set_id.is_not(None)).order_by(Run.id)
    with engine.connect() as conn:
        return {set_id: run_id for set_id, run_id in conn.execute(q)}


def _lease_is(runner_id: str):
    return select(RunnerLease.id).where(RunnerLease.runner_id == runner_id).exists()


def _lock_lease(conn, engine: Engine, runner_id: str) -> None:
    """On PostgreSQL lock our lease row first (FOR UPDATE), so a takeover waits for this transaction and then
    sees it; on SQLite the single UPDATE that follows holds the database's write lock throughout."""
    if engine.dialect.name != "sqlite":
        conn.execute(select(RunnerLease.id).where(RunnerLease.runner_id == runner_id).with_for_update())


def claim_run(engine: Engine, run_id: int, runner_id: str, run_dir: str, gpus: list[int], *,
              require_lease: bool = False, backend: str = "local") -> bool:  # fmt: skip
    """queued -> running for exactly one caller: the UPDATE's row count says who won.

    require_lease (the runner always sets it): the claim also needs the runner lease to be still ours,
    checked in the same transaction, so a runner that was frozen or cut off while another took over
    launches nothing. `backend` is where it will be launched ("local" | "slurm").
    """
    claim = update(Run).where(Run.id == run_id, Run.status == "queued")
    if require_lease:
        claim = claim.where(_lease_is(runner_id))
    with engine.begin() as conn:
        if require_lease:
            _lock_lease(conn, engine, runner_id)
        return bool(
            conn.execute(
                claim.values(
                    status="running",
                    started_at=utcnow(),
                    runner_id=runner_id,
                    runner_host=this_host(),
                    run_dir=run_dir,
                    gpus=gpus,
                    wait_reason=None,
                    backend=backend,
                    backend_job_id=None,
                )  # fmt: skip
            ).rowcount
        )


def adopt_run(engine: Engine, run_id: int, runner_id: str) -> bool:
    """A running run becomes ours to watch, only while the runner lease is ours (checked in the same
    transaction, as for a claim): a runner frozen in the middle of a rescan while another took over wakes up
    to find it cannot adopt the successor's live jobs. False: the run is no longer running, or the lease is
    gone (the caller must stop serving)."""
    with engine.begin() as conn:
        _lock_lease(conn, engine, runner_id)
        adopt = update(Run).where(Run.id == run_id, Run.status == "running", _lease_is(runner_id))
        return bool(conn.execute(adopt.values(runner_id=runner_id)).rowcount)


def set_wait_reason(engine: Engine, run_id: int, reason: str | None) -> None:
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id, Run.status == "queued").values(wait_reason=reason))


def update_run(engine: Engine, run_id: int, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(**values))


def running_runs(engine: Engine, host: str | None = None) -> list[dict[str, Any]]:
    """Running runs, oldest first; with `host`, those running there (and any from before hosts were recorded)."""
    q = select(
        Run.id,
        Run.pid,
        Run.run_dir,
        Run.spec,
        Run.started_at,
        Run.events_offset,
        Run.gpus,
        Run.cancel_requested,
        Run.rank_pids,
        Run.runner_id,
        Run.runner_host,
        Run.backend,
        Run.backend_job_id,
    ).where(Run.status == "running")
    if host is not None:
        q = q.where(or_(Run.runner_host.is_(None), Run.runner_host == host))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q.order_by(Run.id))]


def cancel_requested(engine: Engine, run_id: int) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(select(Run.cancel_requested).where(Run.id == run_id)).scalar_one_or_none())


def store_log_tail(engine: Engine, run_id: int, name: str, text: str, size: int) -> None:
    """Keep the latest part of one of a run's logs in the database (one row per run and log, replaced)."""
    values = {"text": text, "size": size, "updated_at": utcnow()}
    with engine.begin() as conn:
        if not conn.execute(
            update(RunLog).where(RunLog.run_id == run_id, RunLog.name == name).values(**values)
        ).rowcount:
            conn.execute(insert(RunLog).values(run_id=run_id, name=name, **values))


def add_step_metrics(engine: Engine, run_id: int, steps: Sequence[Step]) -> None:
    """Store step events; a non-finite loss (a diverged run) is stored as NULL on every backend."""
    rows = [
        {"run_id": run_id, "step": e.step, "warmup": e.warmup, "step_time_s": e.step_time_s,
         "loss": finite_json(e.loss)[0], "eval_loss": finite_json(e.eval_loss)[0], "t": e.t}
        for e in steps
    ]  # fmt: skip
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(StepMetric), rows)


def add_telemetry(engine: Engine, run_id: int, rows: list[dict[str, Any]]) -> None:
    """Store samples ({source, t_s, util_pct, mem_bytes}, and `host` where a node took them: NULL is the runner's)."""
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(TelemetrySample), [{"run_id": run_id, "host": None, **r} for r in rows])


def add_spans(engine: Engine, run_id: int, spans: Sequence[Span | Mapping[str, Any]]) -> None:
    """Store timeline spans (records, or mappings with Span's keys: read through Span.from_dict)."""
    rows = []
    for e in spans:
        span = e if isinstance(e, Span) else Span.from_dict(dict(e))
        rows.append({"run_id": run_id, "step": span.step, "rank": span.rank, "stage": span.stage,
                     "microbatch": span.microbatch, "phase": span.phase, "start": span.start, "end": span.end})  # fmt: skip
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(TimelineSpan), rows)


def finish_run(engine: Engine, run_id: int, status: RunStatus | str, result: Result | Mapping[str, Any] | None = None,
               **values: Any) -> bool:  # fmt: skip
    """Move a queued or running run to a terminal state; with a result, store its summary and one row per rank.

    Non-finite numbers in the result are stored as null and listed in the summary's `non_finite`
    ("loss = nan", "ranks[0].loss = nan"), so the value that was there is not silently lost. A run that
    already ended keeps its ending (a second runner finalising it changes nothing); False then.
    """
    status = RunStatus(status)
    if not status.is_terminal:
        raise ValueError(f"finish_run needs a terminal state, not {status}")
    values = {"status": status.value, "finished_at": utcnow(), "cancel_requested": False, **values}
    stored: Result | None = None
    if result is not None:
        finite, non_finite = finite_json(result.to_dict() if isinstance(result, Result) else dict(result))
        stored = Result.from_dict(finite)
        if non_finite:
            stored.other["non_finite"] = non_finite
        values.update(
            result=stored.summary(),
            tokens_per_s=stored.tokens_per_s,
            step_time_s_p50=stored.step_time_s_p50,
            peak_mem_bytes_max=max((r.peak_mem_bytes or 0 for r in stored.ranks), default=None),
            torch_version=stored.torch_version,
            device_names=stored.device_names or [],
        )
    live = (RunStatus.QUEUED.value, RunStatus.RUNNING.value)
    with engine.begin() as conn:
        moved = conn.execute(update(Run).where(Run.id == run_id, Run.status.in_(live)).values(**values)).rowcount
        if moved and stored is not None and stored.ranks:
            conn.execute(delete(RankResult).where(RankResult.run_id == run_id))
            conn.execute(insert(RankResult), [ranks.to_row(run_id, r) for r in stored.ranks])
    return bool(moved)
