"""Tensor parallelism applied to a GPT by a plan: module name pattern -> parallel style.

`apply_tensor_parallel(model, comm, tp_style, sequence_parallel)` walks the model (built on the meta
device, before `materialize`), and for every module the plan names swaps in the layer of its style
(runner/gpt/tp_layers.py) whose parameters are slices of the reference ones, each recording the
`Shard` it holds -- so `materialize` fills them with `init_parameter(name)[index]` and verification
reads the same index. Megatron's layout:

    attention   c_attn  column (Q, K and V of this rank's heads)   c_proj  row (or "gather")
    MLP         c_fc    column (d_ff / tp)                          c_proj  row
    wte, lm_head        vocabulary rows (tied when the model holds both)
    wpe                 replicated, scattered over the sequence under sequence parallelism
    LayerNorms          replicated (under sequence parallelism their gradients are summed afterwards)

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
    mark_sequence_parallel,
    sliced,
)
from runner.spec.run_spec import TP_STYLES  # the choices a spec offers; each is one entry of the plan below


def tensor_parallel_plan(tp_style: str = "megatron") -> dict[str, str]:
    """Module name pattern -> style; `tp_style` chooses how attention's output projection leaves."""
    if tp_style not in TP_STYLES:
        raise ValueError(f"tp_style must be one of {TP_STYLES} (got {tp_style!r})")
    return {
        "transformer.wte": "vocab_embedding",
        "transformer.wpe": "sequence_embedding",
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


def _column(m: nn.Linear, state: TPState) -> nn.Module:
    index = _rows(m.weight.shape[0], state)
    bias = None if m.bias is None else sliced(m.bias, index)
    return ColumnParallelLinear(sliced(m.weight, index), bias, state)


def qkv_rows(n_embd: int, rank: int, tp: int) -> torch.Tensor:
    """Rows of the fused c_attn [Q; K; V] that rank `rank` of `tp` holds: the same head range in each block."""
    width = n_embd // tp
    return torch.cat(
        [torch.arange(part * n_embd + rank * width, part * n_embd + (rank + 1) * width) for part in range(3)]
    )


def _column_qkv(m: nn.Linear, state: TPState) -> nn.Module:
    index = qkv_rows(m.weight.shape[0] // 3, state.comm.index, state.comm.size)
    bias = None if m.bias is None else sliced(m.bias, index)
    return ColumnParallelLinear(sliced(m.weight, index), bias, state)


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
    state = TPState(comm, model.config.vocab_size, sequence_parallel)
    plan = tensor_parallel_plan(tp_style)
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
