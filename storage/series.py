"""What was measured during runs, read for charts: per-rank figures, step metrics, telemetry, timeline spans, log tails.

Each reader returns a DataFrame (or plain dicts) with the columns its chart uses; telemetry is
downsampled in SQL so a chart gets at most one point per bucket however long the run was.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from storage import ranks
from storage.models import RankResult, RunLog, StepMetric, TelemetrySample, TimelineSpan, iso_utc


def rank_results(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    """One row per (run, rank): the rank's figures, bytes moved per collective kind as comm_bytes_<kind>."""
    with Session(engine) as s:
        rows = s.scalars(
            select(RankResult).where(RankResult.run_id.in_(run_ids)).order_by(RankResult.run_id, RankResult.rank)
        ).all()
        records = []
        for r in rows:
            d = ranks.from_row(r).to_dict()
            d["run_id"] = r.run_id
            for kind, n in (d.pop("comm_bytes") or {}).items():
                d[f"comm_bytes_{kind}"] = n
            d.pop("comm_calls")
            records.append(d)
    return pd.DataFrame.from_records(records)


STEP_COLUMNS = ("step", "warmup", "step_time_s", "loss", "eval_loss", "t")


def step_metrics(engine: Engine, run_id: int) -> pd.DataFrame:
    """One row per step of a run: its time, its training loss and (on eval_every's steps) its held-out loss."""
    q = select(*(getattr(StepMetric, c) for c in STEP_COLUMNS)).where(StepMetric.run_id == run_id)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(StepMetric.step)).all()
    return pd.DataFrame(rows, columns=list(STEP_COLUMNS))


def loss_curves(engine: Engine, run_ids: list[int]) -> pd.DataFrame:
    """The loss per step of several runs (run_id, step, loss, eval_loss), for overlaying their curves."""
    cols = (StepMetric.run_id, StepMetric.step, StepMetric.loss, StepMetric.eval_loss)
    q = select(*cols).where(StepMetric.run_id.in_(run_ids)).order_by(StepMetric.run_id, StepMetric.step)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return pd.DataFrame(rows, columns=["run_id", "step", "loss", "eval_loss"])


def telemetry_series(engine: Engine, run_ids: list[int], bucket_s: float = 1.0) -> pd.DataFrame:
    """Samples averaged per (run, node, source, time bucket) in SQL, so a chart gets at most one point a bucket.

    `host` is the node a sample was taken on: "" for samples the runner took on its own host (every local run),
    the node's name for a multi-node run's (each node samples its own GPUs or rank processes)."""
    bucket = func.floor(TelemetrySample.t_s / bucket_s)
    host = func.coalesce(TelemetrySample.host, "")
    q = (
        select(
            TelemetrySample.run_id,
            host.label("host"),
            TelemetrySample.source,
            (bucket * bucket_s).label("t_s"),
            func.avg(TelemetrySample.util_pct).label("util_pct"),
            func.max(TelemetrySample.mem_bytes).label("mem_bytes"),
        )
        .where(TelemetrySample.run_id.in_(run_ids))
        .group_by(TelemetrySample.run_id, host, TelemetrySample.source, bucket)
        .order_by(TelemetrySample.run_id, host, TelemetrySample.source, bucket)
    )
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return pd.DataFrame(rows, columns=["run_id", "host", "source", "t_s", "util_pct", "mem_bytes"])


def timeline_spans(engine: Engine, run_id: int) -> pd.DataFrame:
    cols = ["step", "rank", "stage", "microbatch", "phase", "start", "end"]
    q = select(*(getattr(TimelineSpan, c) for c in cols)).where(TimelineSpan.run_id == run_id)
    with engine.connect() as conn:
        rows = conn.execute(q.order_by(TimelineSpan.step, TimelineSpan.rank, TimelineSpan.start)).all()
    return pd.DataFrame(rows, columns=cols)


def run_logs(engine: Engine, run_id: int) -> dict[str, dict[str, Any]]:
    """The stored log tails of a run, by name ('torchrun', 'rank0', ...): {text, size, updated_at}; readable
    from any machine of the team, whichever host ran it."""
    q = select(RunLog.name, RunLog.text, RunLog.size, RunLog.updated_at).where(RunLog.run_id == run_id)
    with engine.connect() as conn:
        return {
            r.name: {"text": r.text, "size": r.size, "updated_at": iso_utc(r.updated_at)}
            for r in conn.execute(q.order_by(RunLog.name))
        }
