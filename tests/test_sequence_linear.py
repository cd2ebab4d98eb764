"""The column-parallel linear under sequence parallelism (runner/gpt/tp_layers.py `_SequenceGatheredLinear`) against
gather-then-F.linear run by autograd: the same output and gradients, and only this rank's positions kept for the
backward instead of the whole gathered sequence.

The group is a stand-in of two ranks seen from rank 0 (the other rank's positions are a fixed tensor), so the
arithmetic is checked alone; the collectives themselves run in tests/test_tensor_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runner.gpt.comm import gather_from_sequence
from runner.gpt.tp_layers import _SequenceGatheredLinear
from runner.job.resources import cpu_tensor_peak, live_tensor_bytes


class TwoRankComm:
    """Rank 0 of two: all_gather appends the other rank's positions, reduce_scatter keeps rank 0's half (the other
    rank's partial gradient is taken as zero, so the sum is this rank's own)."""

    size = 2

    def __init__(self, other: torch.Tensor):
        self.other, self.gathers, self.scatters = other, 0, 0

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.gathers += 1
        return torch.cat([t, self.other.to(t.dtype)], dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.scatters += 1
        return t.chunk(self.size, dim=dim)[0].contiguous()


def _case(dtype: torch.dtype, bias: bool):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 16, generator=gen).to(dtype).requires_grad_()
    other = torch.randn(3, 4, 16, generator=gen).to(dtype)
    weight = torch.randn(24, 16, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(24, generator=gen).to(dtype).requires_grad_() if bias else None
    grad = torch.randn(3, 8, 24, generator=gen).to(dtype)
    return x, other, weight, b, grad


def _grads(out, grad, *leaves):
    out.backward(grad)
    grads = [t.grad.clone() if t is not None else None for t in leaves]
    for t in leaves:
        if t is not None:
            t.grad = None
    return grads


@pytest.mark.parametrize("bias", [True, False])
def test_the_sequence_gathered_linear_equals_gather_then_linear_bit_for_bit(bias):
    # float32 throughout and the same products in the same order (g W for the input, g^T x for the weight, the bias
    # gradient summed over positions), so not one bit may differ from autograd's F.linear.
    x, other, weight, b, grad = _case(torch.float32, bias)
    comm = TwoRankComm(other)
    ours = _SequenceGatheredLinear.apply(x, weight, b, comm)
    ours_grads = _grads(ours, grad, x, weight, b)
    assert (comm.gathers, comm.scatters) == (2, 1)  # the forward's gather, the backward's re-gather and scatter
    reference = F.linear(gather_from_sequence(x, comm), weight, b)
    reference_grads = _grads(reference, grad, x, weight, b)
    assert torch.equal(ours, reference)
    for a, r in zip(ours_grads, reference_grads, strict=True):
        assert (a is None and r is None) or torch.equal(a, r)


def test_under_autocast_it_computes_in_the_autocast_dtype_as_f_linear_does():
    # autocast casts x, W and b to bfloat16 for F.linear and autograd reruns the backward products on those casts;
    # ours casts the same tensors the same way, so the bfloat16 results are the same kernels on the same inputs.
    x, other, weight, b, grad = _case(torch.float32, True)
    comm = TwoRankComm(other)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _SequenceGatheredLinear.apply(x, weight, b, comm)
    assert ours.dtype == torch.bfloat16
    ours_grads = _grads(ours, grad.bfloat16(), x, weight, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.linear(gather_from_sequence(x, comm), weight, b)
    reference_grads = _grads(reference, grad.bfloat16(), x, weight, b)
    assert torch.equal(ours, reference)
    assert [g.dtype for g in ours_grads] == [torch.float32] * 3  # the leaves' own dtype, as autograd returns them
    # The weight's gradient is one bfloat16 product either way; the input's and the bias's may be summed in another
    # order by the autocast path, so they are held to bfloat16's rounding of their largest element (2^-8 relative).
    for a, r in zip(ours_grads, reference_grads, strict=True):
        assert torch.allclose(a, r, rtol=0, atol=2.0**-8 * float(r.abs().max()))


def test_only_this_ranks_positions_are_kept_for_the_backward():
    x, other, weight, b, _ = _case(torch.float32, True)
    comm = TwoRankComm(other)

    def kept_bytes(fn) -> int:
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            fn()
        # the weight is kept by both (it is a parameter, held anyway); count what is kept beside it
        return sum(t.numel() * t.element_size() for t in kept if t.data_ptr() != weight.data_ptr())

    ours = kept_bytes(lambda: _SequenceGatheredLinear.apply(x, weight, b, comm))
    reference = kept_bytes(lambda: F.linear(gather_from_sequence(x, comm), weight, b))
    shard = x.numel() * x.element_size()
    assert ours == shard
    assert reference == comm.size * shard  # the gathered sequence: tp times as much


def test_the_backward_never_holds_the_gathered_input_beside_the_whole_input_gradient():
    # One output column, so the whole sequence's input (gathered again) and its gradient are all the backward makes
    # of any size: dropping the first before making the second keeps the backward's rise to about one of them, where
    # holding both would be two (the planner's block moment counts these two whole tensors with the gathered
    # gradient arriving beside them, runner/planner/memory.py).
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 256, 128, generator=gen).requires_grad_()
    weight = torch.randn(1, 128, generator=gen).requires_grad_()
    comm = TwoRankComm(torch.randn(1, 256, 128, generator=gen))
    out = _SequenceGatheredLinear.apply(x, weight, None, comm)
    grad = torch.ones_like(out)

    def backward():
        out.backward(grad, retain_graph=True)
        x.grad = weight.grad = None  # (x's gradient is a view of the whole input gradient: it holds that storage)

    whole = 2 * x.numel() * x.element_size()
    rise = cpu_tensor_peak(backward) - live_tensor_bytes()  # the backward's peak over what it started with
    assert whole <= rise < 1.5 * whole
