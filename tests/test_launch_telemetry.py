"""Launching and sampling on real processes: the exact torchrun argv, the job's environment, stopping a whole
process group (SIGTERM, grace, SIGKILL), psutil samples per rank, the no-GPU path, and no torch in the app's imports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from runner.service.launch import group_alive, job_env, stop_group, torchrun_argv
from runner.service.telemetry import Sampler
from runner.spec.run_spec import RunSpec

REPO = Path(__file__).resolve().parent.parent


def test_torchrun_argv_is_the_documented_command_as_a_list():
    spec = RunSpec(strategy="layer", pp=2)
    argv = torchrun_argv(spec, "/lab/runs/7/spec.json", 29511, python="/venv/bin/python")
    assert argv == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29511", "--max-restarts", "0",
        "-m", "runner.job", "/lab/runs/7/spec.json",
    ]  # fmt: skip
    assert torchrun_argv(spec, "s.json")[0] == sys.executable


def test_cpu_jobs_get_one_thread_per_rank_and_gpu_jobs_their_devices(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    cpu = job_env(RunSpec(), [])
    assert cpu["OMP_NUM_THREADS"] == "1" and cpu["CUDA_VISIBLE_DEVICES"] == ""
    assert str(REPO) in cpu["PYTHONPATH"].split(os.pathsep)
    gpu = job_env(RunSpec(strategy="layer", pp=2, device="cuda"), ["GPU-a", "GPU-b"])
    assert gpu["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b" and gpu["OMP_NUM_THREADS"] == "8"  # by UUID, threads as set


def _group_with_a_stubborn_child() -> subprocess.Popen:
    """A session leader whose child ignores SIGTERM, as a hung rank would."""
    code = (
        "import signal, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 10
    while not psutil.Process(proc.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the child install its SIGTERM handler
    return proc


def test_stop_group_terminates_then_kills_what_ignores_sigterm():
    proc = _group_with_a_stubborn_child()
    child = psutil.Process(proc.pid).children()[0]
    started = time.monotonic()
    stop_group(proc.pid, grace_s=1.0, popen=proc)
    assert 1.0 <= time.monotonic() - started < 8
    assert proc.returncode is not None
    child_gone = not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    assert child_gone and not group_alive(proc.pid)


def test_sampler_reports_cpu_and_rss_of_each_rank_process():
    # Two "ranks" under one parent, each with RANK in its environment as torchrun sets it.
    code = (
        "import os, subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'x = bytearray(30_000_000)\\nwhile True: pass'],"
        " env={**os.environ, 'RANK': str(r)}) for r in range(2)]\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        sampler = Sampler(proc.pid, time.time())
        deadline = time.monotonic() + 15
        rows: list[dict] = []
        while len(rows) < 2 and time.monotonic() < deadline:
            rows = sampler.sample()
            time.sleep(0.2)
        time.sleep(0.5)
        rows = sampler.sample()  # cpu_percent needs a previous call on the same process object
        by_source = {r["source"]: r for r in rows}
        assert set(by_source) == {"rank0", "rank1"}
        assert all(r["mem_bytes"] > 30_000_000 for r in rows)
        assert all(r["util_pct"] > 0 for r in rows) and all(r["t_s"] > 0 for r in rows)
    finally:
        stop_group(proc.pid, grace_s=1.0, popen=proc)
    assert Sampler(proc.pid, time.time()).sample() == []  # a finished job samples as nothing, not an error


def test_a_rank_that_exited_but_is_not_yet_reaped_is_not_sampled():
    """Linux reads a zombie's RSS as 0: every run's memory chart fell to 0 at its last sample, as if it crashed."""
    code = (
        "import os, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; x = bytearray(30_000_000); time.sleep(1)'],"
        " env={**os.environ, 'RANK': '0'})\n"
        "time.sleep(60)\n"  # never waits for it: the kid stays a zombie
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        sampler = Sampler(proc.pid, time.time())
        deadline = time.monotonic() + 15
        while not sampler.sample() and time.monotonic() < deadline:  # its rank read while it runs
            time.sleep(0.1)
        (kid,) = psutil.Process(proc.pid).children()
        while kid.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert kid.status() == psutil.STATUS_ZOMBIE and sampler.sample() == []
    finally:
        stop_group(proc.pid, grace_s=1.0, popen=proc)


def test_modules_the_app_imports_do_not_import_torch():
    code = (
        "import sys\n"
        "import runner.__main__, runner.service.loop, runner.service.launch, runner.service.telemetry, runner.spec.run_spec\n"
        "import runner.spec.records, runner.service.failures, runner.service.supervisor, runner.service.watched, runner.api, runner.spec.strategies\n"
        "import runner.service.launchers, runner.service.launchers.local, runner.service.launchers.slurm\n"
        "import storage.runs, storage.series, storage.hosts, storage.runner_rows, storage.ranks\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
