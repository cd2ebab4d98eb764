"""The machine's load while a job ran (runner/job/load.py): other processes' CPU on the job's cores, its own left out."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from runner.job.load import TICK_S, LoadMeter, machine_load
from runner.spec.records import RankFigures


def test_other_processes_share_is_what_the_cores_were_busy_beyond_the_jobs_ranks():
    ranks = [
        # host a: 2 cores for 1.0 s, 1.5 busy seconds, the ranks took 0.6 + 0.5: 0.4 / 2.0 = 20% others
        RankFigures(rank=0, host="a", timed_cpu_s=0.6, host_busy_cpu_s=1.5, host_cpu_cores=2, load_window_s=1.0,
                    load_avg_1m=[3.0, 4.0]),
        RankFigures(rank=1, host="a", timed_cpu_s=0.5),
        # host b: 2 cores for 0.5 s, 1.0 busy, its rank 0.4: 0.6 / 1.0 = 60% others, the run's figure
        RankFigures(rank=2, host="b", timed_cpu_s=0.4, host_busy_cpu_s=1.0, host_cpu_cores=2, load_window_s=0.5,
                    load_avg_1m=[9.0, 9.0]),
    ]  # fmt: skip
    got = machine_load(ranks)
    assert got["others_cpu_share"] == pytest.approx(0.6)
    assert got["others_cpu_share_resolution"] == pytest.approx(2 * TICK_S / 0.5)  # two ticks over b's window
    assert (got["load_avg_1m_start"], got["load_avg_1m_end"]) == (3.0, 4.0)
    # The job's own ranks busier than the counters say (tick rounding): no negative share.
    quiet = [RankFigures(rank=0, host="a", timed_cpu_s=1.02, host_busy_cpu_s=1.0, host_cpu_cores=1, load_window_s=1.0)]
    assert machine_load(quiet)["others_cpu_share"] == 0.0
    assert machine_load([RankFigures(rank=0)]) == {}  # a job of an earlier version measured nothing


def test_a_process_spinning_beside_the_job_is_counted_as_others_and_the_jobs_own_time_is_not():
    meter = LoadMeter.on(None, 0)
    meter.launcher_pid = None
    meter.start()
    spin = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    end = time.process_time() + 0.3
    while time.process_time() < end:  # the job's own work, meanwhile
        pass
    _, _, usage = os.wait4(child.pid, 0)
    figures = meter.figures()
    child_cpu = usage.ru_utime + usage.ru_stime
    assert figures["timed_cpu_s"] >= 0.3
    # Every second the child ran is other processes' time on the job's cores; the counters round each core's
    # figure to a tick at either end.
    others = figures["host_busy_cpu_s"] - figures["timed_cpu_s"]
    assert others >= child_cpu - 2 * TICK_S * figures["host_cpu_cores"], (figures, child_cpu)
    assert len(figures["load_avg_1m"]) == 2 and figures["load_window_s"] >= 0.3
