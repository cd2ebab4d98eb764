"""The engine: where the data lives (LAB_HOME, LAB_DB_URL), SQLite pragmas, and migrations applied at start.

One engine per URL per process. SQLite is the default (a file under LAB_HOME, WAL mode so the app
reads while the runner writes, a busy timeout so writers wait instead of failing); any SQLAlchemy
URL, PostgreSQL for a team, works by setting LAB_DB_URL.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


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


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def get_engine(url: str | None = None, migrate: bool = True) -> Engine:
    """The process's engine for `url` (default: database_url()), schema upgraded to the newest revision."""
    url = url or database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(url, pool_pre_ping=True)
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _sqlite_pragmas)
            if migrate:
                from storage.migrate import upgrade

                upgrade(engine)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Forget cached engines (tests switch LAB_HOME between cases)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
