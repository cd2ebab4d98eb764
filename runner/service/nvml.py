"""NVML for one process: initialised once, every call guarded, a failing NVML recorded and backed off.

A runner talks to NVML for its whole life (the device inventory, busy GPUs, each job's telemetry), so
nvmlInit runs once, at the first use, and never per sample or per job; `process_nvml()` is the process's one
instance. Each use goes through `Nvml.run(fn)`:

- An error about one field of one device (NOT_SUPPORTED, NO_PERMISSION, NOT_FOUND, INVALID_ARGUMENT) leaves
  that field None, as gpustat does (`Nvml.field`), and is no failure.
- Any other NVMLError means NVML itself is in trouble: a driver/library version mismatch after an upgrade, a GPU
  fallen off the bus, a driver unloaded. It is recorded (`error`, `failures`), NVML is shut down, and no call is
  made for 1, 2, 4 ... up to 60 s (doubling per failure in a row); the next attempt initialises NVML again. The
  caller gets None ("not known now") and goes on: a failing NVML costs one exception per back-off period, never a
  stalled runner or a run left `running` with its GPUs booked.
- Without nvidia-ml-py, or without the driver's library, NVML is simply unavailable (`error` says which).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
# INVALID_ARGUMENT (an unknown UUID), NOT_SUPPORTED, NO_PERMISSION, NOT_FOUND (an empty MIG slot): that field is None
FIELD_ERRORS = frozenset({2, 3, 4, 6})
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0


class Nvml:
    """One process's NVML. `module`: pynvml (imported at first use) or a stand-in with its interface."""

    def __init__(self, module: Any = None, clock: Callable[[], float] = time.monotonic):
        self._module = module
        self._clock = clock
        self._initialised = False
        self.error: str | None = None  # the last failure, None once a call succeeds again
        self.failures = 0  # failures in a row
        self.retry_at = 0.0  # no call before this (clock time)

    def _lib(self) -> Any:
        if self._module is None:
            try:
                import pynvml  # provided by nvidia-ml-py
            except ImportError:
                self.error = "nvidia-ml-py is not installed"
                return None
            self._module = pynvml
        return self._module

    @property
    def backing_off(self) -> bool:
        return self._clock() < self.retry_at

    def run(self, fn: Callable[[Any], T]) -> T | None:
        """fn(pynvml) with NVML initialised; None when NVML is unavailable, backing off, or failed now."""
        lib = self._lib()
        if lib is None or self.backing_off:
            return None
        try:
            if not self._initialised:
                lib.nvmlInit()
                self._initialised = True
            out = fn(lib)
        except lib.NVMLError as exc:
            self._failed(lib, exc)
            return None
        self.failures, self.error = 0, None
        return out

    def field(self, call: Callable[..., T], *args: Any) -> T | None:
        """One field of one device: None where NVML says it does not apply; other NVML errors reach run()."""
        try:
            return call(*args)
        except self._module.NVMLError as exc:
            if getattr(exc, "value", None) in FIELD_ERRORS:
                return None
            raise

    def _failed(self, lib: Any, exc: Exception) -> None:
        self.failures += 1
        self.error = f"{type(exc).__name__}: {exc}"[:200]
        self.retry_at = self._clock() + min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        if self._initialised:
            self._initialised = False
            try:
                lib.nvmlShutdown()
            except lib.NVMLError:
                pass


_PROCESS_NVML: Nvml | None = None


def process_nvml() -> Nvml:
    """This process's one NVML (created, not yet initialised, at the first call)."""
    global _PROCESS_NVML
    if _PROCESS_NVML is None:
        _PROCESS_NVML = Nvml()
    return _PROCESS_NVML
