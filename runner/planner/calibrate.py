"""Calibration (issue 15 item 3): this host's matmul rate and link bandwidth, measured and stored for the planner.

- Matmul rate: `n x n @ n x n` repeated for about half a second in a fresh Python process (torch is imported
  there, never by the app importing this module), 2n^3 FLOPs each. On CPU one thread, as each CPU rank of a
  run gets one (runner/service/launch.py sets OMP_NUM_THREADS=1 and job.py pins a core); on CUDA the first GPU, timed
  with synchronize around the loop, in float32 and bfloat16.
- Link bandwidth: an all-reduce of `mib` MiB float32 between 2 local processes started by torchrun (gloo on
  CPU, NCCL on 2+ GPUs), the median of 5 timed after 2 warm-ups, reported as bus bandwidth
  2(n-1)/n x bytes / seconds (nccl-tests' busbw: what each rank's link carries in a ring).
- Stored in the `calibrations` table (storage/calibration.py, revision 0007) under this host's name
  (storage.hosts.this_host); `this_host_devices()` builds the planner's Devices from the newest row: the
  measured matmul rate stands in for the peak (so the planner's efficiency then applies to a measured rate:
  use --efficiency 1 for CPU runs), the bus bandwidth for both links (one machine).

`python -m runner.planner.calibrate allreduce --mib N --out F` is the worker torchrun runs.
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

MATMUL_SCRIPT = r"""
import json, sys, time, torch
device, n, dtype_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if device == "cpu":
    torch.set_num_threads(1)
dtype = getattr(torch, dtype_name)
a = torch.randn(n, n, device=device).to(dtype)
b = torch.randn(n, n, device=device).to(dtype)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
for _ in range(2):
    a @ b
sync()
reps, t0 = 0, time.perf_counter()
while True:
    a @ b
    reps += 1
    if reps % 4 == 0:
        sync()
        if time.perf_counter() - t0 > 0.5:
            break
elapsed = time.perf_counter() - t0
name = torch.cuda.get_device_name(0) if device == "cuda" else ""
print(json.dumps({"flops": 2 * n**3 * reps / elapsed, "reps": reps, "seconds": elapsed, "name": name}))
"""


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


def measure_matmul(device: str = "cpu", size: int = 1024, dtype: str = "float32", timeout_s: float = 120) -> dict:
    """FLOP/s of repeated n x n matmuls on one device (one thread on CPU), in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MATMUL_SCRIPT, device, str(size), dtype], capture_output=True,
                         text=True, timeout=timeout_s)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"matmul measurement failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_allreduce(device: str = "cpu", mib: int = 16, ranks: int = 2, timeout_s: float = 180) -> dict:
    """Bus bandwidth of an all-reduce between `ranks` local processes (torchrun; gloo on CPU, NCCL on CUDA)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "allreduce.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "runner.planner.calibrate", "allreduce", "--mib", str(mib), "--device", device,
               "--out", str(out_file)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out_file.exists():
            raise RuntimeError(f"all-reduce measurement failed: {proc.stderr.strip()[-800:]}")
        return json.loads(out_file.read_text())


def calibrate(device: str = "auto", size: int = 1024, mib: int = 16) -> Calibration:
    """Measure this host: matmul rate per dtype of one device, all-reduce bandwidth between 2 local ranks."""
    from storage.hosts import this_host

    if device == "auto":
        device = "cuda" if _gpu_count() else "cpu"
    dtypes = ("float32", "bfloat16")
    rates, name = {}, ""
    for dt in dtypes:
        r = measure_matmul(device, size if device == "cpu" else max(size, 8192), dt)
        rates[dt] = r["flops"]
        name = r["name"] or name
    if device == "cpu":
        name = _cpu_name()
    ranks = 2
    bw: float | None = None
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda" and _gpu_count() < 2:
        backend = "none (one GPU)"
    else:
        bw = measure_allreduce(device, mib, ranks)["busbw"]
    return Calibration(this_host(), device, name, rates, bw, ranks, backend)


def _gpu_count() -> int:
    from runner.api import this_host_gpus

    return len(this_host_gpus(None)[0])


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
    cal = calibrate(device, size, mib)
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


def this_host_devices(engine: Any = None) -> Devices:
    """This host's devices for the planner: the GPUs runs may use here (runner.api.this_host_gpus: the live
    runner's report, the one the dashboard and the self-test show) or its CPU cores, with the newest calibration
    when one is stored (else published peaks for GPUs; an uncalibrated CPU gets 10 GFLOP/s a core and 1 GB/s,
    said in `source`)."""
    import psutil

    from runner.api import this_host_gpus
    from runner.spec.run_spec import usable_cores

    try:
        from storage.db import get_engine

        engine = engine or get_engine()
    except Exception:  # noqa: BLE001 -- no database here: plan from published figures, said in source
        engine = None
    gpus, _ = this_host_gpus(engine)
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


def _allreduce_worker(argv: list[str]) -> None:
    """Run under torchrun: time an all-reduce of `--mib` MiB float32 and write the bus bandwidth (rank 0)."""
    import argparse
    import statistics
    import time

    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    n = dist.get_world_size()
    x = torch.ones(a.mib * 2**20 // 4, device="cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(7):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        sync()  # NCCL is asynchronous on the stream: the host clock only counts once the kernel finished
        if i >= 2:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    nbytes = x.numel() * 4
    if dist.get_rank() == 0:
        busbw = 2 * (n - 1) / n * nbytes / seconds
        Path(a.out).write_text(json.dumps({"busbw": busbw, "seconds": seconds, "bytes": nbytes, "ranks": n}))
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "allreduce":
        _allreduce_worker(sys.argv[2:])
    else:
        print("usage: python -m runner.planner.calibrate allreduce --mib N --out FILE (run by torchrun)")
