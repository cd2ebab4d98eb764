"""Tensor parallelism (Megatron): every layer's heads and MLP columns split over the tp ranks of a group.

Attention: column-parallel Q, K, V (each rank computes heads/tp heads), then either
- `megatron`: a row-parallel output projection whose partial sums are all-reduced, or
- `gather`: the guide's variant, all-gathering the heads and applying the full projection on every rank.
MLP: column-parallel c_fc (d_ff/tp), row-parallel c_proj + all-reduce. The token embedding and the
tied LM head are split over the vocabulary (padded up to a multiple of tp, padded logits masked),
and the loss is a vocab-parallel cross entropy, so no rank materialises full logits in `train`.
With `sequence_parallel`, the LayerNorm/residual regions hold seq/tp positions and each all-reduce
becomes a reduce-scatter + all-gather; the replicated parameters used inside those regions then see
only part of the sequence, so their gradients are summed over the group after backward.

Every parameter is named as in the reference GPT and built as `init_parameter(name)[shard_index]`,
one full parameter at a time. The pieces are separate so that 3D parallelism can put them into
pipeline stages: `TensorParallelBlock` (named like a reference Block), `VocabParallelEmbedding`,
`parallel_lm_logits` (the head) and `vocab_parallel_cross_entropy` (the loss). All communication goes
through the tp group's GroupComm and the conjugate operators of runner/gpt/comm.py, so it is counted.
"""

from __future__ import annotations

import math

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
from runner.gpt.config import GPTConfig
from runner.gpt.mesh import Mesh
from runner.gpt.model import KVCache, LayerKVCache, attend, init_parameter
from runner.gpt.strategy import ParallelGPT
from runner.spec import RunSpec


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so each rank holds an equal slice of rows."""
    return math.ceil(vocab_size / tp) * tp


def reference_shape(name: str, cfg: GPTConfig) -> tuple[int, ...]:
    """Shape of parameter `name` in the single-device reference model."""
    h, f = cfg.n_embd, cfg.d_ff
    leaf = name.split(".", 3)[-1] if name.startswith("transformer.h.") else name
    shapes = {
        "transformer.wte.weight": (cfg.vocab_size, h),
        "lm_head.weight": (cfg.vocab_size, h),
        "transformer.wpe.weight": (cfg.block_size, h),
        "transformer.ln_f.weight": (h,),
        "transformer.ln_f.bias": (h,),
        "ln_1.weight": (h,),
        "ln_1.bias": (h,),
        "ln_2.weight": (h,),
        "ln_2.bias": (h,),
        "attn.c_attn.weight": (3 * h, h),
        "attn.c_attn.bias": (3 * h,),
        "attn.c_proj.weight": (h, h),
        "attn.c_proj.bias": (h,),
        "mlp.c_fc.weight": (f, h),
        "mlp.c_fc.bias": (f,),
        "mlp.c_proj.weight": (h, f),
        "mlp.c_proj.bias": (h,),
    }
    return shapes[leaf]


def shard_index(name: str, cfg: GPTConfig, rank: int, tp: int, style: str):
    """Which part of reference parameter `name` tensor-parallel rank `rank` of `tp` holds (None: all)."""
    h = cfg.n_embd
    if name in ("transformer.wte.weight", "lm_head.weight"):
        per = padded_vocab(cfg.vocab_size, tp) // tp
        return (slice(rank * per, min((rank + 1) * per, cfg.vocab_size)),)
    leaf = name.split(".", 3)[-1] if name.startswith("transformer.h.") else name
    if leaf in ("attn.c_attn.weight", "attn.c_attn.bias"):
        # Q, K and V rows of this rank's heads: the same head range inside each of the three blocks.
        width = h // tp
        rows = torch.cat([torch.arange(part * h + rank * width, part * h + (rank + 1) * width) for part in range(3)])
        return rows
    if leaf == "attn.c_proj.weight" and style == "megatron":
        width = h // tp
        return (slice(None), slice(rank * width, (rank + 1) * width))
    if leaf in ("mlp.c_fc.weight", "mlp.c_fc.bias"):
        width = cfg.d_ff // tp
        return (slice(rank * width, (rank + 1) * width),)
    if leaf == "mlp.c_proj.weight":
        width = cfg.d_ff // tp
        return (slice(None), slice(rank * width, (rank + 1) * width))
    return None


def build_shard(name: str, cfg: GPTConfig, seed: int, rank: int, tp: int, style: str) -> torch.Tensor:
    """The local value of `name`: a slice of its name-seeded reference value (vocab rows zero-padded)."""
    full = init_parameter(name, reference_shape(name, cfg), cfg, seed)
    index = shard_index(name, cfg, rank, tp, style)
    local = full if index is None else full[index]
    if name in ("transformer.wte.weight", "lm_head.weight"):
        per = padded_vocab(cfg.vocab_size, tp) // tp
        if local.shape[0] < per:
            local = torch.cat([local, torch.zeros(per - local.shape[0], cfg.n_embd)])
    return local.contiguous()


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t)


class _Linear(nn.Module):
    """Weight and bias only: the forward is spelled out where the communication around it matters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = _param(weight)
        self.bias = _param(bias) if bias is not None else None


def _layer_norm(cfg: GPTConfig, prefix: str, seed: int) -> nn.LayerNorm:
    """A replicated LayerNorm (it normalises over the hidden dim, which is never split)."""
    ln = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
    with torch.no_grad():
        ln.weight.copy_(init_parameter(f"{prefix}weight", (cfg.n_embd,), cfg, seed))
        if ln.bias is not None:
            ln.bias.copy_(init_parameter(f"{prefix}bias", (cfg.n_embd,), cfg, seed))
    return ln


class _TensorParallelRegion(nn.Module):
    """What attention and MLP share: how their input enters the parallel region and how a row-parallel
    output leaves it. Under sequence parallelism (only without a KV cache: decoding adds one position at a
    time, so there is no sequence to split) the input arrives as seq/tp positions and leaves the same way."""

    comm: GroupComm
    sequence_parallel: bool

    def _enter(self, x: torch.Tensor, cache: LayerKVCache | None) -> torch.Tensor:
        if self.sequence_parallel and cache is None:
            return gather_from_sequence(x, self.comm)
        return copy_to_parallel_region(x, self.comm)

    def _leave(self, partial: torch.Tensor, bias: torch.Tensor | None, cache: LayerKVCache | None) -> torch.Tensor:
        if self.sequence_parallel and cache is None:
            out = reduce_scatter_to_sequence(partial, self.comm)
        else:
            out = reduce_from_parallel_region(partial, self.comm)
        # The bias is added once, after the sum; added on every rank before it, it would count tp times.
        return out if bias is None else out + bias


class TensorParallelAttention(_TensorParallelRegion):
    """heads/tp heads per rank: column-parallel Q, K, V; the output projection depends on the style."""

    def __init__(self, cfg: GPTConfig, layer_id: int, comm: GroupComm, seed: int, style: str, sequence_parallel: bool):
        super().__init__()
        r, tp = comm.index, comm.size
        self.comm, self.style, self.sequence_parallel = comm, style, sequence_parallel
        self.n_local_heads = cfg.n_head // tp
        self.head_dim = cfg.head_dim
        prefix = f"transformer.h.{layer_id}.attn."
        shard = lambda leaf: build_shard(prefix + leaf, cfg, seed, r, tp, style)  # noqa: E731
        self.c_attn = _Linear(shard("c_attn.weight"), shard("c_attn.bias") if cfg.bias else None)
        self.c_proj = _Linear(shard("c_proj.weight"), shard("c_proj.bias") if cfg.bias else None)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = self._enter(x, cache)
        b, t, _ = x.shape
        q, k, v = F.linear(x, self.c_attn.weight, self.c_attn.bias).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.n_local_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if cache is not None:  # the sharded KV cache: each rank keeps only its own heads
            k, v = cache.append(k, v)
        y = attend(q, k, v).transpose(1, 2).reshape(b, t, self.n_local_heads * self.head_dim)
        if self.style == "gather":
            # The guide's variant: every rank gets all heads and applies the whole projection itself.
            return F.linear(gather_from_parallel_region(y, self.comm), self.c_proj.weight, self.c_proj.bias)
        return self._leave(F.linear(y, self.c_proj.weight), self.c_proj.bias, cache)


class TensorParallelMLP(_TensorParallelRegion):
    """Column-parallel c_fc (d_ff/tp columns), GELU on the local columns, row-parallel c_proj."""

    def __init__(self, cfg: GPTConfig, layer_id: int, comm: GroupComm, seed: int, style: str, sequence_parallel: bool):
        super().__init__()
        r, tp = comm.index, comm.size
        self.comm, self.sequence_parallel = comm, sequence_parallel
        prefix = f"transformer.h.{layer_id}.mlp."
        shard = lambda leaf: build_shard(prefix + leaf, cfg, seed, r, tp, style)  # noqa: E731
        self.c_fc = _Linear(shard("c_fc.weight"), shard("c_fc.bias") if cfg.bias else None)
        self.c_proj = _Linear(shard("c_proj.weight"), shard("c_proj.bias") if cfg.bias else None)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = self._enter(x, cache)
        hidden = F.gelu(F.linear(x, self.c_fc.weight, self.c_fc.bias), approximate="tanh")
        return self._leave(F.linear(hidden, self.c_proj.weight), self.c_proj.bias, cache)


class TensorParallelBlock(nn.Module):
    """One transformer block with heads and MLP columns split over `tp_comm`; parameter names as in Block,
    so a pipeline stage (3D parallelism) can hold it in place of a Block. Input and output are
    [b, s, h] replicated, or [b, s/tp, h] under sequence parallelism without a KV cache."""

    def __init__(
        self,
        config: GPTConfig,
        layer_id: int,
        tp_comm: GroupComm,
        seed: int,
        style: str = "megatron",
        sequence_parallel: bool = False,
    ):
        super().__init__()
        if sequence_parallel and style != "megatron":
            raise ValueError("sequence parallelism needs the 'megatron' style (its outputs are reduce-scattered)")
        self.sequence_parallel = sequence_parallel
        prefix = f"transformer.h.{layer_id}."
        self.ln_1 = _layer_norm(config, prefix + "ln_1.", seed)
        self.attn = TensorParallelAttention(config, layer_id, tp_comm, seed, style, sequence_parallel)
        self.ln_2 = _layer_norm(config, prefix + "ln_2.", seed)
        self.mlp = TensorParallelMLP(config, layer_id, tp_comm, seed, style, sequence_parallel)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x), cache)

    def sequence_parallel_params(self) -> list[nn.Parameter]:
        """Replicated parameters applied to this rank's seq/tp positions only (LayerNorms, row-parallel
        biases): under sequence parallelism their gradients are partial sums to be all-reduced."""
        if not self.sequence_parallel:
            return []
        out = [*self.ln_1.parameters(), *self.ln_2.parameters()]
        return out + [p.bias for p in (self.attn.c_proj, self.mlp.c_proj) if p.bias is not None]


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V_pad/tp) of the token embedding (zero padding rows past the vocabulary).
    Each rank looks up the tokens in its range and writes 0 for the others; the sum over ranks
    (all-reduce, or reduce-scatter over the sequence under sequence parallelism) is the embedding.
    The same weight is the vocab-parallel LM head (see parallel_lm_logits)."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int, name: str = "transformer.wte.weight"):
        super().__init__()
        self.comm = comm
        self.per = padded_vocab(cfg.vocab_size, comm.size) // comm.size
        self.start = comm.index * self.per
        self.valid = max(0, min(cfg.vocab_size - self.start, self.per))  # rows that are real tokens
        self.weight = _param(build_shard(name, cfg, seed, comm.index, comm.size, "megatron"))

    def forward(self, ids: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.per)
        local = (ids - self.start).clamp(0, self.per - 1)
        partial = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if sequence_parallel:
            return reduce_scatter_to_sequence(partial, self.comm)
        return reduce_from_parallel_region(partial, self.comm)


def parallel_lm_logits(x: torch.Tensor, head: VocabParallelEmbedding, sequence_parallel: bool = False) -> torch.Tensor:
    """This rank's slice of the logits, [b, s, V_pad/tp], from hidden states x (replicated, or seq-sharded
    under sequence parallelism). Padding columns are -inf: no token, never predicted, 0 in the softmax."""
    if sequence_parallel:
        x = gather_from_sequence(x, head.comm)
    else:
        x = copy_to_parallel_region(x, head.comm)
    logits = F.linear(x, head.weight)
    if head.valid < logits.shape[-1]:
        pad = torch.arange(logits.shape[-1], device=x.device) >= head.valid
        logits = logits.masked_fill(pad, float("-inf"))
    return logits


def gather_vocab_logits(local: torch.Tensor, comm: GroupComm, vocab_size: int) -> torch.Tensor:
    """The full logits [.., V] on every rank: only where a user asked for them (forward output, sampling)."""
    return comm.all_gather(local.contiguous(), dim=-1)[..., :vocab_size]


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


class TensorParallelGPTModel(nn.Module):
    """The whole GPT with every piece tensor-parallel. Module paths equal the reference GPT's, so
    `named_parameters(remove_duplicate=False)` yields reference names (lm_head tied to wte)."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int, style: str, sequence_parallel: bool):
        super().__init__()
        self.config, self.comm, self.sequence_parallel = cfg, comm, sequence_parallel
        self.transformer = nn.ModuleDict(
            dict(
                wte=VocabParallelEmbedding(cfg, comm, seed),
                wpe=_position_embedding(cfg, seed),
                h=nn.ModuleList(
                    TensorParallelBlock(cfg, i, comm, seed, style, sequence_parallel) for i in range(cfg.n_layer)
                ),
                ln_f=_layer_norm(cfg, "transformer.ln_f.", seed),
            )
        )
        self.lm_head = self.transformer.wte  # tied: the same shard, listed under both reference names

    def _sp(self, cache: KVCache | None) -> bool:
        return self.sequence_parallel and cache is None

    def local_logits(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """This rank's vocabulary slice of the logits: for every position of `ids`, or with a KV cache
        (decoding) for the last position only."""
        sp = self._sp(cache)
        x = embed_tokens(self.transformer.wte, self.transformer.wpe, ids, start, sp)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            x = x[:, -1:, :]  # decoding samples from the last position only: the head skips the others
        return parallel_lm_logits(self.transformer.ln_f(x), self.lm_head, sp)

    def sequence_parallel_params(self) -> list[nn.Parameter]:
        if not self.sequence_parallel:
            return []
        return [p for b in self.transformer.h for p in b.sequence_parallel_params()] + list(
            self.transformer.ln_f.parameters()
        )


def _position_embedding(cfg: GPTConfig, seed: int) -> nn.Embedding:
    """Replicated learned positions (block_size rows: small next to the vocabulary)."""
    wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
    with torch.no_grad():
        wpe.weight.copy_(init_parameter("transformer.wpe.weight", (cfg.block_size, cfg.n_embd), cfg, seed))
    return wpe


def embed_tokens(
    wte: VocabParallelEmbedding, wpe: nn.Embedding, ids: torch.Tensor, start: int = 0, sequence_parallel: bool = False
) -> torch.Tensor:
    """Token + position embedding: [b, s, h] replicated, or this rank's [b, s/tp, h] under sequence parallelism."""
    tok = wte(ids, sequence_parallel=sequence_parallel)
    pos = wpe(torch.arange(start, start + ids.shape[1], device=ids.device)).unsqueeze(0)
    # Positions are replicated: under sequence parallelism each rank adds its own seq/tp of them.
    return tok + (scatter_to_sequence(pos, wte.comm) if sequence_parallel else pos)


# ---- pipeline-stage pieces (3D parallelism, runner/gpt/three_d.py) --------------------------------
# A stage holds the embedding only on the first stage and the head only on the last, so these two are
# modules of their own; module paths embed.*, h.<i>.*, head.* map to reference names by reference_names().

TPBlock = TensorParallelBlock


class TPEmbedding(nn.Module):
    """The first stage's input: vocab-parallel tokens + replicated positions."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int):
        super().__init__()
        self.wte = VocabParallelEmbedding(cfg, comm, seed)
        self.wpe = _position_embedding(cfg, seed)

    def forward(self, ids: torch.Tensor, start: int = 0, sp: bool = False) -> torch.Tensor:
        return embed_tokens(self.wte, self.wpe, ids, start, sp)


class TPHead(nn.Module):
    """The last stage's output: final LayerNorm, vocab-parallel LM head (tied to the embedding when the
    stage also holds it, else its own copy named lm_head.weight) and the vocab-parallel loss."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int, tied: VocabParallelEmbedding | None):
        super().__init__()
        self.cfg, self.comm = cfg, comm
        self.ln_f = _layer_norm(cfg, "transformer.ln_f.", seed)
        self.lm_head = tied if tied is not None else VocabParallelEmbedding(cfg, comm, seed, "lm_head.weight")

    def local_logits(self, x: torch.Tensor, sp: bool = False) -> torch.Tensor:
        return parallel_lm_logits(self.ln_f(x), self.lm_head, sp)

    def full_logits(self, local: torch.Tensor) -> torch.Tensor:
        return gather_vocab_logits(local, self.comm, self.cfg.vocab_size)

    def loss(self, local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(local.flatten(0, 1), targets.flatten(), self.lm_head.start, self.comm)


def reference_names(module_params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Map a stage's module paths (embed.*, h.<i>.*, head.*) to the reference GPT's parameter names."""
    out = {}
    for path, p in module_params.items():
        if path.startswith("embed."):
            out["transformer." + path.removeprefix("embed.")] = p
        elif path.startswith("h."):
            out["transformer." + path] = p
        elif path.startswith("head.ln_f."):
            out["transformer." + path.removeprefix("head.")] = p
        elif path.startswith("head.lm_head."):
            out["lm_head.weight"] = p
    return out


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


class TensorParallelGPT(ParallelGPT):
    """Strategy 'tensor': one TensorParallelGPTModel per rank of the tp group, the three workloads on it."""

    def __init__(self, spec: RunSpec, mesh: Mesh, device: torch.device, dtype: torch.dtype):
        cfg = spec.model_config()
        super().__init__(cfg, mesh, device, dtype)
        self.comm = mesh.tp
        self.style = spec.tp_style
        self.model = TensorParallelGPTModel(cfg, self.comm, spec.seed, self.style, spec.sequence_parallel)
        self.model.to(device=device, dtype=dtype)
        self._shards = dict(self.model.named_parameters(remove_duplicate=False))
        self._sp_params = self.model.sequence_parallel_params()

    def named_shards(self) -> dict[str, nn.Parameter]:
        return self._shards

    def shard_index(self, name: str):
        return shard_index(name, self.config, self.comm.index, self.comm.size, self.style)

    @property
    def is_output_rank(self) -> bool:
        return self.comm.index == 0

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        full = gather_vocab_logits(self.model.local_logits(idx), self.comm, self.config.vocab_size)
        return full if self.is_output_rank else None

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        local = self.model.local_logits(idx)
        loss = vocab_parallel_cross_entropy(local.flatten(0, 1), targets.flatten(), self.model.lm_head.start, self.comm)
        loss.backward()
        all_reduce_sequence_parallel_grads(self._sp_params, self.comm)
        return loss.item() if self.is_output_rank else None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        cache = KVCache.empty(self.config.n_layer)
        tokens, pos, out = idx, 0, [idx]
        for i in range(new_tokens):
            local = self.model.local_logits(tokens, cache, start=pos)
            pos += tokens.shape[1]
            # Greedy sampling needs the whole vocabulary row of the last position: gather [b, 1, V] only.
            nxt = gather_vocab_logits(local, self.comm, self.config.vocab_size)[:, -1, :].argmax(dim=-1, keepdim=True)
            out.append(nxt)
            tokens = nxt
            if i + 1 == new_tokens:
                break
        return torch.cat(out, dim=1) if self.is_output_rank else None
