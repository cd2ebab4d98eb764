"""What the rest of the machine took while a job's timed steps ran: measured by every rank, combined by rank 0.

A run's timings are only as good as the machine was quiet. Each rank measures, over its timed steps:
- its own CPU seconds (`time.process_time`: every thread of the process, nanosecond clock);
- on the first rank of each host only (so a host is counted once): the busy seconds of the cores the job's
  ranks run on there (the cores they are pinned to, one each; else the whole affinity: an oversubscribed CPU
  job's ranks and a GPU job's host threads go wherever the kernel puts them), from the kernel's per-core counters (/proc/stat through
  psutil: user, nice, system, irq, softirq and steal -- time a virtual machine's core was taken by the
  hypervisor for other guests counts as taken), less what torchrun, the ranks' parent and the job's own
  launcher, used meanwhile; and the 1-minute load average at both ends.

Rank 0 combines them (`machine_load`): per host, other processes' CPU seconds = busy seconds - the CPU seconds
of the job's ranks on that host, as a share of the window x cores; the run reports the largest share over its
hosts. The kernel counts busy time in clock ticks (10 ms at USER_HZ 100) per core, so each core's difference is
off by less than a tick at either end: the share is known to within `resolution` = 2 ticks / window, which is
large for a short run (a 0.2 s window: +-10%) and which the pages take into account before flagging a run.

The load average is kept beside it for the reader: it counts runnable processes host-wide, the job's own
ranks included, over an exponentially weighted minute, so it cannot say who shared the cores.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field

import psutil

from runner.spec.records import RankFigures

TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")  # guest time is inside user and nice already


def busy_seconds(cores: list[int]) -> float | None:
    """Busy CPU seconds of `cores` since boot (None where the kernel gives no per-core counters)."""
    try:
        per_core = psutil.cpu_times(percpu=True)
    except (OSError, psutil.Error):
        return None
    if not per_core or max(cores, default=0) >= len(per_core):
        return None
    return sum(getattr(per_core[c], name, 0.0) for c in cores for name in BUSY_FIELDS)


def _cpu_seconds(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def _load_1m() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class LoadMeter:
    """One rank's view of its timed steps; `start()` as they begin, `figures()` once they are over."""

    cores: list[int]  # the cores the job may use on this host: the affinity before pinning
    measures_host: bool  # the host's first rank measures the host's figures
    launcher_pid: int | None = None  # torchrun (the rank's parent): the job's own, not another process
    _start: dict = field(default_factory=dict)

    @classmethod
    def on(cls, cores: list[int] | None, local_rank: int) -> LoadMeter:
        """A meter of `cores` (None: this process's whole affinity, read now, before any pinning narrows it)."""
        if cores is None:
            try:
                cores = sorted(os.sched_getaffinity(0))
            except AttributeError:  # not Linux
                cores = list(range(os.cpu_count() or 1))
        return cls(cores, local_rank == 0, os.getppid() if local_rank == 0 else None)

    def _read(self) -> dict:
        now = {"wall": time.monotonic(), "own": time.process_time()}
        if self.measures_host:
            now.update(busy=busy_seconds(self.cores), load=_load_1m(),
                       launcher=_cpu_seconds(self.launcher_pid) if self.launcher_pid else 0.0)  # fmt: skip
        return now

    def start(self) -> None:
        self._start = self._read()

    def figures(self) -> dict:
        """This rank's RankFigures fields: timed_cpu_s, and on the host's first rank host_busy_cpu_s (the
        launcher's own CPU left out), host_cpu_cores, load_window_s and load_avg_1m ([start, end])."""
        if not self._start:
            return {}
        end, start = self._read(), self._start
        out: dict = {"timed_cpu_s": end["own"] - start["own"]}
        if self.measures_host and start["busy"] is not None and end["busy"] is not None:
            launcher = (end["launcher"] or 0.0) - (start["launcher"] or 0.0) if start["launcher"] is not None else 0.0
            out.update(host_busy_cpu_s=end["busy"] - start["busy"] - max(launcher, 0.0),
                       host_cpu_cores=len(self.cores), load_window_s=end["wall"] - start["wall"])  # fmt: skip
        if self.measures_host and start.get("load") is not None and end.get("load") is not None:
            out["load_avg_1m"] = [start["load"], end["load"]]
        return out


def machine_load(ranks: list[RankFigures]) -> dict:
    """The Result's load fields from every rank's figures: others_cpu_share (the largest over hosts) with its
    others_cpu_share_resolution, and load_avg_1m_start / _end of the first host measured; {} when no host
    was measured (a job of an earlier version, or a system without per-core counters)."""
    own: dict[str | None, float] = defaultdict(float)
    for r in ranks:
        own[r.host] += r.timed_cpu_s or 0.0
    worst: tuple[float, float] | None = None
    out: dict = {}
    for r in ranks:
        if r.load_avg_1m and "load_avg_1m_start" not in out:
            out["load_avg_1m_start"], out["load_avg_1m_end"] = r.load_avg_1m
        if r.host_busy_cpu_s is None or not r.host_cpu_cores or not r.load_window_s:
            continue
        share = max(r.host_busy_cpu_s - own[r.host], 0.0) / (r.load_window_s * r.host_cpu_cores)
        if worst is None or share > worst[0]:
            worst = (share, 2 * TICK_S / r.load_window_s)
    if worst is not None:
        out["others_cpu_share"], out["others_cpu_share_resolution"] = worst
    return out
