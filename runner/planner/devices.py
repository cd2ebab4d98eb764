"""What a layout runs on, for the planner: a `Devices` record and the ways to get one (torch-free).

- `preset(name, count, gpus_per_node)`: known GPUs. Peak FLOP/s come from runner/job/metrics.py's table
  (`device_peak_flops`, NVIDIA data sheets, dense); memory is what the driver reports for the part
  (nvidia-smi's total: H100 80GB 81,559 MiB, A100 80GB 81,920 MiB); bandwidths are per GPU, one
  direction: NVLink 4 (H100 SXM) 450 GB/s, NVLink 3 (A100 SXM) 300 GB/s, PCIe 5 x16 64 GB/s, PCIe 4 x16
  32 GB/s; between nodes one 400 Gb/s NIC per GPU (DGX H100) = 50 GB/s, 200 Gb/s (DGX A100) = 25 GB/s.
- `from_gpus(gpus)`: the [{name, memory_total}] list of the GPUs runs may use on one node, as runner leases
  store it and runner.api.this_host_gpus gives it; `from_lease(lease)` for another host's runner (api.hosts).
- `from_partition(partition, kind)`: a Slurm partition (runner/cluster.Partition, read with sinfo): its
  nodes x GPUs per node, the GPUs described by a preset kind (sinfo does not say which GPU).
- `described(...)`: anything else, by hand.
- `cpu_host(...)`: this machine's CPU ranks, from a calibration (runner/planner/calibrate.py) when there is one.

How fast a device computes (`matmul_seconds`, `memory_seconds`: the one function of shapes and device kind the step
time uses, with one set of constants per kind, never per case):
- a matrix multiply [m, k] x [k, n] (batched b times) runs in waves of 128 x 128 output tiles over the GPU's SMs
  (cuBLAS's usual tile on A100 and H100; a last partial wave costs a whole one, and so does a partial tile: tile and
  wave quantization, NVIDIA's "Matrix Multiplication Background" user guide), each SM at MATMUL_SHARE of its dense
  peak, and never faster than its inputs and output move through HBM (a roofline: the larger of the two times).
  MATMUL_SHARE is one figure for every kind: the Maximum Achievable Matmul FLOPS measured with cuBLAS on large bf16
  shapes (S. Bekman, ml-engineering, compute/accelerator "Maximum Achievable Matmul FLOPS comparison table") is the
  best shape of a sweep, 85.9% of peak on A100 SXM (267.9 of 312 TFLOP/s) and 80.1% on H100 SXM (792.1 of 989); a
  training step's many shapes and layouts do not all reach a sweep's best, so every kind takes the lower, 80.1%.
  (With A100's own 85.9%, Megatron-LM's Table 1 rows of 1.7B-18.4B come out 15-18% faster than published,
  tests/test_planner_published.py);
- elementwise work (LayerNorm, bias, GeLU, dropout, residual adds, softmax) moves its bytes at MEMORY_SHARE of the
  data sheet's HBM bandwidth (A100 80GB SXM 2,039 GB/s, 40GB 1,555; H100 SXM 3,350; H100 PCIe 2,000; H200 4,800;
  L40S 864; L4 300; A10 600; RTX 4090 1,008: NVIDIA data sheets);
- described devices and CPU ranks have no SMs or HBM figure: their matmuls run at their peak (a calibrated CPU's is
  measured) times the share, and elementwise work is not timed apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from runner.job.metrics import device_peak_flops

MiB, GiB, GB = 2**20, 2**30, 1e9
TILE = 128  # the output tile of a cuBLAS GEMM (module docstring)
MATMUL_SHARE = 0.801  # achievable share of dense peak on a training step's matmuls, every kind (module docstring)
MEMORY_SHARE = 0.8  # share of HBM bandwidth elementwise kernels reach (few bytes a thread, no reuse)


@dataclass(frozen=True)
class Devices:
    """count devices of one kind, gpus_per_node to a node. Bandwidths are bytes/s per device, one direction;
    peak FLOP/s per dtype ('float32', 'bfloat16'). reserve_bytes: memory the framework takes before any tensor
    (CUDA context, allocator slack), not available to the model."""

    name: str
    count: int
    memory_bytes: int
    peak_fp32: float
    peak_bf16: float
    bw_intra: float
    bw_inter: float
    gpus_per_node: int
    reserve_bytes: int = 1 * GiB
    source: str = "described"
    hbm_bw: float = 0.0  # bytes/s of device memory (0: unknown, elementwise work not timed apart)
    sms: int = 0  # streaming multiprocessors (0: unknown, no tile or wave quantization)
    matmul_share: float = MATMUL_SHARE  # achievable share of the dense peak on large matrix multiplies
    nvlink: bool = False  # the GPUs of a node talk over NVLink (else PCIe): what a collective's latency depends on

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for a run's dtype: bf16-mixed and bf16-master compute in bfloat16."""
        return self.peak_bf16 if dtype in ("bfloat16", "bf16-mixed", "bf16-master") else self.peak_fp32

    @property
    def is_cpu(self) -> bool:
        """CPU ranks of one machine (`cpu_host`) rather than accelerators."""
        return self.source.startswith("CPU") or self.name.startswith("CPU")

    @property
    def measured_rate(self) -> bool:
        """Calibrated CPU ranks: their 'peak' is the matmul rate one rank measured (runner/planner/calibrate.py), so
        a share of a published peak does not apply: they compute at it (`efficiency_on`)."""
        return self.is_cpu and self.source.startswith("calibrated")

    @property
    def word(self) -> str:
        """What one of them is called in a table or a reason: 'GPU', or 'device' for CPU ranks."""
        return "device" if self.is_cpu else "GPU"

    @property
    def usable_bytes(self) -> int:
        return max(0, self.memory_bytes - self.reserve_bytes)

    @property
    def nodes(self) -> int:
        return max(1, -(-self.count // self.gpus_per_node))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        per = f"{self.gpus_per_node} a node, " if self.count > self.gpus_per_node else ""
        return (f"{self.count} x {self.name} ({per}{self.memory_bytes / GiB:.1f} GiB, "
                f"{_rate(self.peak_bf16)} bf16, {_rate(self.peak_fp32)} fp32; "
                f"{self.bw_intra / GB:.3g} GB/s in a node, {self.bw_inter / GB:.3g} GB/s between nodes)")  # fmt: skip


def efficiency_on(devices: Devices, efficiency: float | None) -> float | None:
    """The flat share of peak a plan on `devices` computes at: 1 on a measured rate (calibrated CPU ranks, whatever
    share was asked for GPUs), else `efficiency` (None: matmuls modelled by shape). The CLI and the page both ask
    this, so `plan --this-host` and the page's "this host" predict the same step."""
    return 1.0 if devices.measured_rate else efficiency


def matmul_seconds(dev: Devices, dtype: str, m: int, n: int, k: int, batch: int = 1, width: int = 2) -> float:
    """Seconds of `batch` matrix multiplies [m, k] x [k, n] in `dtype` (elements of `width` bytes) on one device:
    whole waves of 128 x 128 tiles over its SMs at its achievable share of peak, or its HBM traffic if longer
    (module docstring). Devices without an SM count compute at peak x share, tiles not counted."""
    if m <= 0 or n <= 0 or k <= 0 or batch <= 0:
        return 0.0
    rate = dev.peak(dtype) * dev.matmul_share
    if dev.sms <= 0:
        return 2 * batch * m * n * k / rate
    tiles = batch * math.ceil(m / TILE) * math.ceil(n / TILE)
    waves = math.ceil(tiles / dev.sms)
    compute = waves * dev.sms * 2 * TILE * TILE * k / rate
    moved = batch * (m * k + k * n + m * n) * width
    return max(compute, memory_seconds(dev, moved))


def memory_seconds(dev: Devices, nbytes: float) -> float:
    """Seconds elementwise kernels take to move `nbytes` through device memory; 0 where its bandwidth is unknown."""
    return nbytes / (dev.hbm_bw * MEMORY_SHARE) if dev.hbm_bw > 0 else 0.0


def _rate(flops: float) -> str:
    return f"{flops / 1e12:.3g} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.3g} GFLOP/s"


def _peaks(nvml_name: str) -> tuple[float, float]:
    return device_peak_flops(nvml_name, "float32") or 0.0, device_peak_flops(nvml_name, "bfloat16") or 0.0


@dataclass(frozen=True)
class Kind:
    """A known GPU: the name NVML reports (for the peak table), memory, bandwidths, GPUs in its usual node."""

    label: str
    nvml_name: str
    memory_bytes: int
    bw_intra: float
    bw_inter: float
    gpus_per_node: int
    hbm_bw: float = 0.0  # data sheet (module docstring)
    sms: int = 0
    matmul_share: float = MATMUL_SHARE
    nvlink: bool = False  # SXM parts: NVLink between a node's GPUs


KINDS: dict[str, Kind] = {
    "h100-80gb": Kind("H100 80GB SXM", "NVIDIA H100 80GB HBM3", 81559 * MiB, 450 * GB, 50 * GB, 8, 3350 * GB, 132,
                      nvlink=True),
    "h100-pcie": Kind("H100 PCIe", "NVIDIA H100 PCIe", 81559 * MiB, 64 * GB, 50 * GB, 8, 2000 * GB, 114),
    "h200": Kind("H200 SXM", "NVIDIA H200", 143771 * MiB, 450 * GB, 50 * GB, 8, 4800 * GB, 132, nvlink=True),
    "a100-80gb": Kind("A100 80GB SXM", "NVIDIA A100-SXM4-80GB", 81920 * MiB, 300 * GB, 25 * GB, 8, 2039 * GB, 108,
                      nvlink=True),
    "a100-40gb": Kind("A100 40GB SXM", "NVIDIA A100-SXM4-40GB", 40960 * MiB, 300 * GB, 25 * GB, 8, 1555 * GB, 108,
                      nvlink=True),
    "l40s": Kind("L40S", "NVIDIA L40S", 46068 * MiB, 32 * GB, 25 * GB, 8, 864 * GB, 142),
    "l4": Kind("L4", "NVIDIA L4", 23034 * MiB, 32 * GB, 12.5 * GB, 8, 300 * GB, 58),
    "a10": Kind("A10", "NVIDIA A10", 23028 * MiB, 32 * GB, 12.5 * GB, 4, 600 * GB, 72),
    "rtx-4090": Kind("GeForce RTX 4090", "NVIDIA GeForce RTX 4090", 24564 * MiB, 32 * GB, 12.5 * GB, 8, 1008 * GB, 128),
}


def preset(kind: str, count: int, gpus_per_node: int | None = None) -> Devices:
    """count GPUs of a known kind (KINDS), gpus_per_node to a node (default: the kind's usual node)."""
    if kind not in KINDS:
        raise ValueError(f"unknown GPU kind {kind!r}; known: {', '.join(KINDS)}")
    k = KINDS[kind]
    fp32, bf16 = _peaks(k.nvml_name)
    per = gpus_per_node or min(count, k.gpus_per_node)
    return Devices(k.label, count, k.memory_bytes, fp32, bf16, k.bw_intra, k.bw_inter, per, source=f"preset {kind}",
                   hbm_bw=k.hbm_bw, sms=k.sms, matmul_share=k.matmul_share, nvlink=k.nvlink)  # fmt: skip


def kind_of(nvml_name: str) -> str | None:
    """The KINDS key of a device name as NVML reports it, or None."""
    lowered = nvml_name.lower()
    for key, k in KINDS.items():
        if k.nvml_name.lower() == lowered:
            return key
    for key, k in KINDS.items():
        words = k.label.lower().split()
        if all(w in lowered for w in words[:2]):
            return key
    return None


def from_gpus(gpus: Sequence[Mapping[str, Any]], host: str = "this host") -> Devices | None:
    """The GPUs of one host ([{name, memory_total}], as a runner lease and api.this_host_gpus give them); None if none."""
    if not gpus:
        return None
    name = str(gpus[0].get("name", "GPU"))
    memory = min(int(g.get("memory_total") or 0) for g in gpus)
    key = kind_of(name)
    fp32, bf16 = _peaks(name)
    k = KINDS.get(key) if key else None
    intra = k.bw_intra if k else 32 * GB
    inter = k.bw_inter if k else 12.5 * GB
    speed = dict(hbm_bw=k.hbm_bw, sms=k.sms, matmul_share=k.matmul_share, nvlink=k.nvlink) if k else {}
    return Devices(name, len(gpus), memory, fp32, bf16, intra, inter, len(gpus), source=f"detected on {host}", **speed)


def from_lease(lease: Mapping[str, Any]) -> Devices | None:
    """The GPUs a runner's lease reports for its host (runner.api.hosts() entries); None when it has none."""
    return from_gpus(lease.get("gpus") or [], str(lease.get("host", "a host")))


def from_partition(partition: Any, kind: str, nodes: int | None = None) -> Devices:
    """A Slurm partition (runner.service.cluster.Partition) of GPUs of a known kind: nodes x its GPUs per node."""
    per = partition.gpus_per_node
    if per < 1:
        raise ValueError(f"partition {partition.name} has no GPUs per node in sinfo's GRES")
    n = nodes or partition.usable_count or partition.node_count
    dev = preset(kind, n * per, per)
    return replace(dev, source=f"Slurm partition {partition.name} ({n} nodes x {per} GPUs)")


def described(
    count: int,
    memory_gib: float,
    peak_tflops: float,
    bw_intra_gbs: float,
    bw_inter_gbs: float,
    gpus_per_node: int,
    name: str = "described GPU",
    peak_fp32_tflops: float | None = None,
) -> Devices:
    """Devices described by hand: peak_tflops is the bfloat16 peak (fp32: peak_fp32_tflops, default 1/15 of it,
    the H100 SXM ratio). A node's links faster than PCIe 5 x16 (64 GB/s a direction) can only be NVLink."""  # fmt: skip
    fp32 = (peak_fp32_tflops if peak_fp32_tflops is not None else peak_tflops / 15) * 1e12
    return Devices(name, count, int(memory_gib * GiB), fp32, peak_tflops * 1e12, bw_intra_gbs * GB,
                   bw_inter_gbs * GB, gpus_per_node, nvlink=bw_intra_gbs > 64)  # fmt: skip


def cpu_host(cores: int, memory_bytes: int, flops: float, allreduce_bw: float, host: str = "this host") -> Devices:
    """CPU ranks of one machine: `cores` ranks sharing its memory (each gets an equal part), at a measured
    matmul rate per rank and all-reduce bandwidth (runner/planner/calibrate.py)."""
    per_rank = memory_bytes // max(1, cores)
    return Devices(f"CPU core ({host})", cores, per_rank, flops, flops, allreduce_bw, allreduce_bw, cores,
                   reserve_bytes=200 * MiB, source=f"CPU of {host}", matmul_share=1.0)  # fmt: skip
