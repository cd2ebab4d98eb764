"""Calibration's measurements, each in a process of its own: torch is imported here, never by the planner.

`python -m runner.job.calibrate_worker matmul DEVICE N DTYPE` prints the FLOP/s of n x n @ n x n matmuls
(2n^3 FLOPs each) on one device as JSON:
- CPU: one thread (each CPU rank of a run gets one), the host clock around a loop of about half a second.
- CUDA: the first GPU CUDA_VISIBLE_DEVICES names (the planner gives it one free GPU by UUID), CUDA events
  around ITERS matmuls launched back to back after WARMUP (cuBLAS's handle, workspace and kernel choice are
  set up by then), the median of ROUNDS such timings. Events on the stream time the device's work, not the
  host's launch and synchronize, which a host clock around one kernel would add.

`torchrun --nproc-per-node R -m runner.job.calibrate_worker allreduce --mib N --device D --out F` writes the
bus bandwidth of an all-reduce of N MiB float32 between the R local ranks to F (rank 0):
- CUDA (NCCL, rank r on the r-th GPU CUDA_VISIBLE_DEVICES names): the default group bound to the rank's GPU
  (its communicator formed at init), WARMUP all-reduces, then CUDA events around ITERS all-reduces launched back
  to back, ROUNDS times; each rank's median, and the slowest rank's kept (an all-reduce ends when its slowest
  rank does). The planner asks for at least 256 MiB on GPUs: on NVLink smaller messages measure launch latency.
- CPU (gloo, synchronous): the host clock around each of 5 all-reduces after 2 warm-ups, the median.
Bus bandwidth as nccl-tests defines it: 2(n-1)/n x bytes / seconds, what each rank's link carries in a ring.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

WARMUP, ITERS, ROUNDS = 5, 20, 5


def _cuda_median_seconds(op, iters: int = ITERS, rounds: int = ROUNDS, warmup: int = WARMUP) -> float:
    """Seconds per `op` on the current CUDA stream: events around `iters` back-to-back launches, median of rounds."""
    for _ in range(warmup):
        op()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            op()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)  # elapsed_time is in milliseconds
    return statistics.median(times)


def matmul(device: str, n: int, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    if device == "cpu":
        torch.set_num_threads(1)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if device == "cuda":
        seconds = _cuda_median_seconds(lambda: a @ b)
        return {"flops": 2 * n**3 / seconds, "seconds": seconds, "reps": ITERS * ROUNDS,
                "name": torch.cuda.get_device_name(0)}  # fmt: skip
    for _ in range(2):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 0.5:
        a @ b
        reps += 1
    elapsed = time.perf_counter() - t0
    return {"flops": 2 * n**3 * reps / elapsed, "seconds": elapsed / reps, "reps": reps, "name": ""}


def allreduce(mib: int, device: str, out: Path) -> None:
    cuda = device == "cuda"
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=timedelta(seconds=300), device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    n = dist.get_world_size()
    x = torch.ones(mib * 2**20 // 4, device="cuda" if cuda else "cpu")
    if cuda:
        seconds = _cuda_median_seconds(lambda: dist.all_reduce(x))
        slowest = torch.tensor([seconds], device="cuda", dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        seconds = float(slowest.item())
    else:
        times = []
        for i in range(7):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
    nbytes = x.numel() * 4
    if dist.get_rank() == 0:
        busbw = 2 * (n - 1) / n * nbytes / seconds
        out.write_text(json.dumps({"busbw": busbw, "seconds": seconds, "bytes": nbytes, "ranks": n,
                                   "iterations": ITERS * ROUNDS if cuda else 5}))  # fmt: skip
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    if argv[:1] == ["matmul"] and len(argv) == 4:
        print(json.dumps(matmul(argv[1], int(argv[2]), argv[3])))
        return 0
    if argv[:1] == ["allreduce"]:
        p = argparse.ArgumentParser(prog="python -m runner.job.calibrate_worker allreduce")
        p.add_argument("--mib", type=int, default=16)
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        p.add_argument("--out", type=Path, required=True)
        a = p.parse_args(argv[1:])
        allreduce(a.mib, a.device, a.out)
        return 0
    print("usage: python -m runner.job.calibrate_worker matmul DEVICE N DTYPE | allreduce --mib N --device D "
          "--out FILE (under torchrun)", file=sys.stderr)  # fmt: skip
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
