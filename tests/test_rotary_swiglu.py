"""Llama's rotary heads and SwiGLU as autograd functions (runner/gpt/rotary.py, runner/gpt/swiglu.py) against the
same operations run by autograd one by one: the same values and gradients, and c_attn's output no longer held."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from runner.gpt.model import GPT, PRESETS
from runner.gpt.rotary import rotary_heads, rotate, split_heads
from runner.gpt.swiglu import swiglu

PARTS, HEAD = (64, 32, 32), 16  # 4 query heads over 2 key/value heads of 16


def _op_by_op_heads(qkv, cos, sin):
    q, k, v = split_heads(qkv, PARTS, HEAD)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_heads_and_swiglu_equal_autograd_op_by_op_bit_for_bit(dtype):
    # One dtype throughout: each gradient element is the same two products summed (or the same kernels run), so
    # not one bit may differ.
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, sum(PARTS), generator=gen).to(dtype).requires_grad_()
    angles = torch.randn(5, HEAD, generator=gen)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    ours = rotary_heads(qkv, PARTS, HEAD, cos, sin)
    grads = [torch.randn(o.shape, generator=gen).to(dtype) for o in ours]
    torch.autograd.backward(ours, grads)
    ours_grad, qkv.grad = qkv.grad, None
    reference = _op_by_op_heads(qkv, cos, sin)
    torch.autograd.backward(reference, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
    assert torch.equal(ours_grad, qkv.grad)

    stacked = torch.randn(2, 5, 2 * 44, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(2, 5, 44, generator=gen).to(dtype)
    out = swiglu(stacked)
    out.backward(grad)
    ours_grad, stacked.grad = stacked.grad, None
    gate, up = stacked.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    expected.backward(grad)
    assert torch.equal(out, expected) and torch.equal(ours_grad, stacked.grad)


def test_a_float32_rotation_of_bfloat16_heads_rounds_its_gradient_once():
    # bf16-mixed: c_attn's output is bfloat16, cos and sin float32. Autograd rounds each of the gradient's two terms
    # to bfloat16 and then their sum; ours rounds the float32 sum once. Each rounding moves a value by at most half
    # a bfloat16 ulp, 2^-8 of it: ours is within 2^-8 |a + b| of the exact sum, autograd's within
    # 2^-8 (|a| + |b|) + 2^-8 (|a| + |b|)(1 + 2^-8), so the two differ by at most 2^-6 (|a| + |b|).
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 5, sum(PARTS), generator=gen).to(torch.bfloat16).requires_grad_()
    angles = torch.randn(5, HEAD, generator=gen)
    cos, sin = angles.cos(), angles.sin()
    ours = rotary_heads(qkv, PARTS, HEAD, cos, sin)
    grads = [torch.randn(o.shape, generator=gen) for o in ours]
    torch.autograd.backward(ours, grads)
    ours_grad, qkv.grad = qkv.grad.float(), None
    torch.autograd.backward(_op_by_op_heads(qkv, cos, sin), grads)
    half = HEAD // 2
    bound = torch.zeros(2, 5, sum(PARTS))  # v's gradient is copied, rounded once by both: bound 0
    for g, slot in zip(grads[:2], split_heads(bound, PARTS, HEAD)[:2], strict=True):
        swapped = torch.cat((g[..., half:], g[..., :half]), dim=-1) * torch.cat((sin[..., half:], sin[..., :half]), -1)
        slot.copy_((g * cos).abs() + swapped.abs())
    assert ((ours_grad - qkv.grad.float()).abs() <= 2**-6 * bound).all()


def test_a_llama_block_holds_no_c_attn_output_after_its_forward():
    # The saved-activation count the planner uses (runner/planner/byte_counts.py saved_split_values): the rotated q
    # and k and v's copy, not c_attn's whole output.
    model = GPT(PRESETS["llama-tiny"])
    block = model.transformer.h["0"]
    seen: list[weakref.ref] = []
    block.attn.c_attn.register_forward_hook(lambda _m, _a, out: seen.append(weakref.ref(out)))
    x = torch.randn(2, 8, 64, requires_grad=True)
    y = block(x)
    gc.collect()
    assert len(seen) == 1 and seen[0]() is None
    y.sum().backward()  # and the backward still has all it needs
    assert x.grad is not None and torch.isfinite(x.grad).all()
