"""Starting the runner from the app or the CLI: ensure_runner() starts `python -m runner serve` unless one is alive.

The runner is its own process session, so it outlives whatever started it; a second one started by a
race exits at once (the runner lease decides). No torch import: the app imports this.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from sqlalchemy import Engine

from runner.service.launch import REPO_ROOT
from storage.db import database_url, get_engine, lab_home
from storage.hosts import runner_status


def ensure_runner(db_url: str | None = None) -> bool:
    """Start `python -m runner serve` for the database unless a live runner already serves it.

    Returns True when a runner was started now. The runner is its own process session, so it
    outlives the app; a second one started by a race exits at once (the lease decides).
    """
    url = db_url or database_url()
    status = runner_status(get_engine(url))
    if status and status["alive"]:
        return False
    env = dict(os.environ)
    env["LAB_DB_URL"] = url
    env["LAB_HOME"] = str(lab_home())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(lab_home() / "runner.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "runner", "serve"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return True


def wait_for_runner(engine: Engine, timeout_s: float = 30.0) -> bool:
    """True once a live runner serves this host (within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = runner_status(engine)
        if status and status["alive"]:
            return True
        time.sleep(0.2)
    return False
