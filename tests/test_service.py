"""The runner loop's decisions, in-process on real processes and real run folders (no torch needed): placing
queued runs and saying why one waits, tailing events.jsonl incrementally, cancel and time limit without blocking
the loop, adopting live jobs and marking dead ones lost, and naming the failing rank from what a job left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import api
from runner.service.failures import diagnose_failure, first_traceback
from runner.service.launch import group_alive
from runner.service.launchers.local import Job
from runner.service.logs import read_log
from runner.service.loop import Runner, Watched
from runner.service.telemetry import Sampler
from runner.spec.records import Error
from runner.spec.run_spec import RunSpec
from storage import db, hosts, runner_rows, runs, series
from tests.jobs import wait_status

TINY = RunSpec(strategy="single", model="tiny", steps=3, warmup=1)


def sleeper(seconds: float = 30) -> subprocess.Popen:
    """A stand-in job: its own process session, like torchrun started by the runner."""
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"], start_new_session=True)


def watch_fake_job(runner: Runner, engine, spec: RunSpec, run_dir: Path, proc: subprocess.Popen) -> int:
    """Queue and claim a run, then have the runner watch `proc` as its job."""
    run_id = api.submit(engine, spec)
    assert runner_rows.claim_run(engine, run_id, runner.runner_id, str(run_dir), [])
    runner_rows.update_run(engine, run_id, pid=proc.pid)
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    runner.watched[run_id] = Watched(Job(run_id, proc.pid, run_dir, proc), spec, [], now, Sampler(proc.pid, now))
    return run_id


def tick_until(runner: Runner, engine, run_id: int, statuses: set[str], timeout: float = 15) -> dict:
    return wait_status(engine, run_id, statuses, timeout, between=runner.tick)


def test_a_run_that_needs_gpus_on_a_machine_without_them_fails_with_the_reason_instead_of_waiting(engine):
    # Queued as if from a client that knew nothing of this machine (submit itself would refuse it: test_devices.py)
    run_id = api.submit(engine, RunSpec(strategy="layer", pp=2, device="cuda"), gpu_count=None)
    Runner(engine).place_queued()
    run = runs.get_run(engine, run_id)
    assert run["status"] == "failed"
    assert "device: is 'cuda' but no NVIDIA GPU: NVML is unavailable" in run["error"], run["error"]
    assert "torch 2.13.0+cpu is a CPU-only build" in run["error"]


def test_a_gpu_run_waits_while_another_users_process_holds_a_gpu_and_says_which(engine):
    # Two H100s that torch and NVML agree on; GPU 1 runs another user's process (pid 4242): a 2-rank CUDA run
    # must not be started on it (tests/test_devices.py covers the report itself).
    from runner.service.devices import NvmlGpu, NvmlInventory, TorchGpu, TorchView, resolve
    from runner.service.gpu_pool import GpuPool

    u = [f"{i:08x}-1111-2222-3333-444455556666" for i in range(2)]
    inventory = NvmlInventory(tuple(NvmlGpu(i, f"GPU-{u[i]}", "NVIDIA H100 80GB HBM3", 80 * 2**30,
                                            pids=(4242,) if i else ()) for i in range(2)))  # fmt: skip
    torch = TorchView("2.6.0+cu124", "12.4", True, tuple(TorchGpu(i, "NVIDIA H100 80GB HBM3", u[i]) for i in range(2)),
                      nccl="2.21.5")  # fmt: skip
    runner = Runner(engine)
    runner.pool = GpuPool(shared=False, report=resolve(inventory, torch, None), inventory=lambda: inventory)
    run_id = api.submit(engine, RunSpec(strategy="data", dp=2, model="tiny", device="cuda"), gpu_count=2)
    runner.place_queued()
    run = runs.get_run(engine, run_id)
    assert run["status"] == "queued" and run_id not in runner.watched
    assert run["wait_reason"] == ("waiting for 2 free GPUs (1 free now; GPU 1 busy (pid 4242 not started by this "
                                  "runner))")


def test_a_second_cpu_run_waits_for_a_slot_and_says_so(engine, tmp_path):
    runner = Runner(engine, max_cpu_jobs=1)
    proc = sleeper()
    try:
        watch_fake_job(runner, engine, TINY, tmp_path / "a", proc)
        waiting = api.submit(engine, TINY)
        runner.place_queued()
        run = runs.get_run(engine, waiting)
        assert run["status"] == "queued"
        assert run["wait_reason"] == "waiting for a CPU slot (1 of 1 CPU jobs running)"
    finally:
        proc.kill()
        proc.wait()


def test_a_comparison_sets_runs_run_one_at_a_time_round_robin_while_other_runs_go_on(engine, monkeypatch):
    runner = Runner(engine, max_cpu_jobs=4)  # room for every run at once: only the set's rule holds them back
    ids = api.submit_set(engine, [TINY, RunSpec(strategy="data", dp=2, steps=3)], 3)
    alone = api.submit(engine, TINY)
    started: list[int] = []

    def launch(run_id, spec, gpus, device=None):  # the claim as Runner.launch makes it, without a job
        assert runner_rows.claim_run(engine, run_id, runner.runner_id, "", gpus)
        started.append(run_id)

    monkeypatch.setattr(runner, "launch", launch)
    runner.place_queued()
    assert started == [ids[0], alone]
    assert runs.get_run(engine, ids[1])["wait_reason"] == (
        f"waiting for run {ids[0]} of its comparison set: a set's runs run one at a time, in turn"
    )
    for done in ids:  # each run of the set ends; only then does the next in queue order start
        runner_rows.finish_run(engine, done, "succeeded")
        runner.place_queued()
    assert started == [ids[0], alone, *ids[1:]]
    strategies = [runs.get_run(engine, i)["spec"]["strategy"] for i in ids]
    assert strategies == ["single", "data"] * 3


def test_events_are_ingested_incrementally_and_a_partial_line_waits_for_its_end(engine, tmp_path):
    runner = Runner(engine)
    proc = sleeper()
    try:
        run_id = watch_fake_job(runner, engine, TINY, tmp_path / "run", proc)
        events = tmp_path / "run" / "events.jsonl"
        step = lambda i: {"kind": "step", "rank": 0, "t": 1.0 + i, "step": i, "total_steps": 4, "warmup": i == 0,
                          "step_time_s": 0.01, "loss": 6.0 - i}  # fmt: skip
        span = {"kind": "span", "rank": 1, "t": 2.0, "step": 1, "stage": 1, "microbatch": 0, "phase": "forward",
                "start": 0.001, "end": 0.004}  # fmt: skip
        odd = [{**step(9), "step_time_s": float("nan")}, {**span, "end": float("inf")}, {"kind": "step"}, [1, 2]]
        lines = [json.dumps(step(0)), json.dumps(span), *map(json.dumps, odd), "not json"]  # odd lines are skipped
        events.write_text("\n".join(lines) + "\n" + json.dumps(step(1))[:20])
        runner.tick()
        assert runs.get_run(engine, run_id)["progress"] == {"step": 1, "total": 4}
        assert len(series.step_metrics(engine, run_id)) == 1
        with events.open("a") as f:
            f.write(json.dumps(step(1))[20:] + "\n" + json.dumps(step(2)) + "\n")
        runner.tick()
        runner.tick()  # nothing new: nothing stored twice
        metrics = series.step_metrics(engine, run_id)
        assert list(metrics["step"]) == [0, 1, 2] and list(metrics["warmup"]) == [True, False, False]
        assert runs.get_run(engine, run_id)["progress"]["step"] == 3
        spans = series.timeline_spans(engine, run_id)
        assert spans.to_dict("records") == [{k: span[k] for k in spans.columns}]
    finally:
        proc.kill()
        proc.wait()


def test_cancel_of_a_running_job_stops_its_process_group_without_blocking_the_loop(engine, tmp_path):
    runner = Runner(engine)
    proc = sleeper()
    run_id = watch_fake_job(runner, engine, TINY, tmp_path / "run", proc)
    assert runs.request_cancel(engine, run_id) == "cancelling"
    started = time.monotonic()
    runner.tick()
    assert time.monotonic() - started < 1.0  # SIGTERM sent, the loop moved on
    run = tick_until(runner, engine, run_id, {"cancelled", "failed", "succeeded"})
    assert run["status"] == "cancelled" and run["error"] == "cancelled by request"
    assert not group_alive(proc.pid)
    assert run_id not in runner.watched


def test_a_job_whose_gpu_telemetry_fails_is_still_watched_and_finalized(engine, tmp_path, capsys):
    # NVML breaks mid-run (a driver upgrade): sampling backs off inside the sampler (tests/test_nvml.py); here a
    # sampler that raises all the same must cost the run nothing but its telemetry, told once in the runner's log.
    class Broken(Sampler):
        def sample(self):
            raise RuntimeError("NVML: Driver/library version mismatch")

    runner = Runner(engine)
    proc = sleeper(1.5)
    run_id = watch_fake_job(runner, engine, TINY, tmp_path / "run", proc)
    runner.watched[run_id].sampler = Broken(proc.pid, time.time(), gpu_uuids=["GPU-x"])
    run = tick_until(runner, engine, run_id, {"failed", "cancelled", "succeeded"})
    assert run["status"] == "failed" and run_id not in runner.watched  # finalized: exit 0 but no result.json
    told = [line for line in capsys.readouterr().out.splitlines() if "telemetry not sampled" in line]
    assert told == [f"run {run_id}: telemetry not sampled (RuntimeError: NVML: Driver/library version mismatch)"]


def test_time_limit_fails_the_run_with_the_limit_named(engine, tmp_path):
    runner = Runner(engine)
    proc = sleeper()
    run_id = watch_fake_job(runner, engine, RunSpec(strategy="single", time_limit_s=0.5), tmp_path / "run", proc)
    run = tick_until(runner, engine, run_id, {"failed", "cancelled", "succeeded"})
    assert run["status"] == "failed" and "time limit of 0.5 s" in run["error"]
    assert not group_alive(proc.pid)


def test_restart_adopts_a_live_job_and_marks_a_vanished_one_lost(engine, tmp_path):
    live = sleeper()
    try:
        first = Runner(engine)
        alive_id = watch_fake_job(first, engine, TINY, tmp_path / "alive", live)
        dead = sleeper(0)
        dead.wait()
        dead_id = watch_fake_job(first, engine, TINY, tmp_path / "dead", dead)
        second = Runner(engine)  # as after a crash: a new runner, the same database
        assert second.acquire()
        second.recover()
        assert alive_id in second.watched and second.watched[alive_id].job.popen is None
        lost = runs.get_run(engine, dead_id)
        assert lost["status"] == "lost" and "vanished" in lost["error"]
        live.kill()
        live.wait()
        # The adopted job ended without a result.json: it failed, and the runner stops watching it.
        run = tick_until(second, engine, alive_id, {"failed", "succeeded", "lost"})
        assert run["status"] == "failed"
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()


TORCHRUN_LOG = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
runner.job FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-24_10:00:01
  host      : lab
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 101)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 101
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-24_10:00:00
  host      : lab
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 102)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 102
============================================================
"""

RANK_LOG = """\
starting
Traceback (most recent call last):
  File "/repo/runner/job/rank.py", line 10, in main
    run()
ValueError: shapes do not match
later noise
Traceback (most recent call last):
  File "x", line 1
RuntimeError: second
"""


def test_torchrun_root_cause_names_the_rank_killed_by_a_signal(tmp_path):
    (tmp_path / "torchrun.log").write_text(TORCHRUN_LOG)
    rank, error, _ = diagnose_failure(tmp_path, [])
    assert rank == 1 and error == "rank 1 was killed by signal 9 (SIGKILL)"


def test_the_rank_that_raised_first_is_blamed_not_the_peers_that_lost_their_connection(tmp_path):
    errors = [
        Error(rank=0, t=5.0, error="RuntimeError: Connection closed by peer", traceback="tb0"),
        Error(rank=1, t=6.0, error="ValueError: shapes do not match", traceback="tb1"),
    ]
    rank, error, tb = diagnose_failure(tmp_path, errors)
    assert (rank, tb) == (1, "tb1") and error == "rank 1 raised ValueError: shapes do not match"


def test_without_events_the_first_traceback_of_a_rank_log_is_used(tmp_path):
    (tmp_path / "rank2.log").write_text(RANK_LOG)
    rank, error, tb = diagnose_failure(tmp_path, [])
    assert rank == 2 and error == "rank 2 failed: ValueError: shapes do not match"
    assert tb == first_traceback(read_log(tmp_path, "rank2"))
    assert tb.startswith("Traceback") and tb.endswith("ValueError: shapes do not match")


@pytest.mark.parametrize("log", ["", "some launcher error\n"])
def test_with_nothing_to_go_on_the_last_launcher_line_is_the_error(tmp_path, log):
    (tmp_path / "torchrun.log").write_text(log)
    rank, error, tb = diagnose_failure(tmp_path, [])
    assert rank is None and tb is None
    assert error == (log.strip() or "torchrun exited without a result")


def test_a_launch_never_reads_a_stale_folder_left_under_a_reused_run_id(engine):
    from runner.service.launch import stop_group
    from storage.db import runs_dir

    run_id = api.submit(engine, TINY)
    stale = runs_dir() / str(run_id)
    stale.mkdir(parents=True)
    (stale / "events.jsonl").write_text('{"kind": "step", "rank": 0, "t": 1, "step": 99}\n')
    (stale / "result.json").write_text("{}")
    runner = Runner(engine)
    assert runner.acquire()  # a launch needs the lease
    runner.place_queued()
    try:
        assert run_id in runner.watched
        assert sorted(p.name for p in stale.iterdir()) in (["spec.json"], ["spec.json", "torchrun.log"])
        assert json.loads((stale / "spec.json").read_text())["device"] == "cpu"  # 'auto' placed
    finally:
        job = runner.watched[run_id].job
        stop_group(job.pid, grace_s=2, popen=job.popen)


def test_a_killed_rank_is_the_cause_even_when_torchrun_names_its_peer_first(tmp_path):
    """Both exits seen in one poll: torchrun's 'Root Cause' is rank 0, which only lost its connection."""
    (tmp_path / "torchrun.log").write_text(
        "Failures:\n[1]:\n  time      : t\n  host      : h\n  rank      : 1 (local_rank: 1)\n"
        "  exitcode  : -9 (pid: 11)\n"
        "Root Cause (first observed failure):\n[0]:\n  time      : t\n  host      : h\n"
        "  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 10)\n"
    )
    errors = [Error(rank=0, t=1.0, error="RuntimeError: Connection closed by peer [127.0.0.1]:1", traceback="tb")]
    rank, error, _ = diagnose_failure(tmp_path, errors)
    assert rank == 1 and error == "rank 1 was killed by signal 9 (SIGKILL)"


def test_a_rank_that_died_silently_is_the_cause_when_its_peers_only_lost_it(tmp_path):
    (tmp_path / "torchrun.log").write_text(
        "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : 3 (pid: 11)\n"
        "[1]:\n  rank      : 0 (local_rank: 0)\n  exitcode  : 1 (pid: 10)\n"
    )
    errors = [Error(rank=0, t=1.0, error="RuntimeError: Connection closed by peer", traceback="tb")]
    rank, error, _ = diagnose_failure(tmp_path, errors)
    assert rank == 1 and "exited with code 3 without an error" in error


# A stand-in torchrun: starts one "rank" in a session of its own (as torchrun does) that ignores SIGTERM.
FAKE_TORCHRUN = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c",
                  "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
                 start_new_session=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_rank_left_by_a_killed_torchrun_is_found_by_a_restarted_runner_stopped_and_holds_its_slot_till_gone(
    engine, tmp_path
):
    """torchrun killed while no runner watched: the new runner adopts the run by its recorded rank pid (torchrun's
    group is gone), SIGKILLs the rank that ignores SIGTERM, and the next CPU run starts only once it is gone."""
    from runner.service.launch import stop_group

    first = Runner(engine)
    torchrun = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN], start_new_session=True)
    run_id = watch_fake_job(first, engine, TINY, tmp_path / "run", torchrun)
    deadline = time.monotonic() + 15
    while not (rows := [r for r in runner_rows.running_runs(engine) if r["id"] == run_id and r["rank_pids"]]):
        assert time.monotonic() < deadline, "the runner never recorded the rank"
        first.tick()
        time.sleep(0.1)
    ((rank_pid, _),) = rows[0]["rank_pids"]
    torchrun.kill()  # the first runner is gone too: nobody ticks it again
    torchrun.wait()
    assert not group_alive(torchrun.pid) and alive(rank_pid)  # its own session: nothing took the rank along
    second = Runner(engine, max_cpu_jobs=1)
    assert second.acquire()
    waiting = api.submit(engine, TINY)
    second.recover()
    assert run_id in second.watched  # adopted because its rank lives, not marked lost
    deadline = time.monotonic() + 30
    try:
        while runs.get_run(engine, run_id)["status"] == "running" or waiting not in second.watched:
            assert time.monotonic() < deadline, runs.get_run(engine, run_id)
            second.tick()
            # Checked after the tick: a rank alive now was alive throughout it, so the slot was still taken.
            assert not (alive(rank_pid) and runs.get_run(engine, waiting)["status"] != "queued")
            time.sleep(0.05)
        run = runs.get_run(engine, run_id)
        assert run["status"] == "failed" and "the runner stopped them" in run["error"], run["error"]
        assert not alive(rank_pid)
    finally:
        if alive(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)
        if waiting in second.watched:
            job = second.watched[waiting].job
            stop_group(job.pid, grace_s=2, popen=job.popen)


def frozen_and_replaced(engine) -> tuple[Runner, Runner]:
    """A runner that held the lease, frozen past the stale limit (its heartbeat backdated), and the runner that
    took the lease over meanwhile."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    frozen = Runner(engine)
    assert frozen.acquire()
    stale = datetime.now(UTC) - timedelta(seconds=db.runner_stale_s() + 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE runner_lease SET heartbeat_at = :t"), {"t": stale})
    successor = Runner(engine)
    assert successor.acquire()
    return frozen, successor


def test_a_runner_that_lost_its_lease_launches_nothing(db_engine):
    """Frozen past the stale limit while another runner took over, it wakes up in the middle of its loop."""
    engine = db_engine
    frozen, _ = frozen_and_replaced(engine)
    run_id = api.submit(engine, TINY)
    frozen.place_queued()
    assert runs.get_run(engine, run_id)["status"] == "queued" and not frozen.watched
    assert not hosts.heartbeat(engine, frozen.runner_id)  # and its next heartbeat tells it to leave


def test_a_runner_that_lost_its_lease_adopts_none_of_its_successors_live_jobs(db_engine, tmp_path):
    """Frozen in the middle of a re-scan while another runner took over: it wakes up to find the successor's live
    job, and must neither take the run over (its row keeps the successor as owner) nor watch it; it leaves
    instead (LeaseLost, the serve loop's exit 4). Adoption also checks the lease inside its own transaction, so a
    takeover between the scan's check and the adoption leaves the run with its owner."""
    from runner.service.loop import LeaseLost

    engine = db_engine
    frozen, successor = frozen_and_replaced(engine)
    job = sleeper()
    try:
        run_id = watch_fake_job(successor, engine, TINY, tmp_path / "run", job)
        with pytest.raises(LeaseLost):
            frozen.recover()
        assert not runner_rows.adopt_run(engine, run_id, frozen.runner_id)
        (row,) = [r for r in runner_rows.running_runs(engine) if r["id"] == run_id]
        assert row["runner_id"] == successor.runner_id and not frozen.watched
        assert runner_rows.adopt_run(engine, run_id, successor.runner_id)  # the holder's own adoption goes through
    finally:
        job.kill()
        job.wait()


def test_unreadable_stored_rows_fail_their_own_run_and_never_the_runner(db_engine, tmp_path):
    engine = db_engine
    runner = Runner(engine)
    assert runner.acquire()
    bad_queued = api.submit(engine, TINY)
    runner_rows.update_run(engine, bad_queued, spec=["not", "a", "spec"])
    gone, live_bad, bad_pids = (api.submit(engine, TINY) for _ in range(3))
    live = sleeper()
    try:
        for run_id, pid in ((gone, 2**22 + 7), (live_bad, live.pid), (bad_pids, live.pid)):
            assert runner_rows.claim_run(engine, run_id, "old-runner", str(tmp_path / str(run_id)), [])
            runner_rows.update_run(engine, run_id, pid=pid)
        runner_rows.update_run(engine, gone, spec={"strategy": 7, "bogus": 1})
        runner_rows.update_run(engine, live_bad, spec={"strategy": 7, "bogus": 1})
        runner_rows.update_run(engine, bad_pids, rank_pids="garbage")
        runner.recover()
        run = runs.get_run(engine, gone)
        assert run["status"] == "failed" and "stored spec cannot be read" in run["error"] and "bogus" in run["error"]
        run = runs.get_run(engine, bad_pids)
        assert run["status"] == "failed" and "could not read this run's stored row" in run["error"]
        runner.place_queued()
        run = runs.get_run(engine, bad_queued)
        assert run["status"] == "failed" and "must be a JSON object" in run["error"]
        # The live one cannot be held to its limits without its spec: its processes are stopped, and it says why.
        run = tick_until(runner, engine, live_bad, {"failed", "cancelled", "succeeded", "lost"})
        assert run["status"] == "failed" and "its processes were stopped" in run["error"]
        assert live.wait(timeout=10) is not None
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()


def test_a_run_a_replaced_runner_is_still_launching_keeps_its_slot_and_is_adopted_by_a_later_scan(engine, tmp_path):
    """Claimed by another runner that has not stored its pid yet: not lost, its CPU slot held; once its pid is
    stored, the periodic re-scan adopts it."""
    runner = Runner(engine, max_cpu_jobs=1)
    assert runner.acquire()
    launching = api.submit(engine, TINY)
    assert runner_rows.claim_run(engine, launching, "replaced-runner", str(tmp_path / "run"), [])
    waiting = api.submit(engine, TINY)
    runner.recover()
    assert runs.get_run(engine, launching)["status"] == "running" and launching in runner.pending
    runner.place_queued()
    assert runs.get_run(engine, waiting)["wait_reason"] == "waiting for a CPU slot (1 of 1 CPU jobs running)"
    job = sleeper()
    try:
        (tmp_path / "run").mkdir()
        runner_rows.update_run(engine, launching, pid=job.pid)  # the other runner got as far as storing its pid
        runner.recover()
        assert launching in runner.watched and not runner.pending
    finally:
        job.kill()
        job.wait()
    assert runs.request_cancel(engine, waiting) == "cancelled"  # nothing more to launch in this test
    run = tick_until(runner, engine, launching, {"failed", "succeeded", "lost"})
    assert run["status"] == "failed"  # it ended without a result


# A stand-in torchrun that itself ignores SIGTERM, with a rank (own session) that ignores it too.
DEAF_TORCHRUN = FAKE_TORCHRUN.replace("import subprocess, sys, time", "import signal, subprocess, sys, time\n"
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN)")  # fmt: skip


@pytest.mark.slow
def test_cancel_sigkills_only_after_torchruns_own_grace_and_then_every_rank(engine, tmp_path):
    """Nothing honours SIGTERM: the runner leaves torchrun its own grace (TORCHRUN_SHUTDOWN_S) to stop its ranks,
    then SIGKILLs torchrun and the rank it recorded, which torchrun's group never contained."""
    from runner.service.launch import TORCHRUN_SHUTDOWN_S
    from runner.service.launchers.local import CANCEL_GRACE_S

    runner = Runner(engine)
    torchrun = subprocess.Popen([sys.executable, "-c", DEAF_TORCHRUN], start_new_session=True)
    run_id = watch_fake_job(runner, engine, TINY, tmp_path / "run", torchrun)
    rank_pid = None
    try:
        deadline = time.monotonic() + 15
        while not runner.watched[run_id].job.ranks:
            assert time.monotonic() < deadline, "the runner never recorded the rank"
            runner.tick()
            time.sleep(0.1)
        (rank_pid,) = runner.watched[run_id].job.ranks
        assert runs.request_cancel(engine, run_id) == "cancelling"
        started = time.monotonic()
        while time.monotonic() - started < TORCHRUN_SHUTDOWN_S - 0.5:
            runner.tick()
            assert torchrun.poll() is None and alive(rank_pid)  # SIGTERM only, so far
            time.sleep(0.2)
        run = tick_until(runner, engine, run_id, {"cancelled", "failed"}, timeout=CANCEL_GRACE_S + 10)
        assert run["status"] == "cancelled" and torchrun.poll() == -signal.SIGKILL and not alive(rank_pid)
        assert time.monotonic() - started >= CANCEL_GRACE_S - 0.5
    finally:
        for pid in (torchrun.pid, rank_pid):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
        torchrun.wait()
