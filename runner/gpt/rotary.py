"""Rotary position embedding (Su et al. 2021) in Hugging Face's layout, and the Llama attention's heads read from
c_attn's stacked output [Q | K | V] with Q and K rotated, as one autograd function.

Autograd run op by op keeps c_attn's whole output alive through the attention (the unrotated V handed to the
attention kernel is a view of it), and its backward builds the gradient of that output from pieces: each rotation's
slices and negation padded with zeros, then a concatenation of Q's, K's and V's gradients. `rotary_heads` hands the
attention a copy of V (kv values a token) so c_attn's output (q + 2 kv) is freed once the heads are read, saves
nothing but the shared cos and sin, and writes the three gradients straight into the halves of one tensor. Where the
gradients and c_attn's output share a dtype (float32, bfloat16) the values and gradients are those of the op-by-op
form: the same products and sums of the same numbers.
"""

from __future__ import annotations

import math

import torch

from runner.gpt.config import GPTConfig


def rotary_frequencies(config: GPTConfig) -> torch.Tensor:
    """The head_dim / 2 rotary frequencies theta^(-2i/d), float32, with Llama 3.1's rescaling if configured
    (computed as Hugging Face does, so cos and sin agree to the bit)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = config.rope_scaling
    if sc is None:
        return inv_freq
    low_wavelen = sc.original_max_position / sc.low_freq_factor
    high_wavelen = sc.original_max_position / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """The cos and sin of the last positions asked for, shared by every layer of one forward. Not a module: it
    holds no parameters or state to save. A head's first and second halves are the two coordinates of each
    rotated pair."""

    def __init__(self, config: GPTConfig):
        self.config = config
        self._inv_freq: torch.Tensor | None = None
        self._last: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def cos_sin(self, start: int, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (start, t, like.device, like.dtype)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        if self._inv_freq is None:
            self._inv_freq = rotary_frequencies(self.config)
        pos = torch.arange(start, start + t, device=like.device, dtype=torch.float32)
        freqs = pos[:, None] * self._inv_freq.to(like.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos_sin = (emb.cos().to(like.dtype), emb.sin().to(like.dtype))
        self._last = (key, cos_sin)
        return cos_sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d] rotated by the angles of its positions."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _unrotate_into(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """out = the gradient of `rotate`'s input: grad * cos, plus grad * sin with its halves swapped back and the
    second one negated (the transpose of the rotation's half swap)."""
    half = grad.shape[-1] // 2
    by_sin = grad * sin
    if grad.dtype == out.dtype:
        torch.mul(grad, cos, out=out)
        target = out
    else:  # a float32 rotation of bfloat16 heads (bf16-mixed): one rounding, at the end
        target = grad * cos
    target[..., :half] += by_sin[..., half:]
    target[..., half:] -= by_sin[..., :half]
    if target is not out:
        out.copy_(target)


def split_heads(stacked: torch.Tensor, parts: tuple[int, int, int], head_dim: int) -> list[torch.Tensor]:
    """Views [B, heads, T, head_dim] of Q, K and V in `stacked` [B, T, q + 2 kv]."""
    b, t, _ = stacked.shape
    return [z.view(b, t, -1, head_dim).transpose(1, 2) for z in stacked.split(parts, dim=-1)]


class _RotaryHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, parts, head_dim):
        q, k, v = split_heads(qkv, parts, head_dim)
        ctx.save_for_backward(cos, sin)
        ctx.parts, ctx.head_dim, ctx.shape, ctx.dtype = parts, head_dim, qkv.shape, qkv.dtype
        return rotate(q, cos, sin), rotate(k, cos, sin), v.contiguous()

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        whole = grad_q is not None and grad_k is not None and grad_v is not None  # else the missing ones are 0
        out = (torch.empty if whole else torch.zeros)(ctx.shape, dtype=ctx.dtype, device=cos.device)
        slot_q, slot_k, slot_v = split_heads(out, ctx.parts, ctx.head_dim)
        for grad, slot in ((grad_q, slot_q), (grad_k, slot_k)):
            if grad is not None:
                _unrotate_into(grad, cos, sin, slot)
        if grad_v is not None:
            slot_v.copy_(grad_v)
        return out, None, None, None, None


def rotary_heads(qkv: torch.Tensor, parts: tuple[int, int, int], head_dim: int, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Q and K rotated, and V, each [B, heads, T, head_dim], from c_attn's output `qkv` [B, T, q + 2 kv] of widths
    `parts`; V is a copy, so nothing holds `qkv` once the attention has its heads (module docstring)."""
    return _RotaryHeads.apply(qkv, cos, sin, parts, head_dim)
