"""The planner's tables (revision 0007): `calibrations`, a host's measured matmul rate and all-reduce bandwidth
per device kind (`python -m runner calibrate` stores one row per dtype measured; the planner reads the newest of
a host, runner/planner/calibrate.py), and `plan_predictions`, what the planner predicted for a run launched from a
plan (the Planner page stores it after api.submit; Compare reads it beside the measured figures).
Plain dicts out, no live ORM objects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Engine, Float, ForeignKey, Index, Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from storage.models import Base, UTCDateTime, iso_utc, utcnow


class Calibration(Base):
    """One measurement on one host: matmul FLOP/s of one device (one CPU rank or one GPU) in a dtype, and
    the bus bandwidth of an all-reduce between `allreduce_ranks` local processes over `backend`."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(128))
    device: Mapped[str] = mapped_column(String(16))  # "cpu" or "cuda"
    device_name: Mapped[str] = mapped_column(String(200))  # the GPU's NVML name, or the CPU model
    dtype: Mapped[str] = mapped_column(String(16))
    matmul_flops: Mapped[float] = mapped_column(Float)
    allreduce_bytes_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    allreduce_ranks: Mapped[int | None] = mapped_column(Integer, nullable=True)
    backend: Mapped[str | None] = mapped_column(String(16), nullable=True)
    measured_at: Mapped[datetime] = mapped_column(UTCDateTime)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (Index("ix_calibrations_host", "host", "measured_at"),)


def _as_dict(row: Calibration) -> dict[str, Any]:
    return {
        "id": row.id,
        "host": row.host,
        "device": row.device,
        "device_name": row.device_name,
        "dtype": row.dtype,
        "matmul_flops": row.matmul_flops,
        "allreduce_bytes_per_s": row.allreduce_bytes_per_s,
        "allreduce_ranks": row.allreduce_ranks,
        "backend": row.backend,
        "measured_at": iso_utc(row.measured_at),
        "detail": row.detail or {},
    }


def store_calibration(engine: Engine, values: dict[str, Any]) -> int:
    """Insert one calibration ({host, device, device_name, dtype, matmul_flops, ...}); returns its id."""
    known = {c.name for c in Calibration.__table__.columns} - {"id", "measured_at"}
    row = Calibration(
        **{k: v for k, v in values.items() if k in known}, measured_at=values.get("measured_at") or utcnow()
    )
    with Session(engine) as s:
        s.add(row)
        s.commit()
        return row.id


def latest_calibration(engine: Engine, host: str, device: str | None = None) -> dict[str, Any] | None:
    """The newest calibration of `host` (of `device` 'cpu'/'cuda' when given), or None."""
    q = select(Calibration).where(Calibration.host == host)
    if device is not None:
        q = q.where(Calibration.device == device)
    with Session(engine) as s:
        row = s.scalars(q.order_by(Calibration.measured_at.desc(), Calibration.id.desc())).first()
        return _as_dict(row) if row is not None else None


def calibrations(engine: Engine, host: str | None = None) -> list[dict[str, Any]]:
    """Every calibration, newest first (of one host when given)."""
    q = select(Calibration)
    if host is not None:
        q = q.where(Calibration.host == host)
    with Session(engine) as s:
        return [_as_dict(r) for r in s.scalars(q.order_by(Calibration.measured_at.desc(), Calibration.id.desc()))]


class PlanPrediction(Base):
    """What the planner predicted for a run launched from a plan (runner/planner, ui/planner.py): the layout,
    memory per pipeline stage, step time and bubble, as `ui.planner.prediction_record` writes them."""

    __tablename__ = "plan_predictions"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    prediction: Mapped[dict[str, Any]] = mapped_column(JSON)


def store_prediction(engine: Engine, run_id: int, prediction: dict[str, Any]) -> None:
    """Keep the planner's prediction for run `run_id` (replacing an earlier one)."""
    with Session(engine) as s:
        s.merge(PlanPrediction(run_id=run_id, created_at=utcnow(), prediction=prediction))
        s.commit()


def prediction_of(engine: Engine, run_id: int) -> dict[str, Any] | None:
    """The prediction a run was launched with, or None (not launched from a plan)."""
    with Session(engine) as s:
        row = s.get(PlanPrediction, run_id)
        return dict(row.prediction) if row is not None else None


def predictions(engine: Engine, run_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Predictions of the given runs that have one, by run id."""
    if not run_ids:
        return {}
    with Session(engine) as s:
        rows = s.scalars(select(PlanPrediction).where(PlanPrediction.run_id.in_(run_ids)))
        return {r.run_id: dict(r.prediction) for r in rows}
