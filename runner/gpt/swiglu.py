"""SwiGLU's product silu(gate) * up as one autograd function over c_fc's stacked output [gate | up].

It saves what autograd run op by op saves (c_fc's output, read by silu and the product, and silu(gate)), but its
backward writes the gate's and the up projection's gradients straight into the halves of one tensor, where autograd
computes them apart and then concatenates them into a third. The values and gradients are those of the op-by-op form,
bit for bit: the same kernels on the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stacked: torch.Tensor) -> torch.Tensor:
        gate, up = stacked.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        ctx.save_for_backward(stacked, silu_gate)
        return silu_gate * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        stacked, silu_gate = ctx.saved_tensors
        gate, up = stacked.chunk(2, dim=-1)
        out = torch.empty_like(stacked)
        grad_gate, grad_up = out.chunk(2, dim=-1)
        torch.mul(grad, silu_gate, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return out


def swiglu(stacked: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of `stacked` = [gate | up] on its last dimension (the halves of a column-parallel c_fc alike)."""
    return _SwiGLU.apply(stacked)
