"""The engine: where the data lives (LAB_HOME, LAB_DB_URL), SQLite pragmas, and migrations applied at start.

One engine per URL per process. SQLite is the default (a file under LAB_HOME, WAL mode so the app
reads while the runner writes, a busy timeout so writers wait instead of failing); any SQLAlchemy
URL, PostgreSQL for a team, works by setting LAB_DB_URL.
"""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
_PG_MIGRATION_LOCK = 0x1AB_0001  # advisory lock key: "lab migrations"


def lab_home() -> Path:
    """The data folder: LAB_HOME, default ./lab-data (created on first use)."""
    home = Path(os.environ.get("LAB_HOME") or "lab-data").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def runs_dir() -> Path:
    path = lab_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def database_url() -> str:
    return os.environ.get("LAB_DB_URL") or f"sqlite:///{lab_home() / 'lab.db'}"


RUNNER_STALE_S = 30.0  # default: a runner whose heartbeat is older than this is presumed dead


def runner_stale_s() -> float:
    """Seconds without a heartbeat after which a runner's lease may be taken (LAB_RUNNER_STALE_S).

    Every process of one team must use the same value; every wait on the database is bounded by a third
    of it (db_wait_s), so a runner that is merely blocked on a lock never looks dead.
    """
    return float(os.environ.get("LAB_RUNNER_STALE_S") or RUNNER_STALE_S)


def db_wait_s() -> float:
    """The longest any statement waits for a lock: a third of the runner lease's stale limit.

    A runner blocked on the database must never look dead to another runner, so every wait ends (with an
    error the runner's loop survives) well before its heartbeat goes stale.
    """
    return runner_stale_s() / 3


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(db_wait_s() * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    try:
        cursor.execute("SELECT floor(1.5)")
    except sqlite3.OperationalError:
        # Telemetry buckets use floor(); SQLite builds without its math functions get Python's.
        dbapi_connection.create_function("floor", 1, lambda x: None if x is None else math.floor(x), deterministic=True)
    cursor.close()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One process at a time applies migrations, so an app and a runner starting together on a fresh
    database do not both create the tables (SQLite runs DDL outside a transaction; PostgreSQL would
    fail the second CREATE). SQLite: a lock file beside the database; PostgreSQL: an advisory lock.
    """
    if engine.dialect.name == "sqlite":
        path = engine.url.database
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.migrate-lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            # Waiting for another process's migration is not a lock wait to bound (lock_timeout below).
            conn.execute(text("SET LOCAL lock_timeout = 0"))
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
    else:
        yield


def get_engine(url: str | None = None, migrate: bool = True) -> Engine:
    """The process's engine for `url` (default: database_url()), schema upgraded to the newest revision."""
    url = url or database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            connect_args = {}
            if url.startswith("postgresql"):
                # Row locks (a claim, a lease takeover) wait at most this long, then the statement fails.
                connect_args["options"] = f"-c lock_timeout={int(db_wait_s() * 1000)}"
            engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
            if migrate:
                from storage.migrate import upgrade

                with _migration_lock(engine):
                    upgrade(engine)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Forget cached engines (tests switch LAB_HOME between cases)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
