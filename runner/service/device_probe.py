"""Reading this machine's devices: NVML's inventory, torch's CUDA in a subprocess, and the report they make.

`probe_torch()` runs runner/job/torch_probe.py in the runner's own Python (sys.executable) with the inherited
environment, so it sees what a rank will see: torch.version.cuda, torch.cuda.init()'s error where CUDA cannot
start, each device's name and UUID. A CPU-only build is known from torch/version.py alone, read without importing
torch, so a machine without CUDA pays nothing. It is a subprocess because the app and the runner never import
torch, and because CUDA initialised in the runner would hold a context on a GPU. A process probes once per
CUDA_VISIBLE_DEVICES (the answer does not change while it lives; a new driver needs a new runner anyway).

`read_inventory(nvml)` reads NVML through the process's one guarded NVML (runner/service/nvml.py), and
`detect_devices()` makes the DeviceReport (runner/service/devices.py, the pure part) from both.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from runner.service.devices import SHARE_ENV, DeviceReport, NvmlGpu, NvmlInventory, TorchGpu, TorchView, resolve
from runner.service.nvml import Nvml, process_nvml

PROBE_TIMEOUT_S = 120.0  # importing torch on a loaded machine takes seconds; CUDA's first init can take tens
PROBE = ("-m", "runner.job.torch_probe")  # torch is imported there, in the runner's Python, never here
REPO_ROOT = Path(__file__).resolve().parents[2]  # runner/service/device_probe.py


def share_gpus_allowed() -> bool:
    """Whether GPUs other users' processes use may be booked too (LAB_SHARE_GPUS=1; `serve --share-gpus`)."""
    return os.environ.get(SHARE_ENV, "").strip().lower() in ("1", "true", "yes")


def visible_devices() -> str | None:
    """The inherited CUDA_VISIBLE_DEVICES, None when unset."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def probe_torch() -> TorchView:
    """torch's CUDA as the runner's own Python sees it under the inherited environment (once per process and
    CUDA_VISIBLE_DEVICES)."""
    build = torch_build()
    if build is not None and build[1] is None:  # a CPU-only build: CUDA cannot start, whatever the machine has
        return TorchView(build[0], None, error="Torch not compiled with CUDA enabled")
    return _probe(sys.executable, visible_devices(), os.environ.get("CUDA_DEVICE_ORDER"))


def torch_build() -> tuple[str, str | None] | None:
    """(torch.__version__, torch.version.cuda) read from the installed torch/version.py without importing torch;
    None when it cannot be read (then the subprocess probe answers)."""
    try:
        spec = importlib.util.find_spec("torch")
        origin = spec.origin if spec else None
        if not origin:
            return None
        with open(os.path.join(os.path.dirname(origin), "version.py")) as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError, ImportError):
        return None
    values = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            values[target.id] = value.value
    if not isinstance(values.get("__version__"), str) or "cuda" not in values:
        return None
    return values["__version__"], values["cuda"]


@lru_cache(maxsize=4)
def _probe(python: str, _visible: str | None, _order: str | None) -> TorchView:
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                           if p)}  # fmt: skip
        proc = subprocess.run([python, *PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env,
                              stdin=subprocess.DEVNULL, cwd=REPO_ROOT)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return TorchView(None, error=f"{type(exc).__name__}: {exc}"[:200])
    try:
        d = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return TorchView(None, error=tail[:200])
    gpus = tuple(TorchGpu(int(g["index"]), str(g["name"]), str(g["uuid"]), int(g["memory_total"])) for g in d["gpus"])
    return TorchView(d["version"], d["cuda"], bool(d["available"]), gpus, d["error"], d["nccl"])


def read_inventory(nvml: Nvml | None = None) -> NvmlInventory:
    """NVML's GPUs with their MIG state and compute processes; the error instead when NVML cannot be read."""
    nvml = nvml or process_nvml()
    found = nvml.run(lambda lib: _inventory(nvml, lib))
    return found if found is not None else NvmlInventory(error=nvml.error or "NVML is backing off after an error")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _inventory(nvml: Nvml, lib) -> NvmlInventory:
    gpus = []
    for i in range(lib.nvmlDeviceGetCount()):
        h = lib.nvmlDeviceGetHandleByIndex(i)
        mode = nvml.field(lib.nvmlDeviceGetMigMode, h)  # (current, pending); NOT_SUPPORTED before Ampere
        mig = bool(mode and mode[0])
        mig_uuids = []
        if mig:
            for j in range(nvml.field(lib.nvmlDeviceGetMaxMigDeviceCount, h) or 0):
                m = nvml.field(lib.nvmlDeviceGetMigDeviceHandleByIndex, h, j)  # NOT_FOUND: an empty slot
                if m is not None:
                    mig_uuids.append(_text(lib.nvmlDeviceGetUUID(m)))
        procs = nvml.field(lib.nvmlDeviceGetComputeRunningProcesses, h) or []
        gpus.append(NvmlGpu(i, _text(lib.nvmlDeviceGetUUID(h)), _text(lib.nvmlDeviceGetName(h)),
                            int(lib.nvmlDeviceGetMemoryInfo(h).total), mig, tuple(mig_uuids),
                            tuple(sorted({int(p.pid) for p in procs}))))  # fmt: skip
    cuda = nvml.field(lib.nvmlSystemGetCudaDriverVersion)  # 12040 -> "12.4"
    return NvmlInventory(tuple(gpus), _text(nvml.field(lib.nvmlSystemGetDriverVersion) or "") or None,
                         f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None)  # fmt: skip


def detect_devices(own_pids: Iterable[int] = (), shared: bool | None = None, torch: TorchView | None = None,
                   nvml: Nvml | None = None) -> DeviceReport:  # fmt: skip
    """This machine's DeviceReport now: NVML read afresh (busy GPUs change), torch's view probed once."""
    return resolve(read_inventory(nvml), torch or probe_torch(), visible_devices(), own_pids,
                   share_gpus_allowed() if shared is None else shared)  # fmt: skip
