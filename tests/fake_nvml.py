"""A described machine behind pynvml's interface: GPUs (MIG instances, compute processes), and NVML errors on demand.

Only what runner/service/nvml.py, device_probe.py and telemetry.py call. Errors carry pynvml's codes (`value`),
so the code under test tells a field NVML does not support from NVML itself failing, as it does with pynvml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

NOT_SUPPORTED, NOT_FOUND, LIB_RM_VERSION_MISMATCH, GPU_IS_LOST = 3, 6, 18, 15


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = ""
    memory_total: int = 80 * 2**30
    mig: bool | None = False  # None: the device does not support MIG (NOT_SUPPORTED, as before Ampere)
    mig_uuids: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    used: int = 2**30
    util: int | None = 50  # None: NOT_SUPPORTED, as some devices answer for utilisation


class FakeNvml:
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], driver: str = "550.54.15", cuda: int = 12040):
        self.gpus = gpus
        for i, g in enumerate(gpus):
            g.uuid = g.uuid or f"GPU-{i:08x}-0000-0000-0000-000000000000"
        self.driver, self.cuda = driver, cuda
        self.fail_with: int | None = None  # every call raises this code while set
        self.inits = self.shutdowns = self.calls = 0

    def _call(self) -> None:
        self.calls += 1
        if self.fail_with is not None:
            raise NVMLError(self.fail_with)

    def nvmlInit(self) -> None:
        self._call()
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._call()
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._call()
        return self.cuda

    def nvmlDeviceGetCount(self) -> int:
        self._call()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        self._call()
        return self.gpus[i]

    def nvmlDeviceGetHandleByUUID(self, uuid: str):
        self._call()
        for g in self.gpus:
            if g.uuid.lower() == uuid.lower():
                return g
            if any(m.lower() == uuid.lower() for m in g.mig_uuids):
                return SimpleNamespace(mig_of=g, uuid=uuid)
        raise NVMLError(NOT_FOUND)

    def nvmlDeviceGetName(self, h: FakeGpu) -> bytes:
        self._call()
        return h.name.encode()  # older nvidia-ml-py returns bytes

    def nvmlDeviceGetUUID(self, h) -> str:
        self._call()
        return h.uuid

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu):
        self._call()
        return SimpleNamespace(total=h.memory_total, used=h.used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu):
        self._call()
        if h.util is None:
            raise NVMLError(NOT_SUPPORTED)
        return SimpleNamespace(gpu=h.util)

    def nvmlDeviceGetMigMode(self, h: FakeGpu):
        self._call()
        if h.mig is None:
            raise NVMLError(NOT_SUPPORTED)
        return (int(h.mig), int(h.mig))

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeGpu) -> int:
        self._call()
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeGpu, j: int):
        self._call()
        if j >= len(h.mig_uuids):
            raise NVMLError(NOT_FOUND)  # an empty slot
        return SimpleNamespace(uuid=h.mig_uuids[j])

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu):
        self._call()
        return [SimpleNamespace(pid=p, usedGpuMemory=2**30) for p in h.pids]
