"""Shared fixtures: a fresh data folder (LAB_HOME) and database per test, and cleanup of runner processes."""

from __future__ import annotations

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
    """The default SQLite database under the test's LAB_HOME."""
    return get_engine()


@pytest.fixture(scope="session")
def pg_server():
    """One private PostgreSQL server for the session (Debian's binaries; `make test` installs them)."""
    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def db_engine(request, lab_home, monkeypatch):
    """The same test on SQLite and on a fresh PostgreSQL database (LAB_DB_URL, as a team would set it)."""
    if request.param == "postgres":
        monkeypatch.setenv("LAB_DB_URL", request.getfixturevalue("pg_server").new_database())
    return get_engine()


def stop_runner(engine, timeout: float = 10.0) -> None:
    """Stop the runner serving `engine` (SIGTERM: it releases its lease on the way out).

    Only a process that really is `python -m runner serve`: a test may hold the lease under a made-up pid.
    """
    import psutil

    from runner.service.launch import stop_group
    from storage import hosts

    status = hosts.runner_status(engine)
    if not status:
        return
    try:
        cmdline = psutil.Process(status["pid"]).cmdline()
    except psutil.Error:
        return
    if "runner" in cmdline and "serve" in cmdline:
        stop_group(status["pid"], timeout)  # the runner runs in its own session: its pid is its group


@pytest.fixture
def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for servers a test starts: streamlit, ...)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
