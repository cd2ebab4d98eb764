"""What a rank takes from its host: the core it is pinned to, its wait for a core, and its own memory.

CPU runs share the machine's cores. When there are at least as many usable cores as ranks, each rank is
pinned to its own core (`pin_rank`), so no two ranks time-slice one core and their timings are theirs.
Pinning knows only its own job: two CPU jobs run at once (`serve --max-cpu-jobs 2`) pin to the same
cores, and the wait each rank measures (below) shows that contention rather than hiding it.
With more ranks than cores the run is oversubscribed and each rank measures how long it was runnable
but not running: the second field of /proc/self/schedstat (`run_delay`, nanoseconds spent waiting on a
run queue; see the kernel's Documentation/scheduler/sched-stats.rst). It is the main thread's figure,
the thread that runs the model (CPU jobs run with one intra-op thread).

Memory is the run's own (`MemoryMeter`):
- CUDA: the caching allocator's peak of allocated bytes, reset right before the timed steps
  (torch.cuda.reset_peak_memory_stats), so set-up and the verify pass do not count.
- CPU: peak RSS during the timed steps minus the rank's RSS after process set-up (interpreter, torch
  primed by one tiny step so its lazily allocated buffers count as set-up, and the process group; before
  the model is built). Linux restarts the peak (VmHWM) at the current RSS
  when "5" is written to /proc/self/clear_refs (since 4.0); freed verify memory is handed back to the
  kernel first (malloc_trim), so it cannot hide inside the new baseline. The absolute peak RSS is
  reported beside it. glibc's mmap threshold is fixed at its initial 128 KiB (`fix_malloc_threshold`):
  left dynamic, it rises each time a large block is freed, after which large tensors come from the heap
  and stay resident when freed. The same run then measured a peak anywhere in a ~30 MB range depending on
  what the process had freed before; with the threshold fixed, every tensor above 128 KiB is its own
  mapping, returned to the kernel when freed, and the peak repeats to within 1 MB.

Beside it, `peak_tensor_bytes` is the most bytes the rank's tensors held at once in a step, on either device
-- what the planner predicts (runner/planner/memory.py), without the process's own overhead (gloo's
buffers, Python objects, malloc's slack: about 10 MB, as much as a tiny model's tensors):
- CUDA: the caching allocator's peak over the timed steps without the cuBLAS workspaces, which are reported
  beside it (`cublas_workspace_bytes`) and stay in peak_mem_bytes. PyTorch takes each cuBLAS (and cuBLASLt)
  workspace from the caching allocator, one per (handle, stream) pair, and keeps it until
  torch._C._cuda_clearCublasWorkspaces() (PyTorch issues 95668, 100919: max_memory_allocated counts them);
  on Hopper one is 32 MiB (issue 120925), so a tiny model's ~5 MB of tensors would read 33-65 MiB. They are
  measured, not assumed: right after the timed steps, the drop of memory_allocated when PyTorch frees them is
  their size -- what PyTorch's own CUDA leak check does before comparing allocations
  (torch/testing/_internal/common_utils.py). Setting CUBLAS_WORKSPACE_CONFIG to a known size and subtracting
  it instead would need the number of (handle, stream) pairs, which the code's streams decide, would miss a
  cuBLASLt workspace not unified with cuBLAS's (TORCH_CUBLASLT_UNIFIED_WORKSPACE), and a smaller workspace
  changes which GEMM kernels cuBLAS may pick, so the timed figures. The subtraction is exact because the
  workspaces are created at the first matmul on each stream, in the warm-up (validation requires warmup >= 1
  on CUDA), so each is allocated through the whole timed window, inside the peak exactly once.
- CPU: measured on an untimed step after the timed ones (`cpu_tensor_peak`). PyTorch's profiler, asked to
  profile memory, reports each CPU allocation and free with the running total of bytes allocated since it
  started (c10's ProfiledCPUMemoryReporter; a free of a block allocated before it started goes unreported).
  So two steps run under it: the first opens the window, so that everything the second frees was either
  allocated inside it or is a tensor alive at its start; at the second's start, every distinct storage
  Python can reach (gradients included) is summed, and the peak is that sum plus the highest running total
  during the second step above the total at its start.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def rank_cores(local_world: int) -> list[int] | None:
    """The cores a CPU job's local ranks are pinned to, local rank i on the i-th: one each when every local rank
    can have its own, else None (they share the whole affinity; also off Linux)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning, no wait figures
        return None
    return cores[:local_world] if local_world <= len(cores) else None


def pin_rank(local_rank: int, local_world: int) -> int | None:
    """Pin this process to its own core when every local rank can have one; returns the core or None."""
    cores = rank_cores(local_world)
    if cores is None:
        return None
    core = cores[local_rank]
    os.sched_setaffinity(0, {core})
    return core


def cpu_wait_ns() -> int | None:
    """Nanoseconds this (main) thread has spent runnable but waiting for a core, or None off Linux."""
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set size now (falls back to the lifetime peak where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM), else the lifetime peak from getrusage."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory(device: torch.device) -> None:
    """Give memory freed by a finished pass (the verify reference) back before the next measurement."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident
        pass


M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value; setting it explicitly stops its dynamic growth


def fix_malloc_threshold() -> bool:
    """Fix glibc's mmap threshold so freed large tensors leave the process (see the module docstring)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc: its allocator decides
        return False


def _prime_torch() -> None:
    """One small forward, backward and AdamW step of the ops a GPT uses, so the memory torch allocates lazily
    on first use (math library buffers, autograd and optimizer machinery, about 80 MB on CPU) belongs to
    set-up rather than to the first model that runs."""
    F = torch.nn.functional
    x = torch.randn(4, 16, 64, requires_grad=True)
    w = torch.randn(64, 256, requires_grad=True)
    h = F.gelu(F.layer_norm(x, (64,)) @ w, approximate="tanh")
    q = h.view(4, 16, 4, 64).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    F.cross_entropy(a.transpose(1, 2).reshape(64, 256), torch.zeros(64, dtype=torch.long)).backward()
    torch.optim.AdamW([x, w]).step()
    release_freed_memory(torch.device("cpu"))


@dataclass
class MemoryMeter:
    """Measures one rank's own peak memory over the timed steps (see the module docstring)."""

    device: torch.device
    baseline_rss: int = 0
    peak_resettable: bool = True
    workspace_bytes: int | None = None  # CUDA: the cuBLAS workspaces tensor_peak() took out of the peak

    @classmethod
    def after_setup(cls, device: torch.device) -> MemoryMeter:
        """Call once the process group exists and before the model is built."""
        if device.type == "cpu":  # CUDA's figure is the allocator's own, which set-up does not touch
            fix_malloc_threshold()
            _prime_torch()
        return cls(device=device, baseline_rss=rss_bytes())

    def start_timed(self) -> None:
        """Call right before the first timed step."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # outside any timed step
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak_resettable = _reset_peak_rss()

    def figures(self) -> dict:
        peak_rss = peak_rss_bytes()
        if self.device.type == "cuda":
            own = int(torch.cuda.max_memory_allocated(self.device))
        else:
            own = max(0, peak_rss - self.baseline_rss)
        return {
            "peak_mem_bytes": own,
            "peak_rss_bytes": peak_rss,
            "mem_baseline_bytes": self.baseline_rss,
            # Without a resettable peak the RSS peak is the process's lifetime one (set-up and verify included).
            "peak_rss_scope": "timed steps" if self.peak_resettable else "process lifetime",
        }

    def tensor_peak(self, step: Callable[[], None]) -> int | None:
        """The most bytes the rank's tensors held at once in a step (module docstring): on CUDA the timed
        steps' allocator peak without the cuBLAS workspaces (their bytes left in `workspace_bytes`), on CPU
        measured by running `step` twice more. Call after figures() and after the last timed step."""
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
            self.workspace_bytes = cublas_workspace_bytes(self.device)
            return peak - self.workspace_bytes
        start = time.perf_counter()
        peak = cpu_tensor_peak(step)
        # the rank log says what ran after the last timed step
        print(f"tensor peak: 2 untimed steps under the profiler, {time.perf_counter() - start:.2f} s", flush=True)
        return peak


def cublas_workspace_bytes(device: torch.device) -> int:
    """Bytes the cuBLAS/cuBLASLt workspaces hold in the caching allocator now: how far memory_allocated drops when
    PyTorch frees them (the next matmul creates them again)."""
    torch.cuda.synchronize(device)  # a kernel still using a workspace must finish before it is handed back
    before = torch.cuda.memory_allocated(device)
    torch._C._cuda_clearCublasWorkspaces()
    return max(0, before - int(torch.cuda.memory_allocated(device)))


MEASURED_STEP = "lab.memory_step"


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU storage Python can reach now, parameters' gradients included."""
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some torch objects warn on
        if not issubclass(type(obj), torch.Tensor):
            continue
        for t in (obj, obj.grad if obj.is_leaf and obj.requires_grad else None):
            if t is not None and t.device.type == "cpu" and t.layout == torch.strided:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def cpu_tensor_peak(step: Callable[[], None]) -> int | None:
    """Peak bytes of CPU tensors during one `step`, from the profiler's allocation events (module docstring);
    None, with the reason in the rank log, where the events cannot be read."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        held = live_tensor_bytes()  # (garbage not yet collected is memory still held: no gc.collect here)
        with record_function(MEASURED_STEP):
            step()
    try:
        return held + _rise_during(prof, MEASURED_STEP)
    except Exception as e:  # (a profiler whose events read differently): the run keeps every timed figure
        print(f"tensor peak: not measured ({type(e).__name__}: {e})", flush=True)
        return None


def _rise_during(prof, span_name: str) -> int:
    """How far the profiler's running total of CPU allocations rose above its value when span `span_name` began."""
    from torch._C._profiler import _EventType

    events = list(_walk(prof.profiler.kineto_results.experimental_event_tree()))
    span = next(e for e in events if e.name == span_name)
    totals = sorted(
        (e.start_time_ns, e.extra_fields.total_allocated, e.extra_fields.alloc_size)
        for e in events
        if e.tag == _EventType.Allocation
        and e.extra_fields.device.type == "cpu"
        and span.start_time_ns <= e.start_time_ns <= span.end_time_ns
    )
    if not totals:
        return 0
    _, first_total, first_size = totals[0]
    at_start = first_total - first_size
    return max(0, max(total for _, total, _ in totals) - at_start)


def _walk(roots):
    stack = list(roots)
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.children)


@dataclass
class CpuWaitMeter:
    """Seconds of waiting for a core during the timed steps (None off Linux)."""

    start_ns: int | None = None

    def start_timed(self) -> None:
        self.start_ns = cpu_wait_ns()

    def seconds(self) -> float | None:
        now = cpu_wait_ns()
        if now is None or self.start_ns is None:
            return None
        return (now - self.start_ns) / 1e9
