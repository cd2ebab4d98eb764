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

Every parameter is named as in the reference GPT and built as `init_parameter(name)[shard_index]`.
The pieces (TPEmbedding, TPBlock, TPHead) are modules of their own so that 3D parallelism can put
them into pipeline stages.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from runner.gpt.comm import (
    GroupComm,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
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


class TPAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, prefix: str, comm: GroupComm, seed: int, style: str):
        super().__init__()
        r, tp = comm.index, comm.size
        self.comm, self.style = comm, style
        self.n_local_heads = cfg.n_head // tp
        self.head_dim = cfg.head_dim
        shard = lambda leaf: build_shard(f"{prefix}attn.{leaf}", cfg, seed, r, tp, style)  # noqa: E731
        self.c_attn = _Linear(shard("c_attn.weight"), shard("c_attn.bias") if cfg.bias else None)
        self.c_proj = _Linear(shard("c_proj.weight"), shard("c_proj.bias") if cfg.bias else None)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None, sp: bool) -> torch.Tensor:
        x = gather_from_sp(x, self.comm) if sp else copy_to_tp(x, self.comm)
        b, t, _ = x.shape
        q, k, v = F.linear(x, self.c_attn.weight, self.c_attn.bias).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.n_local_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if cache is not None:
            k, v = cache.append(k, v)
        y = attend(q, k, v).transpose(1, 2).reshape(b, t, self.n_local_heads * self.head_dim)
        if self.style == "gather":
            return F.linear(gather_from_tp(y, self.comm), self.c_proj.weight, self.c_proj.bias)
        partial = F.linear(y, self.c_proj.weight)
        out = reduce_scatter_to_sp(partial, self.comm) if sp else reduce_from_tp(partial, self.comm)
        return out if self.c_proj.bias is None else out + self.c_proj.bias


class TPMLP(nn.Module):
    def __init__(self, cfg: GPTConfig, prefix: str, comm: GroupComm, seed: int, style: str):
        super().__init__()
        r, tp = comm.index, comm.size
        self.comm = comm
        shard = lambda leaf: build_shard(f"{prefix}mlp.{leaf}", cfg, seed, r, tp, style)  # noqa: E731
        self.c_fc = _Linear(shard("c_fc.weight"), shard("c_fc.bias") if cfg.bias else None)
        self.c_proj = _Linear(shard("c_proj.weight"), shard("c_proj.bias") if cfg.bias else None)

    def forward(self, x: torch.Tensor, sp: bool) -> torch.Tensor:
        x = gather_from_sp(x, self.comm) if sp else copy_to_tp(x, self.comm)
        hidden = F.gelu(F.linear(x, self.c_fc.weight, self.c_fc.bias), approximate="tanh")
        partial = F.linear(hidden, self.c_proj.weight)
        out = reduce_scatter_to_sp(partial, self.comm) if sp else reduce_from_tp(partial, self.comm)
        return out if self.c_proj.bias is None else out + self.c_proj.bias


def _layer_norm(cfg: GPTConfig, prefix: str, seed: int) -> nn.LayerNorm:
    ln = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
    with torch.no_grad():
        ln.weight.copy_(init_parameter(f"{prefix}weight", (cfg.n_embd,), cfg, seed))
    return ln


class TPBlock(nn.Module):
    """One transformer block with heads and MLP columns split over `comm`; parameters named as in Block."""

    def __init__(self, cfg: GPTConfig, layer: int, comm: GroupComm, seed: int, style: str):
        super().__init__()
        prefix = f"transformer.h.{layer}."
        self.ln_1 = _layer_norm(cfg, prefix + "ln_1.", seed)
        self.attn = TPAttention(cfg, prefix, comm, seed, style)
        self.ln_2 = _layer_norm(cfg, prefix + "ln_2.", seed)
        self.mlp = TPMLP(cfg, prefix, comm, seed, style)

    def forward(self, x: torch.Tensor, cache: LayerKVCache | None = None, sp: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, sp)
        return x + self.mlp(self.ln_2(x), sp)

    def sequence_parallel_params(self) -> list[nn.Parameter]:
        """Replicated parameters applied to a sequence shard: their gradients are partial sums under SP."""
        out = [*self.ln_1.parameters(), *self.ln_2.parameters()]
        for proj in (self.attn.c_proj, self.mlp.c_proj):
            if proj.bias is not None and not (proj is self.attn.c_proj and self.attn.style == "gather"):
                out.append(proj.bias)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V_pad/tp) of the token embedding; a token outside the range contributes 0."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int, name: str = "transformer.wte.weight"):
        super().__init__()
        self.per = padded_vocab(cfg.vocab_size, comm.size) // comm.size
        self.start = comm.index * self.per
        self.weight = _param(build_shard(name, cfg, seed, comm.index, comm.size, "megatron"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.per)
        local = (ids - self.start).clamp(0, self.per - 1)
        return F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross entropy over logits split by vocabulary: three all-reduces of one number per token
    (max, sum of exponentials, target logit) instead of gathering [tokens, vocab]."""

    @staticmethod
    def forward(ctx, logits, targets, start, comm):
        logits = logits.float()
        per = logits.shape[-1]
        m = logits.max(dim=-1).values
        comm.all_reduce(m, op=dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        comm.all_reduce(sum_exp)
        inside = (targets >= start) & (targets < start + per)
        local_t = (targets - start).clamp(0, per - 1)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1) * inside
        comm.all_reduce(target_logit)
        loss = (sum_exp.log() - target_logit).mean()
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local_t, inside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_t, inside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local_t.unsqueeze(-1), -inside.to(g.dtype).unsqueeze(-1))
        return g * (grad / softmax.shape[0]), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, start: int, comm: GroupComm):
    """logits [N, V_pad/tp] of this rank's vocabulary slice, targets [N] -> mean loss (same on every rank)."""
    return _VocabParallelCrossEntropy.apply(logits, targets, start, comm)


class TPEmbedding(nn.Module):
    """Vocab-parallel token embedding + replicated positions; output replicated, or seq-sharded under SP."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int):
        super().__init__()
        self.comm = comm
        self.wte = VocabParallelEmbedding(cfg, comm, seed)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        with torch.no_grad():
            self.wpe.weight.copy_(init_parameter("transformer.wpe.weight", (cfg.block_size, cfg.n_embd), cfg, seed))

    def forward(self, ids: torch.Tensor, start: int = 0, sp: bool = False) -> torch.Tensor:
        pos = self.wpe(torch.arange(start, start + ids.shape[1], device=ids.device))
        partial = self.wte(ids)
        if sp:
            return reduce_scatter_to_sp(partial, self.comm) + scatter_to_sp(pos.unsqueeze(0), self.comm)
        return reduce_from_tp(partial, self.comm) + pos


class TPHead(nn.Module):
    """Final LayerNorm and the vocab-parallel LM head (tied to the embedding when given it)."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int, tied: VocabParallelEmbedding | None):
        super().__init__()
        self.cfg, self.comm = cfg, comm
        self.ln_f = _layer_norm(cfg, "transformer.ln_f.", seed)
        self.lm_head = tied if tied is not None else VocabParallelEmbedding(cfg, comm, seed, "lm_head.weight")
        self.start = self.lm_head.start
        self.valid = max(0, min(cfg.vocab_size - self.start, self.lm_head.per))

    def local_logits(self, x: torch.Tensor, sp: bool = False) -> torch.Tensor:
        x = self.ln_f(x)
        x = gather_from_sp(x, self.comm) if sp else copy_to_tp(x, self.comm)
        logits = F.linear(x, self.lm_head.weight)
        if self.valid < logits.shape[-1]:  # padded vocabulary rows are no tokens: never predicted
            logits = logits.masked_fill(torch.arange(logits.shape[-1], device=x.device) >= self.valid, float("-inf"))
        return logits

    def full_logits(self, local: torch.Tensor) -> torch.Tensor:
        """Gather [.., V] (only where a user asked for logits)."""
        return self.comm.all_gather(local.contiguous(), dim=-1)[..., : self.cfg.vocab_size]

    def loss(self, local: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(local.flatten(0, 1), targets.flatten(), self.start, self.comm)


class TPModel(nn.Module):
    """The whole GPT with every layer tensor-parallel; module names match the reference's."""

    def __init__(self, cfg: GPTConfig, comm: GroupComm, seed: int, style: str):
        super().__init__()
        embed = TPEmbedding(cfg, comm, seed)
        self.embed = embed
        self.h = nn.ModuleList(TPBlock(cfg, i, comm, seed, style) for i in range(cfg.n_layer))
        self.head = TPHead(cfg, comm, seed, tied=embed.wte)

    def hidden(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0, sp: bool = False):
        x = self.embed(ids, start, sp)
        for i, block in enumerate(self.h):
            x = block(x, None if cache is None else cache.layers[i], sp)
        return x


def reference_names(module_names: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Map TPModel's module paths to the reference GPT's parameter names."""
    out = {}
    for path, p in module_names.items():
        if path.startswith("embed.wte."):
            out["transformer.wte.weight"] = p
        elif path.startswith("embed.wpe."):
            out["transformer.wpe.weight"] = p
        elif path.startswith("h."):
            out["transformer." + path] = p
        elif path.startswith("head.ln_f."):
            out["transformer." + path.removeprefix("head.")] = p
        elif path.startswith("head.lm_head."):
            out["lm_head.weight"] = p
    return out


class TensorParallelGPT(ParallelGPT):
    def __init__(self, spec: RunSpec, mesh: Mesh, device: torch.device, dtype: torch.dtype):
        cfg = spec.model_config()
        super().__init__(cfg, mesh, device, dtype)
        self.comm = mesh.tp
        self.style = spec.tp_style
        self.sp = spec.sequence_parallel
        self.model = TPModel(cfg, self.comm, spec.seed, self.style).to(device=device, dtype=dtype)
        self._shards = reference_names(dict(self.model.named_parameters(remove_duplicate=False)))
        self._sp_params = [p for b in self.model.h for p in b.sequence_parallel_params()]
        self._sp_params += list(self.model.head.ln_f.parameters())

    def named_shards(self) -> dict[str, nn.Parameter]:
        return self._shards

    def shard_index(self, name: str):
        return shard_index(name, self.config, self.comm.index, self.comm.size, self.style)

    @property
    def is_output_rank(self) -> bool:
        return self.comm.index == 0

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        local = self.model.head.local_logits(self.model.hidden(idx, sp=self.sp), sp=self.sp)
        full = self.model.head.full_logits(local)
        return full if self.is_output_rank else None

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        local = self.model.head.local_logits(self.model.hidden(idx, sp=self.sp), sp=self.sp)
        loss = self.model.head.loss(local, targets)
        loss.backward()
        if self.sp:
            self._sync_sequence_parallel_grads()
        return loss.item() if self.is_output_rank else None

    @torch.no_grad()
    def _sync_sequence_parallel_grads(self) -> None:
        """Under SP, LayerNorms and row-parallel biases saw seq/tp positions each: sum their gradients."""
        grads = [p.grad for p in self._sp_params if p.grad is not None]
        if not grads:
            return
        flat = self.comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        # Decoding adds one position at a time: there is no sequence to split, so no SP here.
        cache = KVCache.empty(self.config.n_layer)
        tokens, pos, out = idx, 0, [idx]
        for i in range(new_tokens):
            x = self.model.hidden(tokens, cache, start=pos)
            pos += tokens.shape[1]
            last = self.model.head.local_logits(x[:, -1:, :])
            nxt = self.model.head.full_logits(last)[:, -1, :].argmax(dim=-1, keepdim=True)
            out.append(nxt)
            tokens = nxt
            if i + 1 == new_tokens:
                break
        return torch.cat(out, dim=1) if self.is_output_rank else None
