"""Sampling what a job uses: NVML per GPU when an NVIDIA GPU is there, psutil per rank process otherwise.

Each NVML field is read in its own try/except and stored as None when the device does not support
it (as gpustat does). `detect_gpus()` says plainly why there is no GPU when there is none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil


def detect_gpus() -> tuple[list[dict], str]:
    """(GPUs NVML sees as [{index, name, memory_total}], a sentence for the page)."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return [], "no NVIDIA GPU: nvidia-ml-py is not installed, runs use CPU processes with gloo"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"no NVIDIA GPU: NVML is unavailable ({exc}); runs use CPU processes with gloo"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
            })  # fmt: skip
        if not gpus:
            return [], "no NVIDIA GPU: the driver reports 0 devices; runs use CPU processes with gloo"
        return gpus, f"{len(gpus)} NVIDIA GPU(s) visible through NVML"
    finally:
        pynvml.nvmlShutdown()


@dataclass
class Sampler:
    """Samples one job: GPUs it was given (NVML) or its rank processes (psutil), as rows for storage."""

    root_pid: int
    started: float
    gpus: list[int] = field(default_factory=list)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)
    _ranks: dict[int, int] = field(default_factory=dict)

    def sample(self) -> list[dict]:
        t_s = time.time() - self.started
        return self._sample_gpus(t_s) if self.gpus else self._sample_processes(t_s)

    def _sample_gpus(self, t_s: float) -> list[dict]:
        import pynvml

        rows = []
        pynvml.nvmlInit()
        try:
            for index in self.gpus:
                h = pynvml.nvmlDeviceGetHandleByIndex(index)
                util = mem = None
                try:
                    util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                except pynvml.NVMLError:
                    pass
                try:
                    mem = int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
                except pynvml.NVMLError:
                    pass
                rows.append({"source": f"gpu{index}", "t_s": t_s, "util_pct": util, "mem_bytes": mem})
        finally:
            pynvml.nvmlShutdown()
        return rows

    def _rank_of(self, proc: psutil.Process) -> int | None:
        if proc.pid not in self._ranks:
            try:
                rank = proc.environ().get("RANK")
            except (psutil.Error, OSError):
                return None
            if rank is None:
                return None
            self._ranks[proc.pid] = int(rank)
        return self._ranks[proc.pid]

    def _sample_processes(self, t_s: float) -> list[dict]:
        try:
            children = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return []
        rows = []
        for child in children:
            proc = self._procs.setdefault(child.pid, child)
            rank = self._rank_of(proc)
            if rank is None:
                continue
            try:
                # cpu_percent compares with the previous call on the same object; the first returns 0.
                cpu = proc.cpu_percent(None)
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            rows.append({"source": f"rank{rank}", "t_s": t_s, "util_pct": cpu, "mem_bytes": int(rss)})
        return rows
