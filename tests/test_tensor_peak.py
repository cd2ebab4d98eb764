"""The CPU tensor peak (runner/job/resources.py cpu_tensor_peak) against steps whose allocations are known by hand."""

from __future__ import annotations

import torch

from runner.job.resources import cpu_tensor_peak, live_tensor_bytes

MiB = 2**20


def _bytes(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.uint8)


def test_a_step_that_frees_what_the_previous_one_left_is_counted_from_the_live_set_at_its_start():
    """Like a training step: it first drops what the previous step left (gradients set to None), then peaks with
    two temporaries, then leaves a new carry. Live at the measured step's start: 4 MiB kept + the 2 MiB carry; the
    step frees the carry (0 + 4), peaks at 4 + 3 + 5 = 12 MiB, and ends at 4 + 2. A window opened by the measured
    step itself would miss the carry's free (made before it) and say 14."""
    kept = _bytes(4 * MiB)
    state = {"carry": _bytes(2 * MiB)}

    def step() -> None:
        state["carry"] = None
        a = _bytes(3 * MiB)
        b = _bytes(5 * MiB)
        del a
        c = _bytes(1 * MiB)
        state["carry"] = _bytes(2 * MiB)
        del b, c

    before = live_tensor_bytes()  # whatever else this test process holds (other tests' tensors, torch's own)
    peak = cpu_tensor_peak(step)
    assert abs(peak - before - (12 * MiB - 6 * MiB)) < 64 * 1024, (peak - before) / MiB
    assert kept.numel() == 4 * MiB  # kept alive through the measurement


def test_live_tensor_bytes_counts_a_storage_once_and_the_gradients():
    base = live_tensor_bytes()
    w = torch.zeros(MiB // 4, requires_grad=True)  # 1 MiB of float32
    views = [w[: MiB // 8], w.view(2, -1)]  # share its storage: not counted again
    (w * 2).sum().backward()  # w.grad: another 1 MiB, reachable only through w
    assert live_tensor_bytes() - base == 2 * MiB
    assert len(views) == 2


def test_on_cuda_the_tensor_peak_leaves_out_the_cublas_workspaces_and_reports_them(monkeypatch):
    """A described allocator (no GPU here): a tiny model peaked at 70 MiB over the timed steps, two Hopper-sized
    cuBLAS workspaces of 32 MiB included (one per stream that ran a matmul), 1 MiB of tensors alive after them.
    Freeing the workspaces drops what is allocated by 64 MiB: the tensors' peak is 6 MiB, the run's peak stays 70."""
    from runner.job.resources import MemoryMeter

    allocated = {"now": 65 * MiB}
    cleared = []

    def clear() -> None:
        cleared.append(True)
        allocated["now"] -= 64 * MiB

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 70 * MiB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", clear, raising=False)
    meter = MemoryMeter(torch.device("cuda", 0))
    assert meter.tensor_peak(lambda: None) == 6 * MiB and meter.workspace_bytes == 64 * MiB and cleared == [True]
