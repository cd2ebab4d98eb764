"""Every read and write of the database that pages, the CLI and the runner make (see docs/storage-api.md).

Filtering, paging and telemetry downsampling happen in SQL so pages stay fast with a team's whole
history; functions return plain dicts or DataFrames, never live ORM objects, so callers hold no
session. Claiming a queued run is one conditional UPDATE whose row count says who won.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import math
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Engine, String, cast, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from runner.spec import RunSpec, SpecError
from storage.db import RUNNER_STALE_S, runner_stale_s, runs_dir  # noqa: F401 (RUNNER_STALE_S: re-exported)
from storage.models import (
    TERMINAL_STATES,
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


LIST_COLUMNS = [
    "id", "status", "strategy", "model", "workload", "world_size", "tp", "pp", "dp", "user", "tags",
    "created_at", "finished_at", "tokens_per_s", "step_time_s_p50", "peak_mem_bytes_max", "note",
]  # fmt: skip


@dataclass
class RunFilter:
    status: list[str] | None = None
    strategy: list[str] | None = None
    model: list[str] | None = None
    workload: list[str] | None = None
    user: list[str] | None = None
    tag: list[str] | None = None
    since: datetime | None = None
    until: datetime | None = None

    def apply(self, query):
        for column, values in (
            (Run.status, self.status),
            (Run.strategy, self.strategy),
            (Run.model, self.model),
            (Run.workload, self.workload),
            (Run.user, self.user),
        ):
            if values:
                query = query.where(column.in_(values))
        if self.tag:
            # Tags are a JSON list; matching the quoted element in its text form works on SQLite and PostgreSQL.
            # autoescape: a tag with % or _ matches only itself.
            text_tags = cast(Run.tags, String)
            query = query.where(or_(*(text_tags.contains(json.dumps(t), autoescape=True) for t in self.tag)))
        if self.since:
            query = query.where(Run.created_at >= self.since)
        if self.until:
            query = query.where(Run.created_at < self.until)
        return query


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat() if dt else None


# ---- submitting and reading runs ------------------------------------------------------------
ANY_HOST = "*"  # a run aimed at any host whose runner has the devices it needs


def submit_run(
    engine: Engine, spec: RunSpec, *, user: str | None = None, gpu_count: int | None = None, run_on: str | None = None
) -> int:
    """Validate and queue; raises SpecError (nothing queued) when the spec has any problem.

    run_on: the host it runs on (default: this one, LAB_HOST, so a job runs where it was launched), or
    ANY_HOST for whichever host can place it first.
    """
    problems = spec.validate(gpu_count=gpu_count)
    if problems:
        raise SpecError(problems)
    tp, pp, dp = spec.degrees
    with Session(engine) as s, s.begin():
        run = Run(
            status="queued",
            strategy=spec.strategy,
            model=spec.model,
            workload=spec.workload,
            world_size=spec.world_size,
            tp=tp,
            pp=pp,
            dp=dp,
            device=spec.device,
            spec=spec.to_dict(),
            tags=list(spec.tags),
            note="",
            user=(user or default_user())[:64],
            host=this_host(),
            target_host=None if run_on == ANY_HOST else (run_on or this_host())[:128],
            created_at=utcnow(),
            total_steps=spec.warmup + spec.steps,
        )
        s.add(run)
        s.flush()
        return run.id


def _run_dict(run: Run, ranks: list[RankResult] | None = None) -> dict[str, Any]:
    return {
        "id": run.id,
        "status": run.status,
        "error": run.error,
        "spec": run.spec,
        "result": run.result,
        "ranks": [_rank_dict(r) for r in ranks] if ranks is not None else [],
        "user": run.user,
        "host": run.host,
        "target_host": run.target_host,
        "runner_host": run.runner_host,
        "tags": list(run.tags or []),
        "note": run.note,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "progress": {"step": run.progress_step, "total": run.total_steps},
        "wait_reason": run.wait_reason,
        "exit_code": run.exit_code,
        "failed_rank": run.failed_rank,
        "traceback": run.traceback,
        "run_dir": run.run_dir,
        "torch_version": run.torch_version,
        "device_names": list(run.device_names or []),
        "gpus": list(run.gpus or []),
        "cancel_requested": run.cancel_requested,
    }


def _rank_dict(r: RankResult) -> dict[str, Any]:
    return {
        "rank": r.rank,
        "tp": r.tp,
        "pp": r.pp,
        "dp": r.dp,
        "param_count": r.param_count,
        "param_bytes": r.param_bytes,
        "optimizer_bytes": r.optimizer_bytes,
        "peak_mem_bytes": r.peak_mem_bytes,
        "compute_s": r.compute_s,
        "comm_s": r.comm_s,
        "idle_s": r.idle_s,
        "comm_bytes": r.comm_bytes,
        "comm_calls": r.comm_calls,
        **(r.extra or {}),
    }


def get_run(engine: Engine, run_id: int) -> dict[str, Any] | None:
    with Session(engine) as s:
        run = s.get(Run, run_id)
        if run is None:
            return None
        ranks = s.scalars(select(RankResult).where(RankResult.run_id == run_id).order_by(RankResult.rank)).all()
        return _run_dict(run, list(ranks))


def list_runs(engine: Engine, filters: RunFilter | None = None, limit: int = 50, offset: int = 0) -> pd.DataFrame:
    cols = [getattr(Run, c) for c in LIST_COLUMNS]
    query = (filters or RunFilter()).apply(select(*cols)).order_by(Run.id.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return pd.DataFrame(rows, columns=LIST_COLUMNS)


def count_runs(engine: Engine, filters: RunFilter | None = None) -> int:
    query = (filters or RunFilter()).apply(select(func.count(Run.id)))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def distinct_values(engine: Engine, column: str) -> list[str]:
    """Values present in runs.<column> (for filter choices), sorted."""
    col = getattr(Run, column)
    with engine.connect() as conn:
        return sorted(v for (v,) in conn.execute(select(col).distinct()) if v)


def rank_results(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    with Session(engine) as s:
        rows = s.scalars(
            select(RankResult).where(RankResult.run_id.in_(run_ids)).order_by(RankResult.run_id, RankResult.rank)
        ).all()
        records = []
        for r in rows:
            d = _rank_dict(r)
            d["run_id"] = r.run_id
            for kind, n in (r.comm_bytes or {}).items():
                d[f"comm_bytes_{kind}"] = n
            d.pop("comm_bytes")
            d.pop("comm_calls")
            records.append(d)
    return pd.DataFrame.from_records(records)


def step_metrics(engine: Engine, run_id: int) -> pd.DataFrame:
    q = select(StepMetric.step, StepMetric.warmup, StepMetric.step_time_s, StepMetric.loss, StepMetric.t).where(
        StepMetric.run_id == run_id
    )
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(StepMetric.step)).all()
    return pd.DataFrame(rows, columns=["step", "warmup", "step_time_s", "loss", "t"])


def telemetry_series(engine: Engine, run_ids: list[int], bucket_s: float = 1.0) -> pd.DataFrame:
    """Samples averaged per (run, source, time bucket) in SQL, so a chart gets at most one point a bucket."""
    bucket = func.floor(TelemetrySample.t_s / bucket_s)
    q = (
        select(
            TelemetrySample.run_id,
            TelemetrySample.source,
            (bucket * bucket_s).label("t_s"),
            func.avg(TelemetrySample.util_pct).label("util_pct"),
            func.max(TelemetrySample.mem_bytes).label("mem_bytes"),
        )
        .where(TelemetrySample.run_id.in_(run_ids))
        .group_by(TelemetrySample.run_id, TelemetrySample.source, bucket)
        .order_by(TelemetrySample.run_id, TelemetrySample.source, bucket)
    )
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return pd.DataFrame(rows, columns=["run_id", "source", "t_s", "util_pct", "mem_bytes"])


def timeline_spans(engine: Engine, run_id: int) -> pd.DataFrame:
    cols = ["step", "rank", "stage", "microbatch", "phase", "start", "end"]
    q = select(*(getattr(TimelineSpan, c) for c in cols)).where(TimelineSpan.run_id == run_id)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(TimelineSpan.step, TimelineSpan.rank, TimelineSpan.start)).all()
    return pd.DataFrame(rows, columns=cols)


# ---- changes a user makes -------------------------------------------------------------------
def request_cancel(engine: Engine, run_id: int) -> str:
    """A queued run is cancelled at once; a running one is flagged for the runner to stop."""
    now = utcnow()
    with engine.begin() as conn:
        done = conn.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == "queued")
            .values(status="cancelled", finished_at=now, error="cancelled before it started", wait_reason=None)
        ).rowcount
        if done:
            return "cancelled"
        flagged = conn.execute(
            update(Run).where(Run.id == run_id, Run.status == "running").values(cancel_requested=True)
        ).rowcount
        if flagged:
            return "cancelling"
        status = conn.execute(select(Run.status).where(Run.id == run_id)).scalar_one_or_none()
    if status is None:
        raise KeyError(f"no run {run_id}")
    return status


def update_run_meta(engine: Engine, run_id: int, *, note: str | None = None, tags: list[str] | None = None) -> None:
    values: dict[str, Any] = {}
    if note is not None:
        values["note"] = note
    if tags is not None:
        values["tags"] = [t.strip() for t in tags if t.strip()]
    if values:
        with engine.begin() as conn:
            if not conn.execute(update(Run).where(Run.id == run_id).values(**values)).rowcount:
                raise KeyError(f"no run {run_id}")


def delete_run(engine: Engine, run_id: int) -> None:
    """Delete a finished or queued run, everything measured for it and its run folder (a running one must be
    cancelled first). The folder is removed only when it lies under this machine's LAB_HOME/runs: with a
    team database the run may have run on another host."""
    with engine.begin() as conn:
        row = conn.execute(select(Run.status, Run.run_dir).where(Run.id == run_id)).first()
        if row is None:
            raise KeyError(f"no run {run_id}")
        if row.status == "running":
            raise ValueError(f"run {run_id} is running; cancel it before deleting")
        for table in (RankResult, StepMetric, TelemetrySample, TimelineSpan, RunLog):
            conn.execute(delete(table).where(table.run_id == run_id))
        conn.execute(delete(Run).where(Run.id == run_id))
    if row.run_dir:
        folder = Path(row.run_dir).resolve()
        if folder.parent == runs_dir().resolve() and folder.name == str(run_id):
            shutil.rmtree(folder, ignore_errors=True)


def iter_runs_csv(engine: Engine, filters: RunFilter | None = None) -> Iterator[str]:
    """CSV text of the filtered runs, streamed row by row from the query (header first)."""
    buf = io.StringIO()
    writer = csv.writer(buf)

    def flush() -> str:
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return text

    writer.writerow(LIST_COLUMNS)
    yield flush()
    query = (filters or RunFilter()).apply(select(*(getattr(Run, c) for c in LIST_COLUMNS))).order_by(Run.id.desc())
    with engine.connect() as conn:
        for row in conn.execution_options(stream_results=True, yield_per=500).execute(query):
            writer.writerow(
                ["|".join(v) if isinstance(v, list) else _iso(v) if isinstance(v, datetime) else v for v in row]
            )
            yield flush()


# ---- the runner's side ----------------------------------------------------------------------
def this_host() -> str:
    """This machine's name in a team's database: LAB_HOST, else the host name (one runner per host)."""
    return (os.environ.get("LAB_HOST") or socket.gethostname())[:128]


def _lease_dict(lease: RunnerLease) -> dict[str, Any]:
    age = (utcnow() - lease.heartbeat_at).total_seconds()
    return {
        "runner_id": lease.runner_id,
        "host": lease.host,
        "pid": lease.pid,
        "started_at": _iso(lease.started_at),
        "last_seen": _iso(lease.heartbeat_at),
        "age_s": age,
        "alive": age < runner_stale_s(),
        "gpus": list(lease.gpus or []),
        "gpu_note": lease.gpu_note,
    }


def runner_status(engine: Engine, host: str | None = None) -> dict[str, Any] | None:
    """The lease of the runner serving `host` (default: this machine), or None when none ever served it."""
    with Session(engine) as s:
        lease = s.scalars(select(RunnerLease).where(RunnerLease.host == (host or this_host()))).first()
        return _lease_dict(lease) if lease is not None else None


def hosts(engine: Engine) -> list[dict[str, Any]]:
    """Every host whose runner serves or served this database, alive first, with its devices and last heartbeat
    (what the Launch page lists and a run's target host is chosen from)."""
    with Session(engine) as s:
        leases = [_lease_dict(lease) for lease in s.scalars(select(RunnerLease).order_by(RunnerLease.host))]
    return sorted(leases, key=lambda h: not h["alive"])


def acquire_lease(engine: Engine, runner_id: str, pid: int, gpus: list[dict], gpu_note: str,
                  takeover_from: str | None = None, host: str | None = None) -> bool:  # fmt: skip
    """Take this host's runner lease if it is free, stale or already ours; True when we hold it.

    takeover_from: the id of a holder known to be dead (its process on this host is gone), taken over
    without waiting for its heartbeat to go stale.
    """
    host = host or this_host()
    now = utcnow()
    stale = now - timedelta(seconds=runner_stale_s())
    values = dict(runner_id=runner_id, host=host, pid=pid, started_at=now, heartbeat_at=now, gpus=gpus,
                  gpu_note=gpu_note[:300])  # fmt: skip
    takeable = [RunnerLease.heartbeat_at < stale, RunnerLease.runner_id == runner_id]
    if takeover_from:
        takeable.append(RunnerLease.runner_id == takeover_from)
    with engine.begin() as conn:
        won = conn.execute(update(RunnerLease).where(RunnerLease.host == host, or_(*takeable)).values(**values))
        if won.rowcount:
            return True
        exists = conn.execute(select(RunnerLease.id).where(RunnerLease.host == host)).first()
    if exists:
        return False
    try:
        with engine.begin() as conn:
            conn.execute(insert(RunnerLease).values(**values))
        return True
    except Exception:  # another runner of this host inserted the row first: IntegrityError on any backend
        return False


def heartbeat(engine: Engine, runner_id: str, gpus: list[dict] | None = None) -> bool:
    """Refresh our lease; False means another runner took it (we must stop serving)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if gpus is not None:
        values["gpus"] = gpus
    with engine.begin() as conn:
        return bool(
            conn.execute(update(RunnerLease).where(RunnerLease.runner_id == runner_id).values(**values)).rowcount
        )


def release_lease(engine: Engine, runner_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(RunnerLease).where(RunnerLease.runner_id == runner_id))


def queued_runs(engine: Engine, host: str | None = None) -> list[dict[str, Any]]:
    """Queued runs, oldest first, with what the runner needs to place them; with `host`, only those that may
    run there (aimed at it, or at any host)."""
    q = select(Run.id, Run.spec, Run.world_size, Run.target_host).where(Run.status == "queued").order_by(Run.id)
    if host is not None:
        q = q.where(or_(Run.target_host.is_(None), Run.target_host == host))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def claim_run(engine: Engine, run_id: int, runner_id: str, run_dir: str, gpus: list[int], *,
              require_lease: bool = False) -> bool:  # fmt: skip
    """queued -> running for exactly one caller: the UPDATE's row count says who won.

    require_lease (the runner always sets it): the claim also needs the runner lease to be still ours,
    checked in the same transaction, so a runner that was frozen or cut off while another took over
    launches nothing. On PostgreSQL the lease row is locked first (FOR UPDATE), so a takeover waits for
    this claim and then sees it; on SQLite the single UPDATE holds the database's write lock throughout.
    """
    owns_lease = select(RunnerLease.id).where(RunnerLease.runner_id == runner_id).exists()
    claim = update(Run).where(Run.id == run_id, Run.status == "queued")
    if require_lease:
        claim = claim.where(owns_lease)
    with engine.begin() as conn:
        if require_lease and engine.dialect.name != "sqlite":
            conn.execute(select(RunnerLease.id).where(RunnerLease.runner_id == runner_id).with_for_update())
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
                )  # fmt: skip
            ).rowcount
        )


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
    ).where(Run.status == "running")
    if host is not None:
        q = q.where(or_(Run.runner_host.is_(None), Run.runner_host == host))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q.order_by(Run.id))]


def lose_runs_of_silent_hosts(engine: Engine, silent_for_s: float) -> list[int]:
    """Runs still `running` on a host whose runner has sent no heartbeat for `silent_for_s` become `lost`, with
    the host and the time it was last seen; returns their ids. (A runner that stopped cleanly removed its
    lease: its jobs keep running and its next start adopts them.)"""
    cutoff = utcnow() - timedelta(seconds=silent_for_s)
    with engine.begin() as conn:
        silent = conn.execute(
            select(RunnerLease.host, RunnerLease.heartbeat_at).where(RunnerLease.heartbeat_at < cutoff)
        ).all()
        lost = []
        for host, seen in silent:
            ids = conn.execute(select(Run.id).where(Run.status == "running", Run.runner_host == host)).scalars().all()
            if ids:
                conn.execute(
                    update(Run)
                    .where(Run.id.in_(ids), Run.status == "running")
                    .values(
                        status="lost",
                        finished_at=utcnow(),
                        cancel_requested=False,
                        error=f"its host {host} stopped reporting (its runner was last seen {_iso(seen)}, "
                        f"over {silent_for_s:g} s ago)",
                    )  # fmt: skip
                )
                lost += ids
    return lost


def explain_runs_for_absent_hosts(engine: Engine) -> None:
    """Queued runs aimed at a host whose runner is not alive say so (no runner elsewhere will take them)."""
    alive = [h["host"] for h in hosts(engine) if h["alive"]]
    q = select(Run.id, Run.target_host).where(
        Run.status == "queued", Run.target_host.is_not(None), Run.target_host.not_in(alive)
    )
    with engine.begin() as conn:
        for run_id, host in conn.execute(q).all():
            conn.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == "queued")
                .values(wait_reason=f"waiting for a runner on host {host} (none is running there)"[:200])
            )


def store_log_tail(engine: Engine, run_id: int, name: str, text: str, size: int) -> None:
    """Keep the latest part of one of a run's logs in the database (one row per run and log, replaced)."""
    values = {"text": text, "size": size, "updated_at": utcnow()}
    with engine.begin() as conn:
        if not conn.execute(
            update(RunLog).where(RunLog.run_id == run_id, RunLog.name == name).values(**values)
        ).rowcount:
            conn.execute(insert(RunLog).values(run_id=run_id, name=name, **values))


def run_logs(engine: Engine, run_id: int) -> dict[str, dict[str, Any]]:
    """The stored log tails of a run, by name ('torchrun', 'rank0', ...): {text, size, updated_at}; readable
    from any machine of the team, whichever host ran it."""
    q = select(RunLog.name, RunLog.text, RunLog.size, RunLog.updated_at).where(RunLog.run_id == run_id)
    with engine.connect() as conn:
        return {
            r.name: {"text": r.text, "size": r.size, "updated_at": _iso(r.updated_at)}
            for r in conn.execute(q.order_by(RunLog.name))
        }


def cancel_requested(engine: Engine, run_id: int) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(select(Run.cancel_requested).where(Run.id == run_id)).scalar_one_or_none())


def add_step_metrics(engine: Engine, run_id: int, rows: list[dict[str, Any]]) -> None:
    """Store step rows; a non-finite loss (a diverged run) is stored as NULL on every backend."""
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(StepMetric), [{"run_id": run_id, **finite_json(r)[0]} for r in rows])


def add_telemetry(engine: Engine, run_id: int, rows: list[dict[str, Any]]) -> None:
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(TelemetrySample), [{"run_id": run_id, **r} for r in rows])


def add_spans(engine: Engine, run_id: int, rows: list[dict[str, Any]]) -> None:
    if rows:
        with engine.begin() as conn:
            conn.execute(insert(TimelineSpan), [{"run_id": run_id, **r} for r in rows])


def finish_run(engine: Engine, run_id: int, status: str, result: dict[str, Any] | None = None, **values: Any) -> bool:
    """Move a queued or running run to a terminal state; with a result, store its summary and one row per rank.

    Non-finite numbers in the result are stored as null and listed in the summary's `non_finite`
    ("loss = nan", "ranks[0].loss = nan"), so the value that was there is not silently lost. A run that
    already ended keeps its ending (a second runner finalising it changes nothing); False then.
    """
    assert status in TERMINAL_STATES
    values = {"status": status, "finished_at": utcnow(), "cancel_requested": False, **values}
    ranks = []
    if result is not None:
        result, non_finite = finite_json(result)
        ranks = result.get("ranks") or []
        summary = {k: v for k, v in result.items() if k != "ranks"}
        if non_finite:
            summary["non_finite"] = non_finite
        values.update(
            result=summary,
            tokens_per_s=result.get("tokens_per_s"),
            step_time_s_p50=result.get("step_time_s_p50"),
            peak_mem_bytes_max=max((r.get("peak_mem_bytes") or 0 for r in ranks), default=None),
            torch_version=result.get("torch_version"),
            device_names=result.get("device_names") or [],
        )
    core = {"rank", "tp", "pp", "dp", "param_count", "param_bytes", "optimizer_bytes", "peak_mem_bytes", "compute_s",
            "comm_s", "idle_s", "comm_bytes", "comm_calls"}  # fmt: skip
    with engine.begin() as conn:
        moved = conn.execute(
            update(Run).where(Run.id == run_id, Run.status.in_(("queued", "running"))).values(**values)
        ).rowcount
        if moved and ranks:
            conn.execute(delete(RankResult).where(RankResult.run_id == run_id))
            conn.execute(
                insert(RankResult),
                [
                    {
                        "run_id": run_id,
                        **{k: r[k] for k in core if k in r and r[k] is not None},
                        "extra": {k: v for k, v in r.items() if k not in core},
                    }  # fmt: skip
                    for r in ranks
                ],
            )
    return bool(moved)


def best_runs(engine: Engine, model: str, workload: str) -> list[int]:
    """The fastest succeeded run (tokens/s) of each strategy for one model and workload."""
    best = (
        select(Run.strategy, func.max(Run.tokens_per_s).label("best"))
        .where(Run.status == "succeeded", Run.model == model, Run.workload == workload)
        .group_by(Run.strategy)
        .subquery()
    )
    q = (
        select(func.max(Run.id))
        .join(best, (Run.strategy == best.c.strategy) & (Run.tokens_per_s == best.c.best))
        .where(Run.status == "succeeded", Run.model == model, Run.workload == workload)
        .group_by(Run.strategy)
    )
    with engine.connect() as conn:
        return sorted(int(i) for (i,) in conn.execute(q))


def active_runs(engine: Engine) -> pd.DataFrame:
    """Running and queued runs, oldest first, with progress and the reason a queued run waits."""
    cols = ["id", "status", "strategy", "model", "workload", "world_size", "user", "created_at", "started_at",
            "progress_step", "total_steps", "wait_reason", "cancel_requested"]  # fmt: skip
    q = select(*(getattr(Run, c) for c in cols)).where(Run.status.in_(("running", "queued"))).order_by(Run.id)
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(q).all(), columns=cols)
