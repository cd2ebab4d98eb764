"""Tensor parallelism applied to a GPT by a plan: module name pattern -> parallel style.

`apply_tensor_parallel(model, comm, tp_style, sequence_parallel)` walks the model (built on the meta
device, before `materialize`), and for every module the plan names swaps in the layer of its style
(runner/gpt/tp_layers.py) whose parameters are slices of the reference ones, each recording the
`Shard` it holds -- so `materialize` fills them with `init_parameter(name)[index]` and verification
reads the same index. Megatron's layout:

    attention   c_attn  column (Q, K and V of this rank's heads)   c_proj  row (or "gather")
    MLP         c_fc    column (d_ff / tp; SwiGLU: gate and up)     c_proj  row
    wte, lm_head        vocabulary rows (one slice under both names when tied, two when not)
    wpe                 replicated, scattered over the sequence under sequence parallelism (GPT-2 only)
    norms               replicated (under sequence parallelism their gradients are summed afterwards)

Fused parameters are split part by part: a rank holds rows [r/tp, (r+1)/tp) of Q and of K and of V (of
SwiGLU's gate and of its up projection), so its c_attn computes whole heads. Grouped-query attention
(n_kv_head < n_head): when tp divides n_kv_head every rank holds n_kv_head / tp key/value heads of its
own ('split'); when n_kv_head divides tp each key/value head is held by the tp / n_kv_head consecutive
ranks whose query heads use it ('replicated'), whose K and V rows then get only their own query heads'
share of the gradient: the engine sums those rows over that kv group after backward
(tp_layers.all_reduce_kv_grads; runner/gpt/mesh.py builds the groups). The run's figures say which.

Every parameter of the GPT is named by the plan; `apply_tensor_parallel` refuses a plan entry that
matches nothing (a misspelled name would leave a layer whole).
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

import torch
import torch.nn as nn

from runner.gpt.comm import GroupComm
from runner.gpt.tp_layers import (
    ColumnParallelLinear,
    GatheredInputLinear,
    RowParallelLinear,
    SequenceShardedEmbedding,
    TPState,
    VocabParallelEmbedding,
    VocabParallelHead,
    mark_kv_replicated,
    mark_sequence_parallel,
    sliced,
)
from runner.spec.run_spec import TP_STYLES  # the choices a spec offers; each is one entry of the plan below


def tensor_parallel_plan(tp_style: str = "megatron", learned_positions: bool = True) -> dict[str, str]:
    """Module name pattern -> style; `tp_style` chooses how attention's output projection leaves; a model with
    rotary positions has no position embedding to name."""
    if tp_style not in TP_STYLES:
        raise ValueError(f"tp_style must be one of {TP_STYLES} (got {tp_style!r})")
    positions = {"transformer.wpe": "sequence_embedding"} if learned_positions else {}
    return {
        "transformer.wte": "vocab_embedding",
        **positions,
        "transformer.h.*.ln_1": "replicated",
        "transformer.h.*.attn.c_attn": "column_qkv",
        "transformer.h.*.attn.c_proj": "row" if tp_style == "megatron" else "gather",
        "transformer.h.*.ln_2": "replicated",
        "transformer.h.*.mlp.c_fc": "column",
        "transformer.h.*.mlp.c_proj": "row",
        "transformer.ln_f": "replicated",
        "lm_head": "vocab_head",
    }


def _rows(n: int, state: TPState) -> tuple[slice]:
    width = n // state.comm.size
    return (slice(state.comm.index * width, (state.comm.index + 1) * width),)


def _part_rows(offset: int, width: int, index: int, ways: int) -> torch.Tensor:
    """Rows of block [offset, offset + width) that piece `index` of `ways` equal pieces holds."""
    per = width // ways
    return torch.arange(offset + index * per, offset + (index + 1) * per)


def _column(m: nn.Linear, state: TPState) -> nn.Module:
    parts = getattr(m, "parts", None) or (m.weight.shape[0],)
    if len(parts) == 1:
        index = _rows(m.weight.shape[0], state)
    else:  # stacked blocks (SwiGLU's gate and up): the same slice of each
        offsets = [sum(parts[:i]) for i in range(len(parts))]
        index = torch.cat(
            [_part_rows(o, n, state.comm.index, state.comm.size) for o, n in zip(offsets, parts, strict=True)]
        )
    bias = None if m.bias is None else sliced(m.bias, index)
    return ColumnParallelLinear(sliced(m.weight, index), bias, state)


def kv_split(kv_heads: int, tp: int) -> bool:
    """Whether tp ranks split the key/value heads (tp divides them) rather than copy each (they divide tp)."""
    return kv_heads % tp == 0


def qkv_rows(n_embd: int, kv_width: int, kv_heads: int, rank: int, tp: int) -> torch.Tensor:
    """Rows of the fused c_attn [Q; K; V] that rank `rank` of `tp` holds: its query heads, and the key/value
    heads they use -- its own share of them (split), or the one they share with tp / kv_heads ranks."""
    q = _part_rows(0, n_embd, rank, tp)
    index, ways = (rank, tp) if kv_split(kv_heads, tp) else (rank * kv_heads // tp, kv_heads)
    k = _part_rows(n_embd, kv_width, index, ways)
    v = _part_rows(n_embd + kv_width, kv_width, index, ways)
    return torch.cat([q, k, v])


def _column_qkv(m: nn.Linear, state: TPState) -> nn.Module:
    n_embd, kv_width, _ = m.parts
    tp = state.comm.size
    index = qkv_rows(n_embd, kv_width, state.kv_heads, state.comm.index, tp)
    bias = None if m.bias is None else sliced(m.bias, index)
    layer = ColumnParallelLinear(sliced(m.weight, index), bias, state)
    local_kv = kv_width // tp if kv_split(state.kv_heads, tp) else kv_width // state.kv_heads
    layer.parts = (n_embd // tp, local_kv, local_kv)
    if not kv_split(state.kv_heads, tp):  # K and V rows: this rank's query heads' share of their gradient
        mark_kv_replicated(layer.weight, layer.bias, first_row=n_embd // tp)
    return layer


def _row(m: nn.Linear, state: TPState) -> nn.Module:
    (cols,) = _rows(m.weight.shape[1], state)
    if state.sequence_parallel:
        mark_sequence_parallel(m.bias)
    return RowParallelLinear(sliced(m.weight, (slice(None), cols)), m.bias, state)


def _gather(m: nn.Linear, state: TPState) -> nn.Module:
    if state.sequence_parallel:
        raise ValueError("sequence parallelism needs the 'megatron' style (its outputs are reduce-scattered)")
    return GatheredInputLinear(m.weight, m.bias, state)


def _vocab_rows(weight: nn.Parameter, state: TPState) -> nn.Parameter:
    """Rows [start, start + V_pad/tp) of the vocabulary; those past the vocabulary are zero padding."""
    start, per = state.vocab_start, state.vocab_per_rank
    index = (slice(start, max(start, min(start + per, weight.shape[0]))),)
    return sliced(weight, index, (per, weight.shape[1]))


def _vocab_embedding(m: nn.Embedding, state: TPState) -> nn.Module:
    return VocabParallelEmbedding(_vocab_rows(m.weight, state), state)


def _vocab_head(m: nn.Linear, state: TPState) -> nn.Module:
    return VocabParallelHead(_vocab_rows(m.weight, state), state)


def _sequence_embedding(m: nn.Embedding, state: TPState) -> nn.Module:
    return SequenceShardedEmbedding(m.weight, state)


def _replicated(m: nn.Module, state: TPState) -> nn.Module:
    """Unchanged; used on seq/tp positions under sequence parallelism."""
    if state.sequence_parallel:
        mark_sequence_parallel(*m.parameters())
    return m


STYLES: dict[str, Callable[[nn.Module, TPState], nn.Module]] = {
    "column": _column,
    "column_qkv": _column_qkv,
    "row": _row,
    "gather": _gather,
    "vocab_embedding": _vocab_embedding,
    "vocab_head": _vocab_head,
    "sequence_embedding": _sequence_embedding,
    "replicated": _replicated,
}


def plan_pattern(plan: dict[str, str], name: str) -> str | None:
    """The first pattern of the plan that names module `name`; None if none does."""
    return next((pattern for pattern in plan if fnmatchcase(name, pattern)), None)


def apply_tensor_parallel(
    model: nn.Module, comm: GroupComm, tp_style: str = "megatron", sequence_parallel: bool = False
) -> TPState:
    """Swap the plan's modules of `model` (before `materialize`) for tensor-parallel ones over `comm`;
    returns the state they share (the loss and full-logits functions, the sequence-parallel switch)."""
    cfg = model.config
    if cfg.kv_heads % comm.size and comm.size % cfg.kv_heads:
        raise ValueError(f"{cfg.kv_heads} key/value heads neither split over nor divide tp {comm.size}")
    state = TPState(comm, cfg.vocab_size, sequence_parallel, kv_heads=cfg.kv_heads)
    plan = tensor_parallel_plan(tp_style, cfg.learned_positions)
    wte, head = model.transformer.wte, model.lm_head
    tied = wte is not None and head is not None and head.weight is wte.weight
    used: set[str] = set()
    for name, module in list(model.named_modules()):
        pattern = plan_pattern(plan, name)
        if pattern is None:
            continue
        used.add(pattern)
        new = STYLES[plan[pattern]](module, state)
        if new is not module:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
    if missing := [p for p in plan if p not in used]:
        raise ValueError(f"the tensor-parallel plan names modules the model lacks: {missing}")
    if tied:  # one slice under both names, as in the reference
        model.lm_head.weight = model.transformer.wte.weight
    return state
