"""The runner on real processes: submit --wait runs torchrun and stores the result; failures, cancel, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runner.spec import RunSpec
from storage import queries
from tests.conftest import stop_runner
from tests.jobs import wait_status

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def start_runner(engine) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "runner", "serve"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = queries.runner_status(engine)
        if status and status["alive"] and status["pid"] == proc.pid:
            return proc
        time.sleep(0.2)
    raise AssertionError("runner did not come up")


def test_submit_wait_runs_a_single_rank_train_and_stores_result_ranks_and_steps(engine):
    proc = cli("submit", "--strategy", "single", "--model", "tiny", "--workload", "train", "--steps", "2",
               "--wait", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded" and run["error"] is None and run["exit_code"] == 0
    stored = queries.get_run(engine, run["id"])
    assert stored["result"]["step_time_s_p50"] > 0 and stored["result"]["tokens_per_s"] > 0
    assert [r["rank"] for r in stored["ranks"]] == [0] and stored["ranks"][0]["param_count"] > 0
    assert stored["torch_version"].startswith("2.13.0") and stored["device_names"] == ["cpu"]
    assert stored["started_at"] <= stored["finished_at"]
    steps = queries.step_metrics(engine, run["id"])
    assert list(steps["step"]) == [0, 1, 2] and list(steps["warmup"]) == [True, False, False]
    listed = queries.list_runs(engine)
    assert listed.loc[0, "id"] == run["id"] and listed.loc[0, "tokens_per_s"] > 0
    assert set(queries.telemetry_series(engine, [run["id"]])["source"]) <= {"rank0"}
    assert queries.runner_status(engine)["alive"]  # --wait started the runner, which keeps serving


def test_submit_wait_runs_a_layer_split_and_stores_its_result(engine):
    proc = cli("submit", "--strategy", "layer", "--pp", "2", "--model", "tiny", "--workload", "train",
               "--steps", "3", "--verify", "--wait", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded"
    assert run["result"]["verify"]["grads_max_abs_diff"] <= 1e-5
    assert run["result"]["tokens_per_s"] > 0
    assert [r["rank"] for r in run["ranks"]] == [0, 1] and all(r["peak_mem_bytes"] > 0 for r in run["ranks"])
    stored = queries.get_run(engine, run["id"])
    assert stored["progress"] == {"step": 4, "total": 4}
    assert len(queries.step_metrics(engine, run["id"])) == 4
    assert set(queries.telemetry_series(engine, [run["id"]])["source"]) <= {"rank0", "rank1"}
    assert Path(stored["run_dir"], "rank1.log").exists()
    logs = cli("logs", str(run["id"]), "--rank", "1")
    assert logs.returncode == 0


def test_a_killed_rank_fails_the_run_with_the_rank_named_and_the_queue_goes_on(engine):
    runner = start_runner(engine)
    try:
        slow = RunSpec(strategy="layer", pp=2, model="small", workload="train", steps=200, batch=8, seq=128)
        victim = queries.submit_run(engine, slow)
        after = queries.submit_run(engine, RunSpec(strategy="single", model="tiny", steps=2))
        run = wait_status(engine, victim, {"running"})
        deadline = time.monotonic() + 60
        rank1 = None
        while rank1 is None and time.monotonic() < deadline:
            for child in psutil.Process(run_pid(engine, victim)).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1":
                        rank1 = child
                except psutil.Error:
                    pass
            time.sleep(0.2)
        wait_progress(engine, victim)
        rank1.kill()
        failed = wait_status(engine, victim, {"failed", "succeeded"}, timeout=120)
        assert failed["status"] == "failed", failed
        assert failed["failed_rank"] == 1 and "rank 1" in failed["error"], failed["error"]
        assert wait_status(engine, after, {"succeeded", "failed"})["status"] == "succeeded"
        assert run["status"] == "running"
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def run_pid(engine, run_id: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid = queries.get_run(engine, run_id) and _pid(engine, run_id)
        if pid:
            return pid
        time.sleep(0.1)
    raise AssertionError("no pid")


def _pid(engine, run_id: int) -> int | None:
    rows = [r for r in queries.running_runs(engine) if r["id"] == run_id]
    return rows[0]["pid"] if rows else None


def wait_progress(engine, run_id: int, steps: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while queries.get_run(engine, run_id)["progress"]["step"] < steps:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.2)


def test_cancel_of_a_running_4_rank_job_leaves_no_process(engine):
    runner = start_runner(engine)
    try:
        spec = RunSpec(strategy="layer", pp=4, model="small", workload="train", steps=500, batch=8, seq=128)
        run_id = queries.submit_run(engine, spec)
        wait_status(engine, run_id, {"running"})
        pid = run_pid(engine, run_id)
        wait_progress(engine, run_id, steps=1)
        pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        assert len(pids) >= 5  # torchrun + 4 ranks
        started = time.monotonic()
        assert queries.request_cancel(engine, run_id) == "cancelling"
        run = wait_status(engine, run_id, {"cancelled", "failed", "succeeded"}, timeout=30)
        assert run["status"] == "cancelled"
        assert time.monotonic() - started < 5 + 5  # grace period plus a few seconds
        time.sleep(0.5)
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def test_runner_restart_adopts_a_live_job_and_marks_a_dead_one_lost(engine):
    runner = start_runner(engine)
    spec = RunSpec(strategy="layer", pp=2, model="small", workload="train", steps=30, batch=8, seq=128)
    run_id = queries.submit_run(engine, spec)
    wait_status(engine, run_id, {"running"})
    wait_progress(engine, run_id, steps=1)
    os.kill(runner.pid, signal.SIGKILL)  # the runner dies; its job lives on in its own session
    runner.wait(timeout=10)
    runner = start_runner_after_stale(engine)
    try:
        run = wait_status(engine, run_id, {"succeeded", "failed", "lost"}, timeout=180)
        assert run["status"] == "succeeded", run
        assert run["result"]["tokens_per_s"] > 0
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)
    # A running run whose processes are gone becomes lost when a runner starts.
    ghost = queries.submit_run(engine, RunSpec(strategy="single", model="tiny"))
    queries.claim_run(engine, ghost, "dead-runner", "/nonexistent", [])
    queries.update_run(engine, ghost, pid=2**22 + 12345)
    before = queries.get_run(engine, run_id)
    runner = start_runner(engine)
    try:
        lost = wait_status(engine, ghost, {"lost"}, timeout=30)
        assert "vanished" in lost["error"]
        assert queries.get_run(engine, run_id) == before  # nothing else changed
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def start_runner_after_stale(engine) -> subprocess.Popen:
    """A killed runner's lease goes stale after RUNNER_STALE_S; a new runner then takes over."""
    deadline = time.monotonic() + queries.RUNNER_STALE_S + 30
    while time.monotonic() < deadline:
        status = queries.runner_status(engine)
        if not status or not status["alive"]:
            return start_runner(engine)
        time.sleep(0.5)
    raise AssertionError("lease never went stale")


def test_time_limit_stops_the_run_as_failed_with_the_reason(engine):
    runner = start_runner(engine)
    try:
        spec = RunSpec(strategy="single", model="small", workload="train", steps=10_000, time_limit_s=8)
        run_id = queries.submit_run(engine, spec)
        run = wait_status(engine, run_id, {"failed", "succeeded"}, timeout=60)
        assert run["status"] == "failed" and "time limit of 8 s" in run["error"]
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def test_runs_submitted_from_four_threads_all_run_once_on_sqlite_and_postgres(db_engine):
    """The real runner, two CPU jobs at a time, drains a burst of submissions: all succeed, none twice."""
    import threading

    engine = db_engine
    ids: list[int] = []
    lock = threading.Lock()

    def submit(n):
        for _ in range(n):
            run_id = queries.submit_run(engine, RunSpec(strategy="single", model="tiny", steps=1, warmup=0))
            with lock:
                ids.append(run_id)

    # 50 runs racing for claims are covered in test_storage (both backends); here 6 real jobs keep it quick.
    threads = [threading.Thread(target=submit, args=(n,)) for n in (2, 2, 1, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--max-cpu-jobs", "2"], cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        runs = [wait_status(engine, run_id, {"succeeded", "failed", "lost"}, timeout=180) for run_id in ids]
        assert [r["status"] for r in runs] == ["succeeded"] * 6
        run_dirs = [r["run_dir"] for r in runs]
        assert len(set(run_dirs)) == 6  # each launched once, in its own folder
        for r in runs:
            starts = [
                line for line in Path(r["run_dir"], "events.jsonl").read_text().splitlines() if '"started"' in line
            ]
            assert len(starts) == 1
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)
