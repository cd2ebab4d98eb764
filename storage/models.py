"""The tables: runs, their per-rank results, step metrics, telemetry samples, timeline spans, the runner lease.

Typed SQLAlchemy 2 models with generic types (JSON, timezone-aware UTC datetimes, BigInteger for
bytes) so the same schema runs on SQLite and PostgreSQL. Changing a table means adding an Alembic
revision under storage/migrations/versions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from runner.spec.records import TERMINAL_STATUSES, RunStatus

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The run states are runner.spec.records.RunStatus; these tuples of their values are what SQL filters take.
RUN_STATES = tuple(s.value for s in RunStatus)
TERMINAL_STATES = tuple(s.value for s in TERMINAL_STATUSES)


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_utc(dt: datetime | None) -> str | None:
    """A stored time as the ISO text pages and the CLI show (UTC), None for none."""
    return dt.astimezone(UTC).isoformat() if dt else None


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in and out; SQLite keeps no zone, so it is restored on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to storage; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UTCDateTime}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=RunStatus.QUEUED.value)
    strategy: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(String(32), index=True)
    workload: Mapped[str] = mapped_column(String(16), index=True)
    world_size: Mapped[int] = mapped_column(Integer)
    tp: Mapped[int] = mapped_column(Integer, default=1)
    pp: Mapped[int] = mapped_column(Integer, default=1)
    dp: Mapped[int] = mapped_column(Integer, default=1)
    device: Mapped[str] = mapped_column(String(8), default="auto")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    note: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[str] = mapped_column(String(64), index=True, default="")
    host: Mapped[str] = mapped_column(String(128), default="")  # where it was submitted from
    # Where it may run: a host name (LAB_HOST), or None for any host with the devices it needs.
    target_host: Mapped[str | None] = mapped_column(String(128), nullable=True)
    runner_host: Mapped[str | None] = mapped_column(String(128), nullable=True)  # where it runs (set at claim)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    wait_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    failed_rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    run_dir: Mapped[str | None] = mapped_column(String(512), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Each rank's [pid, start time]: torchrun gives every rank a session of its own, so the runner signals
    # and watches the ranks themselves, also after a restart.
    rank_pids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    runner_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Where it was launched ("local": torchrun on the runner's machine; "slurm": an sbatch job) and that
    # backend's id for it (torchrun's pid, the Slurm job id), so a restarted runner re-attaches the same way.
    backend: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    backend_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    gpus: Mapped[list[Any]] = mapped_column(JSON, default=list)
    events_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    torch_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    device_names: Mapped[list[Any]] = mapped_column(JSON, default=list)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    tokens_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    step_time_s_p50: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_mem_bytes_max: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # The comparison set it was queued in (the id of the set's first run): the runner runs a set's runs one
    # at a time in queue order, which is round-robin over its specs. None: queued alone.
    set_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)

    # AUTOINCREMENT on SQLite: a deleted run's id is never handed out again, so a shared link
    # (?run=ID) can never come to show another run.
    __table_args__ = (Index("ix_runs_status_created", "status", "created_at"), {"sqlite_autoincrement": True})


class RankResult(Base):
    __tablename__ = "rank_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    tp: Mapped[int] = mapped_column(Integer, default=0)
    pp: Mapped[int] = mapped_column(Integer, default=0)
    dp: Mapped[int] = mapped_column(Integer, default=0)
    param_count: Mapped[int] = mapped_column(BigInteger, default=0)
    param_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    optimizer_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    peak_mem_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    compute_s: Mapped[float] = mapped_column(Float, default=0.0)
    comm_s: Mapped[float] = mapped_column(Float, default=0.0)
    idle_s: Mapped[float] = mapped_column(Float, default=0.0)
    comm_bytes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    comm_calls: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class StepMetric(Base):
    __tablename__ = "step_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    warmup: Mapped[bool] = mapped_column(Boolean, default=False)
    step_time_s: Mapped[float] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)  # held-out loss, every eval_every steps
    t: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_step_metrics_run_step", "run_id", "step"),)


class TelemetrySample(Base):
    __tablename__ = "telemetry_samples"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(16))  # 'gpu0' (NVML) or 'rank1' (psutil)
    host: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the node sampled (None: the runner's host)
    t_s: Mapped[float] = mapped_column(Float)  # seconds since the run started
    util_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    mem_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_telemetry_run_t", "run_id", "t_s"),)


class TimelineSpan(Base):
    __tablename__ = "timeline_spans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    stage: Mapped[int] = mapped_column(Integer)
    microbatch: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(16))
    start: Mapped[float] = mapped_column(Float)
    end: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index("ix_timeline_run_step", "run_id", "step"),)


class RunnerLease(Base):
    """One row per host: the runner serving this database from that machine, its heartbeat and its devices."""

    __tablename__ = "runner_lease"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    runner_id: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(128), unique=True)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    gpus: Mapped[list[Any]] = mapped_column(JSON, default=list)
    gpu_note: Mapped[str] = mapped_column(String(300), default="")
    # A Slurm runner's partition as sinfo reads it ({partition, account, nodes: [{name, cpus, gpus, state}]});
    # None for a runner that launches on its own machine.
    cluster: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class RunLog(Base):
    """The latest part of one log of a run (torchrun, rank0, ...), kept by the runner of the host it runs on,
    so any member of a team can read any run's logs from any machine."""

    __tablename__ = "run_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)  # the whole file's size when the tail was taken
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_run_logs_run_id"),)
