"""Tensor-parallel layers (Megatron-LM's), the vocab-parallel loss, and the state they share.

Each layer holds a slice of the reference layer's weight (recorded on the parameter as its `Shard`)
and communicates only through the tp group's GroupComm and the counted conjugate operators of
runner/gpt/comm.py:
- ColumnParallelLinear: output columns split (Q/K/V heads, MLP columns); its input enters the parallel
  region (identity forward, all-reduce of the gradient backward);
- RowParallelLinear: input columns split; the partial outputs are summed as they leave the region,
  then the bias is added once;
- GatheredInputLinear: the "gather" style of attention's output projection: all heads are gathered
  and the whole (replicated) projection runs on every rank;
- VocabParallelEmbedding / VocabParallelHead: rows of the vocabulary (padded up to a multiple of tp,
  the padding rows zero and their logits -inf), so no rank ever holds [tokens, vocab] in training;
- SequenceShardedEmbedding: the replicated position embedding, scattered over the sequence under
  sequence parallelism.

Sequence parallelism (Korthikanti et al. 2022): outside the parallel regions each rank holds seq/tp
positions, entering becomes an all-gather of the sequence and leaving a reduce-scatter; replicated
parameters used there (LayerNorms, row-parallel biases) see part of the sequence, so their gradients
are summed over the group after backward (`all_reduce_sequence_parallel_grads`). It is on only while
whole sequences are processed: decoding with a KV cache adds one position a pass, which cannot be split,
so the strategy runs generation inside `TPState.whole_sequences()` -- state held by the model's layers,
not by the process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import ReduceOp

from runner.gpt.comm import (
    GroupComm,
    copy_to_parallel_region,
    gather_from_parallel_region,
    gather_from_sequence,
    reduce_from_parallel_region,
    reduce_scatter_to_sequence,
    scatter_to_sequence,
)
from runner.gpt.model import Shard


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so each rank holds an equal slice of rows."""
    return math.ceil(vocab_size / tp) * tp


class TPState:
    """The tp group, the vocabulary slice of this rank, the model's key/value heads, and whether activations
    outside the parallel regions are sequence-sharded now (configured on, and not paused by `whole_sequences`)."""

    def __init__(self, comm: GroupComm, vocab_size: int, sequence_parallel: bool = False, kv_heads: int | None = None):
        self.comm, self.vocab_size, self.sequence_parallel = comm, vocab_size, sequence_parallel
        self.kv_heads = kv_heads if kv_heads is not None else comm.size
        self.vocab_per_rank = padded_vocab(vocab_size, comm.size) // comm.size
        self.vocab_start = comm.index * self.vocab_per_rank
        self._paused = False

    def figures(self) -> dict:
        """How the key/value heads lie over the tp ranks: 'split' (each rank its own n_kv_head / tp) or
        'replicated' (each head on tp / n_kv_head ranks)."""
        split = self.kv_heads % self.comm.size == 0
        return {"tp_kv_heads": "split" if split else "replicated",
                "kv_heads_per_rank": self.kv_heads // self.comm.size if split else 1}  # fmt: skip

    @property
    def sequence_sharded(self) -> bool:
        return self.sequence_parallel and not self._paused

    @contextmanager
    def whole_sequences(self) -> Iterator[None]:
        """Sequence parallelism off meanwhile (decoding with a KV cache)."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Into a parallel region, where every rank needs the whole input."""
        return gather_from_sequence(x, self.comm) if self.sequence_sharded else copy_to_parallel_region(x, self.comm)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b with x entering the region: under sequence parallelism only this rank's positions are kept for
        the backward (`_SequenceGatheredLinear`), else the whole input, as F.linear keeps it."""
        if self.sequence_sharded and self.comm.size > 1:
            return _SequenceGatheredLinear.apply(x, weight, bias, self.comm)
        return F.linear(self.enter(x), weight, bias)

    def leave(self, partial: torch.Tensor) -> torch.Tensor:
        """Out of a parallel region: sum the ranks' partial outputs (over the sequence's slices under SP)."""
        if self.sequence_sharded:
            return reduce_scatter_to_sequence(partial, self.comm)
        return reduce_from_parallel_region(partial, self.comm)

    def loss(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy from this rank's vocabulary slice of the logits [b, s, V_pad/tp]."""
        return vocab_parallel_cross_entropy(local_logits.flatten(0, 1), targets.flatten(), self.vocab_start, self.comm)

    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """The full logits [.., V] on every rank: only where a user asked for them (forward output, sampling)."""
        return self.comm.all_gather(local_logits.contiguous(), dim=-1)[..., : self.vocab_size]


def sliced(p: nn.Parameter, index, shape: tuple[int, ...] | None = None) -> nn.Parameter:
    """A parameter (no values yet: `materialize` gives them) holding reference[index] of p's reference;
    `shape` where it is not that of the index (vocabulary padding)."""
    ref_shape = tuple(p.shape)
    if shape is None:
        shape = tuple(torch.empty(ref_shape, device="meta")[index].shape)
    new = nn.Parameter(torch.empty(shape, device=p.device, dtype=p.dtype), p.requires_grad)
    new.shard = Shard(ref_shape, index)
    return new


def mark_kv_replicated(*params: nn.Parameter | None, first_row: int) -> None:
    """Rows first_row.. of a c_attn holding a replicated key/value head: their gradient is this rank's query
    heads' share, to be summed over the ranks holding the same head (`all_reduce_kv_grads`)."""
    for p in params:
        if p is not None:
            p.kv_replicated_from = first_row


def all_reduce_kv_grads(params: list[nn.Parameter], comm: GroupComm | None) -> None:
    """Sum the K and V rows' gradients of replicated key/value heads over their kv group, in one flat all-reduce."""
    grads = [(p.grad, p.kv_replicated_from) for p in params if p.grad is not None]
    if comm is None or comm.size == 1 or not grads:
        return
    with torch.no_grad():
        flat = comm.all_reduce(torch.cat([g[row:].reshape(-1) for g, row in grads]))
        offset = 0
        for g, row in grads:
            part = g[row:]
            part.copy_(flat[offset : offset + part.numel()].view_as(part))
            offset += part.numel()


def mark_sequence_parallel(*params: nn.Parameter | None) -> None:
    """Replicated parameters used on seq/tp positions: their gradients are partial sums to all-reduce."""
    for p in params:
        if p is not None:
            p.sequence_parallel = True


class ColumnParallelLinear(nn.Module):
    """y[:, cols of this rank] = x W[rows]^T + b[rows], x whole on every rank."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, state: TPState):
        super().__init__()
        self.weight, self.bias, self.state = weight, bias, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.state.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x[:, cols of the rank] W[:, cols]^T, then + b (added once, after the sum)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, state: TPState):
        super().__init__()
        self.weight, self.bias, self.state = weight, bias, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.state.leave(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class GatheredInputLinear(nn.Module):
    """The whole projection on every rank, applied to the input's column slices gathered from all ranks."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, state: TPState):
        super().__init__()
        self.weight, self.bias, self.state = weight, bias, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(gather_from_parallel_region(x, self.state.comm), self.weight, self.bias)


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V_pad/tp) of the token embedding. Each rank looks up the tokens in its range
    and writes 0 for the others; the sum over ranks (leaving the region) is the embedding."""

    def __init__(self, weight: nn.Parameter, state: TPState):
        super().__init__()
        self.weight, self.state = weight, state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        start, per = self.state.vocab_start, self.state.vocab_per_rank
        outside = (ids < start) | (ids >= start + per)
        partial = F.embedding((ids - start).clamp(0, per - 1), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.state.leave(partial)


class VocabParallelHead(nn.Module):
    """This rank's slice of the logits, [b, s, V_pad/tp], from whole hidden states (gathered over the sequence
    under sequence parallelism). Padding columns are -inf: no token, never predicted, 0 in the softmax."""

    def __init__(self, weight: nn.Parameter, state: TPState):
        super().__init__()
        self.weight, self.state = weight, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.state.linear(x, self.weight)
        valid = max(0, min(self.state.vocab_size - self.state.vocab_start, logits.shape[-1]))
        if valid < logits.shape[-1]:
            pad = torch.arange(logits.shape[-1], device=x.device) >= valid
            logits = logits.masked_fill(pad, float("-inf"))
        return logits


class SequenceShardedEmbedding(nn.Module):
    """A replicated embedding of positions [1, s] -> [1, s, h]; this rank's s/tp of them under sequence
    parallelism (each rank adds its own positions to its own slice of the tokens)."""

    def __init__(self, weight: nn.Parameter, state: TPState):
        super().__init__()
        self.weight, self.state = weight, state

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        out = F.embedding(positions, self.weight)
        return scatter_to_sequence(out, self.state.comm) if self.state.sequence_sharded else out


class _SequenceGatheredLinear(torch.autograd.Function):
    """x W^T + b over the whole sequence from this rank's seq/tp positions x [b, s/tp, in]: the sequence is gathered
    forward and again backward, and only the shard is kept between them (Korthikanti et al. 2022, section 4.2.2, as
    Megatron-LM and nanotron's tp_recompute_allgather do): what sequence parallelism saves of a column-parallel
    layer's input is 1/tp of it, for one more all-gather a layer in the backward. The input's gradient is
    reduce-scattered back over the sequence (each rank's is a partial sum over its columns).

    Under autocast the shard is kept (and sent) in the autocast dtype, which is what the matmul reads, and the backward
    reruns the matmuls in it: what autograd does for F.linear, whose saved inputs are autocast's casts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, comm: GroupComm) -> torch.Tensor:
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        shard = x.to(cast) if cast is not None and x.is_floating_point() else x
        ctx.comm, ctx.cast, ctx.has_bias, ctx.x_dtype = comm, cast, bias is not None, x.dtype
        ctx.save_for_backward(shard, weight)
        return F.linear(comm.all_gather(shard, dim=1), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard, weight = ctx.saved_tensors
        whole = ctx.comm.all_gather(shard, dim=1)
        shape = (*whole.shape[:-1], weight.shape[1])
        g = grad.reshape(-1, grad.shape[-1])
        # the products as autograd's mm backward takes them for x W^T: the weight's g^T x, the input's g W; the whole
        # input is dropped before the input's gradient is made, so the two whole-sequence tensors never meet
        grad_w = g.t().mm(whole.reshape(-1, whole.shape[-1])).to(weight.dtype)
        del whole
        w = weight.to(ctx.cast) if ctx.cast is not None else weight
        grad_x = g.mm(w).view(shape).to(ctx.x_dtype)
        grad_b = grad.sum(dim=(0, 1)).to(weight.dtype) if ctx.has_bias else None
        return ctx.comm.reduce_scatter(grad_x, dim=1), grad_w, grad_b, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over logits split by vocabulary: three all-reduces of one number per token
    (max, sum of exponentials, target logit) instead of gathering [tokens, vocab] (Megatron's scheme)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, start: int, comm: GroupComm) -> torch.Tensor:
        logits = logits.float()
        per = logits.shape[-1]
        # Any shift keeps the softmax exact; the global max keeps exp() from overflowing on every rank.
        m = logits.max(dim=-1).values
        comm.all_reduce(m, op=ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp)
        inside = (targets >= start) & (targets < start + per)  # the rank holding the target's column
        local_t = (targets - start).clamp(0, per - 1)
        # torch.where, not `* inside`: a rank whose slice holds no real token (vocab < ~tp^2 leaves the last
        # ranks all padding) gathers a -inf column for targets it does not hold, and -inf * 0 is NaN.
        target_logit = torch.where(inside, shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1), 0.0)
        comm.all_reduce(target_logit)
        loss = (sum_exp.log() - target_logit).mean()
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, in place: the saved tensor is the only [N, V/tp] kept
        ctx.save_for_backward(exp, local_t, inside)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d loss / d logit = (softmax - onehot(target)) / N; each rank holds its own columns of both.
        softmax, local_t, inside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_t.unsqueeze(-1), -inside.to(g.dtype).unsqueeze(-1))
        return g * (grad / softmax.shape[0]), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, start: int, comm: GroupComm):
    """logits [N, V_pad/tp] of this rank's vocabulary slice starting at `start`, targets [N] -> the mean
    loss, the same on every rank; no rank ever holds [N, V]."""
    if comm.size == 1:
        return F.cross_entropy(logits.float(), targets)
    return _VocabParallelCrossEntropy.apply(logits, targets, start, comm)


def all_reduce_sequence_parallel_grads(params: list[nn.Parameter], comm: GroupComm) -> None:
    """Sum the partial gradients of replicated parameters used on seq/tp positions, in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    with torch.no_grad():
        flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
