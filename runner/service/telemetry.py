"""Sampling what a job uses: NVML per GPU when an NVIDIA GPU is there, psutil per rank process otherwise.

Each NVML field is read in its own try/except and stored as None when the device does not support
it (as gpustat does). `detect_gpus()` returns [] and says plainly why when there is no GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil


class GpuList(list):
    """A list of GPUs ([{index, name, memory_total}]) that also says, in `reason`, why it is what it is."""

    reason: str = ""


def _gpus(found: list[dict], reason: str) -> GpuList:
    gpus = GpuList(found)
    gpus.reason = reason
    return gpus


def detect_gpus() -> GpuList:
    """GPUs NVML sees as [{index, name, memory_total}]; [] when there is no NVIDIA GPU or driver.

    `.reason` is a sentence for the page: why there is no GPU (no nvidia-ml-py, no driver library,
    0 devices), or how many there are.
    """
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return _gpus([], "no NVIDIA GPU: nvidia-ml-py is not installed, runs use CPU processes with gloo")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return _gpus([], f"no NVIDIA GPU: NVML is unavailable ({exc}); runs use CPU processes with gloo")
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            found.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total": int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
            })  # fmt: skip
    except pynvml.NVMLError as exc:
        return _gpus([], f"no NVIDIA GPU: NVML failed to list devices ({exc}); runs use CPU processes with gloo")
    finally:
        pynvml.nvmlShutdown()
    if not found:
        return _gpus([], "no NVIDIA GPU: the driver reports 0 devices; runs use CPU processes with gloo")
    return _gpus(found, f"{len(found)} NVIDIA GPU(s) visible through NVML")


@dataclass
class Sampler:
    """Samples one job: GPUs it was given (NVML) or its rank processes (psutil), as rows for storage.

    GPUs are named by NVML index (`gpus`, the runner's own machine, where NVML and the job count alike), or by
    UUID (`gpu_uuids`, on a Slurm node, where CUDA_VISIBLE_DEVICES renumbers the job's GPUs from 0 and NVML
    does not: the UUID is the one name both agree on); a UUID-named GPU's source is gpu<its CUDA index>.
    """

    root_pid: int
    started: float
    gpus: list[int] = field(default_factory=list)
    gpu_uuids: list[str] = field(default_factory=list)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)
    _ranks: dict[int, int] = field(default_factory=dict)

    def sample(self) -> list[dict]:
        t_s = time.time() - self.started
        return self._sample_gpus(t_s) if self.gpus or self.gpu_uuids else self._sample_processes(t_s)

    def _sample_gpus(self, t_s: float) -> list[dict]:
        import pynvml

        rows = []
        named = [(f"gpu{i}", pynvml.nvmlDeviceGetHandleByIndex, i) for i in self.gpus]
        named += [(f"gpu{i}", pynvml.nvmlDeviceGetHandleByUUID, u) for i, u in enumerate(self.gpu_uuids)]
        pynvml.nvmlInit()
        try:
            for source, handle_of, key in named:
                util = mem = None
                try:
                    h = handle_of(key)
                except pynvml.NVMLError:
                    rows.append({"source": source, "t_s": t_s, "util_pct": None, "mem_bytes": None})
                    continue
                try:
                    util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                except pynvml.NVMLError:
                    pass
                try:
                    mem = int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
                except pynvml.NVMLError:
                    pass
                rows.append({"source": source, "t_s": t_s, "util_pct": util, "mem_bytes": mem})
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
