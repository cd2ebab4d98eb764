"""Calibration (issue 15 item 3): this host's matmul rate and link bandwidth, measured and stored for the planner.

The measurements run in processes of their own (runner/job/calibrate_worker.py: torch is imported there, never by
the app importing this module); here they are started, placed and stored.
- Matmul rate: `n x n @ n x n`, 2n^3 FLOPs each. On CPU one thread, as each CPU rank of a run gets one
  (runner/service/launch.py sets OMP_NUM_THREADS=1 and the job pins a core), timed by the host clock; on CUDA
  one free GPU, n at least 8192, timed by CUDA events over many back-to-back matmuls, in float32 and bfloat16.
- Link bandwidth: an all-reduce between local processes started by torchrun, reported as bus bandwidth
  2(n-1)/n x bytes / seconds (nccl-tests' busbw: what each rank's link carries in a ring). On CPU 2 ranks (gloo),
  `mib` MiB, median of 5 host-timed. On CUDA every free local GPU, one rank each (NCCL), at least
  GPU_ALLREDUCE_MIB MiB, CUDA events over many back-to-back all-reduces, the slowest rank's time.
- Free GPUs are those runs may use here (runner/service/devices.py: torch's view, the inherited
  CUDA_VISIBLE_DEVICES, MIG refused), not busy with another process and not booked by a running run of this
  host: calibration never shares a GPU a job holds, whose timings it would disturb and be disturbed by. The
  workers get those GPUs by UUID in CUDA_VISIBLE_DEVICES.
- Stored in the `calibrations` table (storage/calibration.py, revision 0007) under this host's name
  (storage.hosts.this_host); `this_host_devices()` builds the planner's Devices from the newest row: the
  measured matmul rate stands in for the peak (so the planner's efficiency then applies to a measured rate:
  use --efficiency 1 for CPU runs), the bus bandwidth for both links (one machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runner.planner.devices import Devices, cpu_host, from_gpus
from runner.service.devices import Gpu


@dataclass(frozen=True)
class Calibration:
    """One host's measurement: matmul FLOP/s of one device per dtype and all-reduce bus bandwidth."""

    host: str
    device: str  # "cpu" or "cuda"
    device_name: str
    matmul_flops: dict[str, float]  # dtype -> FLOP/s of one rank
    allreduce_bytes_per_s: float | None
    allreduce_ranks: int
    backend: str
    measured_at: str = ""

    def describe(self) -> str:
        rates = ", ".join(f"{v / 1e9:.1f} GFLOP/s {k}" for k, v in self.matmul_flops.items())
        bw = f"{self.allreduce_bytes_per_s / 1e9:.2f} GB/s" if self.allreduce_bytes_per_s else "not measured"
        when = f"calibrated {self.measured_at[:10]}: " if self.measured_at else "calibrated: "
        return f"{when}{self.device_name} on {self.host}: {rates}; all-reduce ({self.backend}, {self.allreduce_ranks} ranks) {bw}"

    def store(self, engine: Any) -> list[int]:
        """One row per dtype measured, all with the same measured_at (that is how `stored` finds them together)."""
        from storage.calibration import store_calibration
        from storage.models import utcnow

        now = utcnow()
        return [store_calibration(engine, {**self.to_row(dt), "measured_at": now}) for dt in self.matmul_flops]

    def to_row(self, dtype: str) -> dict[str, Any]:
        return {
            "host": self.host,
            "device": self.device,
            "device_name": self.device_name,
            "dtype": dtype,
            "matmul_flops": self.matmul_flops[dtype],
            "allreduce_bytes_per_s": self.allreduce_bytes_per_s,
            "allreduce_ranks": self.allreduce_ranks,
            "backend": self.backend,
            "detail": asdict(self),
        }


WORKER = "runner.job.calibrate_worker"
GPU_ALLREDUCE_MIB = 256  # on NVLink a smaller all-reduce is dominated by launch latency, not the link
GPU_MATMUL_N = 8192


def _env(gpus: list[str]) -> dict[str, str]:
    """The workers' environment: the given GPUs by UUID (CUDA order = this order), or none and one thread on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ",".join(gpus)}
    if gpus:
        env.pop("OMP_NUM_THREADS")
    return env


def measure_matmul(device: str = "cpu", size: int = 1024, dtype: str = "float32", timeout_s: float = 120,
                   gpu: str | None = None) -> dict:  # fmt: skip
    """FLOP/s of repeated n x n matmuls on one device (one thread on CPU; on CUDA the GPU of UUID `gpu`, else
    the first one CUDA sees), in a fresh process."""
    env = _env([gpu]) if gpu else _env([]) if device == "cpu" else dict(os.environ)
    out = subprocess.run([sys.executable, "-m", WORKER, "matmul", device, str(size), dtype], capture_output=True,
                         text=True, timeout=timeout_s, env=env)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"matmul measurement failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_allreduce(device: str = "cpu", mib: int = 16, ranks: int = 2, timeout_s: float = 300,
                      gpus: list[str] | None = None) -> dict:  # fmt: skip
    """Bus bandwidth of an all-reduce between local processes started by torchrun: `ranks` on CPU (gloo), one
    per GPU of `gpus` (UUIDs) on CUDA (NCCL)."""
    if device == "cuda" and gpus:
        ranks = len(gpus)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "allreduce.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", WORKER, "allreduce", "--mib", str(mib), "--device", device, "--out", str(out_file)]  # fmt: skip
        env = _env(gpus or []) if device == "cuda" and gpus else _env([]) if device == "cpu" else dict(os.environ)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out_file.exists():
            raise RuntimeError(f"all-reduce measurement failed: {proc.stderr.strip()[-800:]}")
        return json.loads(out_file.read_text())


def calibrate(device: str = "auto", size: int = 1024, mib: int = 16, engine: Any = None) -> Calibration:
    """Measure this host: matmul rate per dtype of one device, all-reduce bandwidth between 2 CPU ranks or every
    free local GPU. RuntimeError when CUDA is asked for and no GPU is free (saying why)."""
    from storage.hosts import this_host

    gpus = free_gpus(engine) if device in ("auto", "cuda") else ([], "")
    if device == "auto":
        device = "cuda" if gpus[0] else "cpu"
    if device == "cuda" and not gpus[0]:
        raise RuntimeError(f"no free GPU to calibrate: {gpus[1]}")
    uuids = [g.uuid for g in gpus[0]] if device == "cuda" else []
    rates, name = {}, ""
    for dt in ("float32", "bfloat16"):
        r = measure_matmul(device, size if device == "cpu" else max(size, GPU_MATMUL_N), dt,
                           gpu=uuids[0] if uuids else None)  # fmt: skip
        rates[dt] = r["flops"]
        name = r["name"] or name
    if device == "cpu":
        name = _cpu_name()
    ranks = len(uuids) if device == "cuda" else 2
    bw: float | None = None
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda" and ranks < 2:
        backend = "none (one free GPU)"
    else:
        mib = max(mib, GPU_ALLREDUCE_MIB) if device == "cuda" else mib
        bw = measure_allreduce(device, mib, ranks, gpus=uuids)["busbw"]
    return Calibration(this_host(), device, name, rates, bw, ranks, backend)


def free_gpus(engine: Any = None) -> tuple[list[Gpu], str]:
    """(the GPUs calibration may take now, why there are none): this machine's usable GPUs (read afresh, as its
    runner reads them), less those another process uses and those a running run of this host booked."""
    from runner.service.device_probe import detect_devices

    report = detect_devices(shared=False)
    booked: set[int] = set()
    try:
        from storage import runner_rows
        from storage.db import get_engine
        from storage.hosts import this_host

        booked = {int(g) for row in runner_rows.running_runs(engine or get_engine(), host=this_host())
                  for g in row["gpus"] or []}  # fmt: skip
    except Exception:  # noqa: BLE001 -- no database here: a run's ranks still show as other processes on its GPUs
        booked = set()
    free = report.free(booked)
    if free:
        return free, ""
    if not report.gpus:
        return [], report.no_gpu_reason()
    held = [g.index for g in report.gpus if g.index in booked]
    return [], "; ".join(p for p in (f"GPUs {', '.join(map(str, held))} are booked by running runs" if held else "",
                                     report.busy_text(booked)) if p)  # fmt: skip


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def calibrate_and_store(device: str = "auto", size: int = 1024, mib: int = 16, store: bool = True,
                        engine: Any = None) -> Calibration:  # fmt: skip
    """calibrate(), then one row per dtype in the database (unless store is False)."""
    cal = calibrate(device, size, mib, engine)
    if store:
        from storage.db import get_engine

        cal.store(engine or get_engine())
    return cal


def stored(engine: Any, host: str | None = None, device: str | None = None) -> Calibration | None:
    """The newest stored calibration of `host` (default this host) as a Calibration (both dtypes), or None."""
    from storage.calibration import calibrations
    from storage.hosts import this_host

    rows = calibrations(engine, host or this_host())
    rows = [r for r in rows if device is None or r["device"] == device]
    if not rows:
        return None
    newest = rows[0]
    same = [r for r in rows if r["measured_at"] == newest["measured_at"] and r["device"] == newest["device"]]
    rates = {r["dtype"]: r["matmul_flops"] for r in same}
    return Calibration(newest["host"], newest["device"], newest["device_name"], rates,
                       newest["allreduce_bytes_per_s"], newest["allreduce_ranks"] or 2, newest["backend"] or "",
                       newest["measured_at"] or "")  # fmt: skip


def devices_from_calibration(
    cal: Calibration, cores: int, memory_bytes: int, gpus: list[dict] | None = None
) -> Devices:
    """The planner's Devices for a calibrated host: its GPUs with the measured rates, or its CPU cores."""
    fp32 = cal.matmul_flops.get("float32", 0.0)
    bf16 = cal.matmul_flops.get("bfloat16", fp32)
    if cal.device == "cuda" and gpus:
        base = from_gpus(gpus, cal.host)
        assert base is not None
        bw = cal.allreduce_bytes_per_s or base.bw_intra
        return Devices(base.name, base.count, base.memory_bytes, fp32, bf16, bw, base.bw_inter, base.gpus_per_node,
                       source=f"{cal.describe()}")  # fmt: skip
    dev = cpu_host(cores, memory_bytes, fp32, cal.allreduce_bytes_per_s or 1e9, cal.host)
    return Devices(dev.name, dev.count, dev.memory_bytes, fp32, bf16, dev.bw_intra, dev.bw_inter, dev.gpus_per_node,
                   reserve_bytes=dev.reserve_bytes, source=cal.describe())  # fmt: skip


def this_host_devices(gpus: list[dict[str, Any]], engine: Any = None) -> Devices:
    """This host's devices for the planner: `gpus`, the GPUs runs may use here (runner.api.this_host_gpus: the live
    runner's report, the one the dashboard and the self-test show), or its CPU cores, with the newest calibration
    when one is stored (else published peaks for GPUs; an uncalibrated CPU gets 10 GFLOP/s a core and 1 GB/s,
    said in `source`)."""
    import psutil

    from runner.spec.run_spec import usable_cores

    cal = None
    try:
        cal = stored(engine, device="cuda" if gpus else "cpu") if engine is not None else None
    except Exception:  # noqa: BLE001 -- no database here: plan from published figures, said in source
        cal = None
    memory = psutil.virtual_memory().total
    if cal is not None:
        return devices_from_calibration(cal, usable_cores(), memory, gpus)
    if gpus:
        dev = from_gpus(gpus)
        assert dev is not None
        return dev
    dev = cpu_host(usable_cores(), memory, 10e9, 1e9)
    return Devices(dev.name, dev.count, dev.memory_bytes, dev.peak_fp32, dev.peak_bf16, dev.bw_intra, dev.bw_inter,
                   dev.gpus_per_node, dev.reserve_bytes, "CPU, not calibrated (python -m runner calibrate)")  # fmt: skip
