"""Shared fixtures: a fresh data folder (LAB_HOME) and database per test, and cleanup of runner processes."""

from __future__ import annotations

import os
import signal
import time

import pytest

from storage.db import dispose_engines, get_engine


@pytest.fixture
def lab_home(tmp_path, monkeypatch):
    """An empty LAB_HOME with its own SQLite database; any runner started inside is stopped afterwards."""
    home = tmp_path / "lab"
    monkeypatch.setenv("LAB_HOME", str(home))
    monkeypatch.delenv("LAB_DB_URL", raising=False)
    dispose_engines()
    yield home
    stop_runner(get_engine())
    dispose_engines()


@pytest.fixture
def engine(lab_home):
    return get_engine()


def stop_runner(engine, timeout: float = 10.0) -> None:
    """SIGTERM the runner serving `engine` (it releases its lease on the way out)."""
    from storage import queries

    status = queries.runner_status(engine)
    if not status:
        return
    try:
        os.kill(status["pid"], signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(status["pid"], 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(status["pid"], signal.SIGKILL)
