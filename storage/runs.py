"""Run rows as the app and the CLI read and change them: insert (alone, or a comparison set), get, list, filter,
count, cancel, edit, delete, export.

Filtering and paging happen in SQL so pages stay fast with a team's whole history; functions return
plain dicts or DataFrames, never live ORM objects, so callers hold no session. This module stores
what it is given: specs are validated before they get here (runner/api.py).
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from sqlalchemy import Engine, String, cast, delete, func, or_, select, update
from sqlalchemy.orm import Session

from storage import ranks
from storage.db import runs_dir
from storage.hosts import ANY_HOST, this_host
from storage.models import RankResult, Run, RunLog, StepMetric, TelemetrySample, TimelineSpan, iso_utc, utcnow

if TYPE_CHECKING:
    from runner.spec.run_spec import RunSpec

LIST_COLUMNS = [
    "id", "status", "strategy", "model", "workload", "world_size", "tp", "pp", "dp", "user", "tags",
    "created_at", "finished_at", "tokens_per_s", "step_time_s_p50", "peak_mem_bytes_max", "note", "runner_host",
    "backend",
]  # fmt: skip


WEIGHTS = Run.spec["weights"].label("weights")  # the spec's weights path: names a Hugging Face folder's model


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


def insert_run(engine: Engine, spec: RunSpec, *, user: str | None = None, run_on: str | None = None) -> int:
    """Queue an already validated spec (nothing is checked here: runner/api.py validates first); its run id.

    run_on: the host it runs on (default: this one, LAB_HOST, so a job runs where it was launched), or
    ANY_HOST for whichever host can place it first.
    """
    with Session(engine) as s, s.begin():
        run = _new_run(spec, user, run_on)
        s.add(run)
        s.flush()
        return run.id


def insert_set(engine: Engine, specs: list[RunSpec], repeat: int, *, user: str | None = None,
               run_on: str | None = None) -> list[int]:  # fmt: skip
    """Queue `repeat` runs of each already validated spec as one comparison set, in one transaction: interleaved
    (A B C A B C ...), so queue order is round-robin over the specs, and each run's set_id is the first one's
    id. The runner runs a set's runs one at a time in that order (storage.runner_rows.running_sets). Their ids,
    in queue order."""
    if not specs or repeat < 1:
        raise ValueError("a comparison set needs at least one spec and one round")
    with Session(engine) as s, s.begin():
        rows = [_new_run(spec, user, run_on) for _ in range(repeat) for spec in specs]
        for run in rows:
            s.add(run)
            s.flush()  # one at a time: the ids follow the interleaved order
        for run in rows:
            run.set_id = rows[0].id
        return [run.id for run in rows]


def _new_run(spec: RunSpec, user: str | None, run_on: str | None) -> Run:
    tp, pp, dp = spec.degrees
    return Run(
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


def _run_dict(run: Run, rank_rows: list[RankResult] | None = None) -> dict[str, Any]:
    return {
        "id": run.id,
        "status": run.status,
        "error": run.error,
        "spec": run.spec,
        "result": run.result,
        "ranks": [ranks.from_row(r).to_dict() for r in rank_rows] if rank_rows is not None else [],
        "world_size": run.world_size,  # as stored at submit: readers need not re-parse the spec
        "tp": run.tp,
        "pp": run.pp,
        "dp": run.dp,
        "user": run.user,
        "host": run.host,
        "target_host": run.target_host,
        "runner_host": run.runner_host,
        "tags": list(run.tags or []),
        "note": run.note,
        "created_at": iso_utc(run.created_at),
        "started_at": iso_utc(run.started_at),
        "finished_at": iso_utc(run.finished_at),
        "progress": {"step": run.progress_step, "total": run.total_steps},
        "wait_reason": run.wait_reason,
        "exit_code": run.exit_code,
        "failed_rank": run.failed_rank,
        "traceback": run.traceback,
        "run_dir": run.run_dir,
        "backend": run.backend or "local",  # where it was launched: "local" | "slurm"
        "backend_job_id": run.backend_job_id,  # torchrun's pid, or the Slurm job id
        "torch_version": run.torch_version,
        "device_names": list(run.device_names or []),
        "gpus": list(run.gpus or []),
        "cancel_requested": run.cancel_requested,
        "set_id": run.set_id,  # the comparison set it was queued in; None when queued alone
    }


def get_run(engine: Engine, run_id: int) -> dict[str, Any] | None:
    """The run JSON (docs/storage-api.md): its row, summary result and per-rank figures; None if no such run."""
    with Session(engine) as s:
        run = s.get(Run, run_id)
        if run is None:
            return None
        rows = s.scalars(select(RankResult).where(RankResult.run_id == run_id).order_by(RankResult.rank)).all()
        return _run_dict(run, list(rows))


def list_runs(engine: Engine, filters: RunFilter | None = None, limit: int = 50, offset: int = 0) -> pd.DataFrame:
    """LIST_COLUMNS of the filtered runs, newest first, `verify`: the job's verify record (its verdict and
    differences, a small part of the stored result; None for a run that did not verify or has no result yet), and
    `weights`: the spec's weights path (None without), which names a Hugging Face folder's model."""
    cols = [getattr(Run, c) for c in LIST_COLUMNS] + [Run.result["verify"].label("verify"), WEIGHTS]
    query = (filters or RunFilter()).apply(select(*cols)).order_by(Run.id.desc()).limit(limit).offset(offset)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return pd.DataFrame(rows, columns=[*LIST_COLUMNS, "verify", "weights"])


def count_runs(engine: Engine, filters: RunFilter | None = None) -> int:
    query = (filters or RunFilter()).apply(select(func.count(Run.id)))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def distinct_values(engine: Engine, column: str) -> list[str]:
    """Values present in runs.<column> (for filter choices), sorted."""
    col = getattr(Run, column)
    with engine.connect() as conn:
        return sorted(v for (v,) in conn.execute(select(col).distinct()) if v)


def succeeded_runs(engine: Engine, model: str, workload: str) -> list[tuple[int, str, float, dict[str, Any]]]:
    """(id, strategy, tokens/s, spec) of every succeeded run of one model name and workload with a throughput,
    newest first: what api.best_runs picks from."""
    q = (
        select(Run.id, Run.strategy, Run.tokens_per_s, Run.spec)
        .where(Run.status == "succeeded", Run.model == model, Run.workload == workload, Run.tokens_per_s.is_not(None))
        .order_by(Run.id.desc())
    )
    with engine.connect() as conn:
        return [(int(i), str(s), float(t), dict(spec)) for i, s, t, spec in conn.execute(q)]


def active_runs(engine: Engine) -> pd.DataFrame:
    """Running and queued runs, oldest first, with progress, the reason a queued run waits and the spec's weights."""
    cols = ["id", "status", "strategy", "model", "workload", "world_size", "user", "created_at", "started_at",
            "progress_step", "total_steps", "wait_reason", "cancel_requested"]  # fmt: skip
    q = select(*(getattr(Run, c) for c in cols), WEIGHTS).where(Run.status.in_(("running", "queued"))).order_by(Run.id)
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(q).all(), columns=[*cols, "weights"])


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


# Beside the list's columns, what tells two runs of one layout apart in a spreadsheet: the work and how it ran.
CSV_SPEC_FIELDS = ("batch", "seq", "steps", "dtype", "microbatches", "schedule", "zero_stage", "checkpoint")


def iter_runs_csv(engine: Engine, filters: RunFilter | None = None) -> Iterator[str]:
    """CSV text of the filtered runs, streamed row by row from the query (header first)."""
    buf = io.StringIO()
    writer = csv.writer(buf)

    def flush() -> str:
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return text

    writer.writerow([*LIST_COLUMNS, *CSV_SPEC_FIELDS, "verify", "error"])
    yield flush()
    cols = [*(getattr(Run, c) for c in LIST_COLUMNS), Run.spec, Run.result["verify"].label("verify"), Run.error]
    query = (filters or RunFilter()).apply(select(*cols)).order_by(Run.id.desc())
    with engine.connect() as conn:
        for *row, spec, verify, error in conn.execution_options(stream_results=True, yield_per=500).execute(query):
            listed = ["|".join(v) if isinstance(v, list) else iso_utc(v) if isinstance(v, datetime) else v for v in row]
            passed = (verify or {}).get("passed")
            verdict = "" if verify is None or passed is None else "pass" if passed else "fail"
            writer.writerow([*listed, *((spec or {}).get(f) for f in CSV_SPEC_FIELDS), verdict, error or ""])
            yield flush()
