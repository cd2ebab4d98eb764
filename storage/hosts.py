"""Hosts and their runners: one lease row per host, heartbeats, takeovers, and what happens to a silent host's runs.

Every machine serving the database runs one runner; it holds the lease of its host (LAB_HOST, else
the host name) and refreshes it. A lease whose heartbeat is older than runner_stale_s() may be taken
over; a host silent for longer loses its running runs. Functions return plain dicts.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from storage.db import runner_stale_s
from storage.models import Run, RunnerLease, iso_utc, utcnow

ANY_HOST = "*"  # a run aimed at any host whose runner has the devices it needs


def this_host() -> str:
    """This machine's name in a team's database: LAB_HOST, else the host name (one runner per host)."""
    return (os.environ.get("LAB_HOST") or socket.gethostname())[:128]


def _lease_dict(lease: RunnerLease) -> dict[str, Any]:
    age = (utcnow() - lease.heartbeat_at).total_seconds()
    return {
        "runner_id": lease.runner_id,
        "host": lease.host,
        "pid": lease.pid,
        "started_at": iso_utc(lease.started_at),
        "last_seen": iso_utc(lease.heartbeat_at),
        "age_s": age,
        "alive": age < runner_stale_s(),
        "gpus": list(lease.gpus or []),
        "gpu_note": lease.gpu_note,
        # A Slurm runner's partition (runner.service.cluster.Partition.to_dict: name, account, nodes with cpus, gpus
        # and state, or the error sinfo gave); None for a machine's own runner.
        "cluster": lease.cluster or None,
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
                  takeover_from: str | None = None, host: str | None = None,
                  cluster: dict[str, Any] | None = None) -> bool:  # fmt: skip
    """Take this host's runner lease if it is free, stale or already ours; True when we hold it.

    takeover_from: the id of a holder known to be dead (its process on this host is gone), taken over
    without waiting for its heartbeat to go stale. cluster: a Slurm runner's partition (None for a machine's
    runner), published for the Launch page and submit to validate against.
    """
    host = host or this_host()
    now = utcnow()
    stale = now - timedelta(seconds=runner_stale_s())
    values = dict(runner_id=runner_id, host=host, pid=pid, started_at=now, heartbeat_at=now, gpus=gpus,
                  gpu_note=gpu_note[:300], cluster=cluster)  # fmt: skip
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


def heartbeat(engine: Engine, runner_id: str, gpus: list[dict] | None = None,
              cluster: dict[str, Any] | None = None) -> bool:  # fmt: skip
    """Refresh our lease (and, when given, the devices or the partition it publishes); False means another
    runner took it (we must stop serving)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if gpus is not None:
        values["gpus"] = gpus
    if cluster is not None:
        values["cluster"] = cluster
    with engine.begin() as conn:
        return bool(
            conn.execute(update(RunnerLease).where(RunnerLease.runner_id == runner_id).values(**values)).rowcount
        )


def release_lease(engine: Engine, runner_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(RunnerLease).where(RunnerLease.runner_id == runner_id))


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
                        error=f"its host {host} stopped reporting (its runner was last seen {iso_utc(seen)}, "
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
