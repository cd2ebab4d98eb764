"""Run a real torchrun job (gloo on CPU) from a spec dict in a tmp folder and read back what it wrote.

Shared by every multi-rank strategy test: no mocks, the same entry point the runner launches.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from runner.service.launch import torchrun_argv, torchrun_launcher
from runner.spec.run_spec import RunSpec
from runner.spec.validation import validate_spec

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(extra: dict | None = None) -> dict[str, str]:
    """The environment of a test's ranks: one intra-op thread each, as runner/service/launch.py gives CPU jobs, and
    the repository on the path; `extra` on top.

    Test-only knobs, to check the numeric bounds under other kernels (ONEDNN_MAX_CPU_ISA,
    MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY reach the ranks from the environment as they are):
    LAB_TEST_RANK_THREADS replaces the one thread; LAB_TEST_PYTHONPATH goes on the path before the
    repository, so a sitecustomize.py there runs first in every rank (torch.backends.mkldnn off, say).
    """
    path = [p for p in (os.environ.get("LAB_TEST_PYTHONPATH"), str(REPO)) if p]
    threads = os.environ.get("LAB_TEST_RANK_THREADS", "1")
    return {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": os.pathsep.join(path), **(extra or {})}


def run_torchrun(
    spec: dict, run_dir: Path, timeout: float = 300, module: str = "runner.job", env: dict | None = None
) -> dict:
    """Launch `spec` with torchrun; return result.json, or raise with the rank logs on failure.

    Port 0: the launcher binds its rendezvous store itself, so parallel tests never race for a port.
    `module` replaces the job's entry point with a test's own (one that patches the job, then runs it);
    `env` adds environment variables for the ranks.
    """
    run_spec = RunSpec.from_dict(spec)
    problems = validate_spec(run_spec, gpu_count=0)
    assert not problems, problems
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = rank_env(env)
    argv = torchrun_argv(run_spec, str(run_dir / "spec.json"))
    if module != "runner.job":
        argv = [*torchrun_launcher(run_spec.world_size), "-m", module, str(run_dir / "spec.json")]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not (run_dir / "result.json").exists():
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(run_dir.glob("rank*.log")))
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}\n{logs}")
    return json.loads((run_dir / "result.json").read_text())


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def wait_status(engine, run_id: int, statuses: set[str], timeout: float = 120, between=None) -> dict:
    """Poll storage until the run reaches one of `statuses`; `between` runs before each look (a runner tick)."""
    import time

    from storage import runs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if between is not None:
            between()
        run = runs.get_run(engine, run_id)
        if run["status"] in statuses:
            return run
        time.sleep(0.1 if between is not None else 0.2)
    raise AssertionError(f"run {run_id} still {runs.get_run(engine, run_id)['status']}")
