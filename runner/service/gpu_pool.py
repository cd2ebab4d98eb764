"""The runner's GPUs over its life: the device report kept fresh, and which GPUs a new run may book.

torch's view is probed once, at start (runner/service/device_probe.py); NVML is read again every
REFRESH_EVERY_S, since another user's process may take or leave a GPU at any time. A failing NVML (a
driver/library mismatch after an upgrade) keeps the last inventory it read, says so once in the runner's log,
and is asked again after its back-off (runner/service/nvml.py); GPUs booked by runs stay booked either way.
Runs are booked by NVML index (runs.gpus) and started by UUID (`uuids`, the job's CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import psutil

from runner.service.device_probe import detect_devices, probe_torch, read_inventory, share_gpus_allowed, visible_devices
from runner.service.devices import DeviceReport, NvmlInventory, resolve

REFRESH_EVERY_S = 2.0


class GpuPool:
    """This runner's DeviceReport, refreshed, and the questions placement asks of it."""

    def __init__(self, shared: bool | None = None, inventory: Callable[[], NvmlInventory] = read_inventory,
                 report: DeviceReport | None = None, log: Callable[[str], None] | None = None):  # fmt: skip
        self.shared = share_gpus_allowed() if shared is None else shared
        self._inventory = inventory
        self._log = log or (lambda line: print(line, flush=True))
        self.report = report or detect_devices(_own_pids(()), self.shared, probe_torch())
        self.refreshed_at = time.monotonic()
        self._told: str | None = None

    def refresh(self, job_pids: Iterable[int] = (), force: bool = False) -> bool:
        """Read NVML again (at most every REFRESH_EVERY_S unless forced); True when the GPUs a lease shows changed."""
        if not force and time.monotonic() - self.refreshed_at < REFRESH_EVERY_S:
            return False
        self.refreshed_at = time.monotonic()
        inventory = self._inventory()
        if inventory.error and self.report.nvml.gpus:
            if inventory.error != self._told:
                self._log(f"NVML: {inventory.error}; keeping the GPUs it listed before, asking again after a back-off")
            self._told = inventory.error
            inventory = replace(self.report.nvml)  # the last inventory stands: GPUs do not vanish with NVML
        elif self._told:
            self._log("NVML answers again")
            self._told = None
        before = self.report.lease_gpus()
        self.report = resolve(inventory, self.report.torch, visible_devices(), _own_pids(job_pids), self.shared)
        return self.report.lease_gpus() != before

    @property
    def count(self) -> int:
        """The GPUs runs may use here (busy ones included: they may free up), what validation counts."""
        return len(self.report.gpus)

    def free(self, booked: Iterable[int]) -> list[int]:
        return [g.index for g in self.report.free(booked)]

    def wait_reason(self, want: int, booked: Iterable[int]) -> str:
        booked = list(booked)
        free = self.free(booked)
        busy = self.report.busy_text(booked)
        return f"waiting for {want} free GPUs ({len(free)} free now" + (f"; {busy})" if busy else ")")

    def uuids(self, indices: Iterable[int]) -> list[str]:
        by_index = {g.index: g.uuid for g in self.report.gpus}
        return [by_index[i] for i in indices if i in by_index]

    def names(self, indices: Iterable[int]) -> list[str]:
        by_index = {g.index: g.name for g in self.report.gpus}
        return [by_index[i] for i in indices if i in by_index]


def _own_pids(job_pids: Iterable[int]) -> set[int]:
    """The runner, its jobs' processes, and every process it started (a job's ranks before they are recorded)."""
    own = {os.getpid(), *job_pids}
    try:
        own |= {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        pass
    return own
