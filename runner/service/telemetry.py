"""Sampling what a job uses: NVML per GPU when the job has GPUs, psutil per rank process otherwise.

GPUs are named by UUID, the one name NVML and the job's CUDA agree on (the runner starts jobs with UUIDs in
CUDA_VISIBLE_DEVICES; Slurm numbers a job's GPUs from 0, NVML numbers all of a node's), and a GPU's source is
gpu<its CUDA index in the job>, so gpuN is the device of local rank N. NVML goes through the process's one
guarded NVML (runner/service/nvml.py): initialised once, a field the device does not support stored as None
(as gpustat does), and a failing NVML backed off, so a sample is never an exception: [] means not known now.
A MIG instance is refused (this lab runs one rank per whole GPU, runner/service/devices.py) and said in
`refused`, which the node sampler writes to its log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil

from runner.service.devices import MIG_WHY, uuid_key
from runner.service.nvml import Nvml, process_nvml


@dataclass
class Sampler:
    """Samples one job: the GPUs it was given (NVML, by UUID) or its rank processes (psutil), as rows for storage.

    gpu_uuids: the job's GPUs in CUDA order, "GPU-..." as NVML writes them (the runner's) or bare as torch prints
    them (a Slurm node's job, runner/job/rank.py); [] for a CPU job.
    """

    root_pid: int
    started: float
    gpu_uuids: list[str] = field(default_factory=list)
    nvml: Nvml = field(default_factory=process_nvml)
    refused: dict[str, str] = field(default_factory=dict)  # source -> why it is not sampled (a MIG instance)
    _procs: dict[int, psutil.Process] = field(default_factory=dict)
    _ranks: dict[int, int] = field(default_factory=dict)

    def sample(self) -> list[dict]:
        t_s = time.time() - self.started
        if self.gpu_uuids:
            return self.nvml.run(lambda lib: self._sample_gpus(lib, t_s)) or []
        return self._sample_processes(t_s)

    def _sample_gpus(self, lib, t_s: float) -> list[dict]:
        rows = []
        for i, uuid in enumerate(self.gpu_uuids):
            source = f"gpu{i}"
            if source in self.refused:
                continue
            h = self._handle(lib, i, uuid)
            if h is None:
                if source not in self.refused:
                    rows.append({"source": source, "t_s": t_s, "util_pct": None, "mem_bytes": None})
                continue
            util = self.nvml.field(lib.nvmlDeviceGetUtilizationRates, h)
            mem = self.nvml.field(lib.nvmlDeviceGetMemoryInfo, h)
            rows.append({"source": source, "t_s": t_s, "util_pct": None if util is None else float(util.gpu),
                         "mem_bytes": None if mem is None else int(mem.used)})  # fmt: skip
        return rows

    def _handle(self, lib, i: int, uuid: str):
        """The NVML handle of a whole GPU by UUID; None (and the GPU refused) for a MIG instance, None when unknown."""
        key = uuid_key(uuid)
        h = self.nvml.field(lib.nvmlDeviceGetHandleByUUID, f"GPU-{key}")
        if h is None and self.nvml.field(lib.nvmlDeviceGetHandleByUUID, f"MIG-{key}") is not None:
            self.refused[f"gpu{i}"] = f"cuda:{i} is a MIG instance (MIG-{key}): {MIG_WHY}; not sampled"
        return h

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
                if proc.status() == psutil.STATUS_ZOMBIE:
                    # a rank that has exited but is not yet reaped reads an RSS of 0: not a sample of the run
                    continue
                # cpu_percent compares with the previous call on the same object; the first returns 0.
                cpu = proc.cpu_percent(None)
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            rows.append({"source": f"rank{rank}", "t_s": t_s, "util_pct": cpu, "mem_bytes": int(rss)})
        return rows
