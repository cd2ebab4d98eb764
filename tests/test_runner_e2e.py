"""The runner on real processes: submit --wait runs torchrun and stores the result; failures, cancel, restarts."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from runner import api
from runner.spec.run_spec import RunSpec
from storage import hosts, runner_rows, runs, series
from tests.conftest import stop_runner
from tests.jobs import wait_status

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def start_runner(engine, log: Path | None = None) -> subprocess.Popen:
    """`runner serve` in its own session, up once its lease is held; `log`: where its output goes (else nowhere)."""
    out = log.open("w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "runner", "serve"], cwd=REPO, start_new_session=True,
                            stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    if log is not None:
        out.close()  # the child holds its own copy
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = hosts.runner_status(engine)
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
    stored = runs.get_run(engine, run["id"])
    assert stored["result"]["step_time_s_p50"] > 0 and stored["result"]["tokens_per_s"] > 0
    assert [r["rank"] for r in stored["ranks"]] == [0] and stored["ranks"][0]["param_count"] > 0
    assert stored["torch_version"].startswith("2.13.0") and stored["device_names"] == ["cpu"]
    assert stored["started_at"] <= stored["finished_at"]
    steps = series.step_metrics(engine, run["id"])
    assert list(steps["step"]) == [0, 1, 2] and list(steps["warmup"]) == [True, False, False]
    listed = runs.list_runs(engine)
    assert listed.loc[0, "id"] == run["id"] and listed.loc[0, "tokens_per_s"] > 0
    assert set(series.telemetry_series(engine, [run["id"]])["source"]) <= {"rank0"}
    assert hosts.runner_status(engine)["alive"]  # --wait started the runner, which keeps serving


def test_submit_wait_runs_a_layer_split_and_stores_its_result(engine):
    proc = cli("submit", "--strategy", "layer", "--pp", "2", "--model", "tiny", "--workload", "train",
               "--steps", "3", "--verify", "--wait", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "succeeded"
    assert run["result"]["verify"]["grads_max_abs_diff"] <= 1e-5
    assert run["result"]["tokens_per_s"] > 0
    assert [r["rank"] for r in run["ranks"]] == [0, 1] and all(r["peak_mem_bytes"] > 0 for r in run["ranks"])
    stored = runs.get_run(engine, run["id"])
    assert stored["progress"] == {"step": 4, "total": 4}
    assert len(series.step_metrics(engine, run["id"])) == 4
    assert set(series.telemetry_series(engine, [run["id"]])["source"]) <= {"rank0", "rank1"}
    assert Path(stored["run_dir"], "rank1.log").exists()
    logs = cli("logs", str(run["id"]), "--rank", "1")
    assert logs.returncode == 0


def test_a_killed_rank_fails_the_run_with_the_rank_named_and_the_queue_goes_on(engine):
    runner = start_runner(engine)
    try:
        slow = RunSpec(strategy="layer", pp=2, model="tiny", workload="train", steps=100_000)  # until killed
        victim = api.submit(engine, slow)
        after = api.submit(engine, RunSpec(strategy="single", model="tiny", steps=2))
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
        pid = runs.get_run(engine, run_id) and _pid(engine, run_id)
        if pid:
            return pid
        time.sleep(0.1)
    raise AssertionError("no pid")


def _pid(engine, run_id: int) -> int | None:
    rows = [r for r in runner_rows.running_runs(engine) if r["id"] == run_id]
    return rows[0]["pid"] if rows else None


def wait_progress(engine, run_id: int, steps: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while runs.get_run(engine, run_id)["progress"]["step"] < steps:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.2)


def test_cancel_of_a_running_4_rank_job_leaves_no_process(engine):
    runner = start_runner(engine)
    try:
        spec = RunSpec(strategy="layer", pp=4, model="tiny", workload="train", steps=100_000)  # until cancelled
        run_id = api.submit(engine, spec)
        wait_status(engine, run_id, {"running"})
        pid = run_pid(engine, run_id)
        wait_progress(engine, run_id, steps=1)
        pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        assert len(pids) >= 5  # torchrun + 4 ranks
        started = time.monotonic()
        assert runs.request_cancel(engine, run_id) == "cancelling"
        run = wait_status(engine, run_id, {"cancelled", "failed", "succeeded"}, timeout=30)
        assert run["status"] == "cancelled"
        assert time.monotonic() - started < 5 + 5  # grace period plus a few seconds
        time.sleep(0.5)
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def test_runner_restart_adopts_a_live_job_and_marks_a_dead_one_lost(engine, tmp_path):
    runner = start_runner(engine)
    spec = RunSpec(strategy="layer", pp=2, model="small", workload="train", steps=15, batch=8, seq=128)
    run_id = api.submit(engine, spec)
    wait_status(engine, run_id, {"running"})
    wait_progress(engine, run_id, steps=1)
    os.kill(runner.pid, signal.SIGKILL)  # the runner dies; its job lives on in its own session
    runner.wait(timeout=10)
    # its holder's process is gone on this host: taken over without waiting
    runner = start_runner(engine, log=tmp_path / "second-runner.log")
    try:
        run = wait_status(engine, run_id, {"succeeded", "failed", "lost"}, timeout=180)
        assert run["status"] == "succeeded", run
        assert run["result"]["tokens_per_s"] > 0
        # the job was still running when the new runner came up (not a result found after the fact)
        assert f"run {run_id}: adopted its live job" in (tmp_path / "second-runner.log").read_text()
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)
    # A running run whose processes are gone becomes lost when a runner starts.
    ghost = api.submit(engine, RunSpec(strategy="single", model="tiny"))
    runner_rows.claim_run(engine, ghost, "dead-runner", "/nonexistent", [])
    runner_rows.update_run(engine, ghost, pid=2**22 + 12345)
    before = runs.get_run(engine, run_id)
    runner = start_runner(engine)
    try:
        lost = wait_status(engine, ghost, {"lost"}, timeout=30)
        assert "vanished" in lost["error"]
        assert runs.get_run(engine, run_id) == before  # nothing else changed
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def test_time_limit_stops_the_run_as_failed_with_the_reason(engine):
    runner = start_runner(engine)
    try:
        spec = RunSpec(strategy="single", model="small", workload="train", steps=10_000, time_limit_s=8)
        run_id = api.submit(engine, spec)
        run = wait_status(engine, run_id, {"failed", "succeeded"}, timeout=60)
        assert run["status"] == "failed" and "time limit of 8 s" in run["error"]
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def test_runs_submitted_from_four_threads_all_run_once_on_postgres(pg_server, lab_home, monkeypatch):
    """The real runner, two CPU jobs at a time, drains a burst of submissions: all succeed, none twice. On a team's
    PostgreSQL, where claims race over the network (50 racing runs on both backends: tests/test_storage.py; every
    other runner test here runs on SQLite)."""
    import threading

    from storage.db import get_engine

    monkeypatch.setenv("LAB_DB_URL", pg_server.new_database())
    engine = get_engine()
    ids: list[int] = []
    lock = threading.Lock()

    def submit(n):
        for _ in range(n):
            run_id = api.submit(engine, RunSpec(strategy="single", model="tiny", steps=1, warmup=0))
            with lock:
                ids.append(run_id)

    # 50 runs racing for claims are covered in test_storage (both backends); here 4 real jobs, two rounds of two.
    threads = [threading.Thread(target=submit, args=(n,)) for n in (1, 1, 1, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runner = subprocess.Popen([sys.executable, "-m", "runner", "serve", "--max-cpu-jobs", "2"], cwd=REPO,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        ended = [wait_status(engine, run_id, {"succeeded", "failed", "lost"}, timeout=180) for run_id in ids]
        assert [r["status"] for r in ended] == ["succeeded"] * 4
        run_dirs = [r["run_dir"] for r in ended]
        assert len(set(run_dirs)) == 4  # each launched once, in its own folder
        for r in ended:
            starts = [
                line for line in Path(r["run_dir"], "events.jsonl").read_text().splitlines() if '"started"' in line
            ]
            assert len(starts) == 1
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def rank_pids(engine, run_id: int, n: int) -> list[int]:
    """The pids of a running job's n ranks (torchrun's children), once all have started."""
    pid = run_pid(engine, run_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ranks = [c.pid for c in psutil.Process(pid).children()]
        if len(ranks) == n:
            return ranks
        time.sleep(0.1)
    raise AssertionError("ranks never all started")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_torchrun_leaves_no_rank_alive_and_the_next_run_starts_only_after_them(engine):
    """torchrun gives each rank its own session, so killing torchrun's group alone would orphan them."""
    runner = start_runner(engine)  # one CPU job at a time: the next run needs the slot the killed one held
    try:
        victim = api.submit(engine, RunSpec(strategy="data", dp=2, model="tiny", steps=100_000))
        after = api.submit(engine, RunSpec(strategy="single", model="tiny", steps=1, warmup=0))
        wait_status(engine, victim, {"running"})
        wait_progress(engine, victim, steps=1)
        ranks = rank_pids(engine, victim, 2)
        os.kill(run_pid(engine, victim), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in ranks):
            assert time.monotonic() < deadline, [p for p in ranks if alive(p)]
            time.sleep(0.05)
        gone = time.time()
        failed = wait_status(engine, victim, {"failed", "succeeded", "cancelled", "lost"}, timeout=60)
        assert failed["status"] == "failed", failed
        nxt = wait_status(engine, after, {"succeeded", "failed"}, timeout=120)
        assert nxt["status"] == "succeeded"
        assert datetime.fromisoformat(nxt["started_at"]).timestamp() >= gone - 0.2  # never beside a live rank
    finally:
        stop_runner(engine)
        runner.wait(timeout=10)


def test_a_rank_that_ignores_sigterm_is_gone_after_cancel(engine):
    """The real job under real torchrun, rank 1 ignoring SIGTERM; the runner in-process, ticked by the test."""
    from runner.service.launch import TORCHRUN_SHUTDOWN_S
    from runner.service.launchers.local import CANCEL_GRACE_S
    from runner.service.loop import Runner

    runner = Runner(engine)
    assert runner.acquire()
    runner.job_entry = ("-m", "tests.stubborn_job")
    run_id = api.submit(engine, RunSpec(strategy="data", dp=2, model="tiny", steps=100_000))
    deadline = time.monotonic() + 120
    while runs.get_run(engine, run_id)["progress"]["step"] < 1 or len(runner.watched[run_id].job.ranks) < 2:
        assert time.monotonic() < deadline, "no progress"
        runner.tick()
        time.sleep(0.1)
    job = runner.watched[run_id].job
    pids = [job.pid, *job.ranks]
    try:
        started = time.monotonic()
        assert runs.request_cancel(engine, run_id) == "cancelling"
        run = wait_status(engine, run_id, {"cancelled", "failed", "succeeded"}, timeout=CANCEL_GRACE_S + 30,
                          between=runner.tick)  # fmt: skip
        assert run["status"] == "cancelled"
        assert not [p for p in pids if alive(p)]
        # torchrun's own SIGKILL after its grace took the stubborn rank; the runner's would follow 5 s later.
        assert time.monotonic() - started < CANCEL_GRACE_S + 5
        assert time.monotonic() - started >= TORCHRUN_SHUTDOWN_S - 1  # it really did ignore SIGTERM
    finally:
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_diverged_run_ends_failed_naming_the_step_and_unreadable_rows_never_stop_the_runner(db_engine):
    """`submit --lr 1e6 --wait` on SQLite and on PostgreSQL (whose JSON refuses NaN), with rows the runner cannot
    read waiting for it: a queued run whose spec is not an object and a running one whose spec no longer parses."""
    engine = db_engine
    bad_queued = api.submit(engine, RunSpec(strategy="single", model="tiny"))
    runner_rows.update_run(engine, bad_queued, spec=["not", "a", "spec"])
    bad_running = api.submit(engine, RunSpec(strategy="single", model="tiny"))
    runner_rows.claim_run(engine, bad_running, "a-runner-long-gone", "/nonexistent", [])
    runner_rows.update_run(engine, bad_running, pid=2**22 + 99, spec={"strategy": 7})
    proc = cli("submit", "--strategy", "single", "--model", "tiny", "--lr", "1e6", "--wait", "--json",
               "--timeout", "240")  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run = json.loads(proc.stdout)
    assert run["status"] == "failed", run
    assert re.fullmatch(r"loss became (NaN|inf|-inf) at step \d+: training diverged .*", run["error"]), run["error"]
    assert run["result"]["tokens_per_s"] > 0  # the timings were real and are kept
    assert run["result"]["loss"] is None and any(n.startswith("loss = ") for n in run["result"]["non_finite"])
    assert series.step_metrics(engine, run["id"])["loss"].isna().any()
    assert "must be a JSON object" in runs.get_run(engine, bad_queued)["error"]
    assert "stored spec cannot be read" in runs.get_run(engine, bad_running)["error"]


def test_a_runner_frozen_past_the_stale_limit_is_replaced_and_launches_nothing_after_sigcont(engine, monkeypatch):
    monkeypatch.setenv("LAB_RUNNER_STALE_S", "6")  # for this test, its runners and their database waits (2 s)
    frozen = start_runner(engine)
    successor = None
    try:
        os.kill(frozen.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 20
        while hosts.runner_status(engine)["alive"]:
            assert time.monotonic() < deadline, "the frozen runner's lease never went stale"
            time.sleep(0.2)
        ids = [api.submit(engine, RunSpec(strategy="single", model="tiny", steps=1, warmup=0))
               for _ in range(2)]  # fmt: skip
        successor = start_runner(engine)
        os.kill(frozen.pid, signal.SIGCONT)  # it wakes up in its loop with runs queued
        assert frozen.wait(timeout=30) == 4  # "lost the runner lease to another runner"
        ended = [wait_status(engine, run_id, {"succeeded", "failed", "lost"}, timeout=180) for run_id in ids]
        assert [r["status"] for r in ended] == ["succeeded"] * 2
        from sqlalchemy import text

        with engine.connect() as conn:
            owners = conn.execute(text("SELECT runner_id FROM runs")).scalars().all()
        assert all(f"-{successor.pid}-" in owner for owner in owners), owners
    finally:
        if frozen.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)
            frozen.kill()
            frozen.wait()
        stop_runner(engine)
        if successor is not None:
            successor.wait(timeout=10)


def test_two_hosts_on_one_postgres_each_run_their_own_runs_and_read_each_others_logs(
    pg_server, lab_home, tmp_path, monkeypatch
):
    """Two members' machines (two LAB_HOME, two LAB_HOST) on one team database: each runner holds its own lease,
    runs only what was aimed at its host, and stores log tails any member reads without the other's disk."""
    from runner.service.launch import stop_group
    from storage.db import get_engine

    url = pg_server.new_database()
    monkeypatch.setenv("LAB_DB_URL", url)
    engine = get_engine()
    runners = {}
    try:
        for host in ("alpha", "beta"):
            env = {**os.environ, "LAB_HOST": host, "LAB_HOME": str(tmp_path / host), "LAB_DB_URL": url}
            runners[host] = subprocess.Popen([sys.executable, "-m", "runner", "serve"], cwd=REPO, env=env,
                                             start_new_session=True, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 60
        while sorted(h["host"] for h in hosts.hosts(engine) if h["alive"]) != ["alpha", "beta"]:
            assert time.monotonic() < deadline, hosts.hosts(engine)
            time.sleep(0.2)
        spec = RunSpec(strategy="single", model="tiny", steps=2)
        ids = {host: api.submit(engine, spec, run_on=host) for host in ("beta", "alpha")}
        for host, run_id in ids.items():
            run = wait_status(engine, run_id, {"succeeded", "failed", "lost"}, timeout=180)
            assert run["status"] == "succeeded", run
            assert run["target_host"] == run["runner_host"] == host
            assert Path(run["run_dir"]).is_relative_to(tmp_path / host)
            logs = series.run_logs(engine, run_id)  # from this third machine's view: the database only
            assert "step 3/3" in logs["rank0"]["text"] and logs["rank0"]["size"] > 0
            assert "torchrun" in logs
    finally:
        for proc in runners.values():
            stop_group(proc.pid, 10, popen=proc)
