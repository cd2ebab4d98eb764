"""The self-test's layouts: every registered strategy x workload the devices allow, and the
communication each should need (torch-free; `runner/selftest.py` submits, waits and reports).

Layouts are the smallest that exercise each strategy: two ranks per degree it uses, 3D as 2x2x2 when
eight ranks fit (always on CPU, where ranks are processes; on GPUs only with eight of them) and 2x2x1
with four GPUs. A layout that needs more GPUs than present is listed as skipped, with the reason.

Communication theory (`comm_theory_bytes`) is the leading order of the textbook picture, summed over
ranks, one step, payload bytes with the project's one convention (docs/run-folder.md); what it leaves out
is small at this size and is shown as the measured remainder, not hidden:
- tensor (Megatron): 2 all-reduces of [tokens, h] per layer forward and 2 more backward (Shoeybi et
  al., 2019), plus the vocabulary-parallel embedding's all-reduce forward and the LM head input's backward,
  on each of the tp ranks; a forward workload all-gathers the logits [tokens, V] to every tp rank of the
  last stage (the loss's per-token all-reduces and generate's next-token logits left out). Grouped-query
  attention changes none of these; with fewer key/value heads than tp ranks, training adds each rank's
  all-reduce of its key/value head's K and V gradient rows [2 head_dim, h] per layer over its kv group;
- layer / pipeline: one activation of [tokens, h] across each of the p - 1 stage boundaries forward, and
  its gradient backward; in training the first and last stage all-reduce a tied embedding's gradient
  [V, h] (its vocabulary slice under tensor parallelism) in every (tp, dp) column -- an untied head needs
  none (generated tokens left out);
- data: every rank all-reduces the gradient of every parameter once per training step (the loss
  all-reduce left out); with ZeRO, ZERO_PASSES of the model's bytes;
- 3d: the three combined over the mesh.
"""

from __future__ import annotations

import math
from dataclasses import replace

from runner.gpt.config import count_parameters, kv_copies, parameter_shapes
from runner.spec.run_spec import RunSpec
from runner.spec.strategies import get_strategy, strategy_names

# A tiny run takes seconds; a hang (a deadlocked exchange) must fail its row, not stall the self-test.
BASE = RunSpec(model="tiny", batch=8, seq=32, new_tokens=4, steps=2, warmup=1, verify=True, time_limit_s=120.0,
               tags=("selftest",))  # fmt: skip
WORKLOADS = ("forward", "generate", "train")
# Passes of the model's bytes per data-parallel rank and step, in the payload convention (an all-reduce's payload
# is its tensor, a reduce-scatter's its full input, an all-gather's its full output; Rajbhandari et al. 2020,
# section 7): plain all-reduce 1; ZeRO-1 all-reduce + all-gather 2; ZeRO-2 reduce-scatter + all-gather 2.
# ZeRO-3 (zero3_bytes) gathers every block before its forward and again before its backward -- per microbatch
# inside a pipeline -- and keeps the embeddings and final LayerNorm gathered for the whole step (FSDP's root
# unit), then reduce-scatters every gradient once.
ZERO_PASSES = {0: 1, 1: 2, 2: 2}


# What the self-test adds to the smallest layout (2 for every degree a strategy uses): microbatches where a
# strategy takes them (3D's eight ranks keep 2, so its CPU run stays short), and the schedules tested beside
# the default one (in training only; 3D runs the same pipeline engine, so gpipe is tested once).
MICROBATCHES = {"3d": 2}
DEFAULT_MICROBATCHES = 4
MORE_SCHEDULES = {"pipeline": ("gpipe",)}
# Issue 14's options, each on the smallest layout that exercises it, in training (what they change): ZeRO stages
# alone and as 3D's data dimension, the interleaved and zero-bubble schedules, activation checkpointing, and
# bf16-mixed precision (verified against its own documented bound, runner/job/verify.py).
OPTION_VARIANTS: dict[str, list[dict]] = {
    "pipeline": [{"schedule": "interleaved-1f1b", "virtual_stages": 2}, {"schedule": "zb-h1"},
                 {"checkpoint": "blocks"}, {"dtype": "bf16-mixed"}],
    "data": [{"zero_stage": 1}, {"zero_stage": 2}, {"zero_stage": 3}],
    "3d": [{"zero_stage": 3}],
    "single": [{"checkpoint": "every-2"}],
}  # fmt: skip
SHORT = {"schedule": "", "dtype": "", "virtual_stages": "v", "zero_stage": "zero", "checkpoint": "checkpoint"}
# The Llama family (RMSNorm, rotary, SwiGLU, 2 key/value heads for 4 query heads, untied head) on every strategy's
# smallest layout, all three workloads: tp 2 splits its key/value heads; the extra tensor layout at tp 4 copies
# each to two ranks (RunSpec figures 'tp_kv_heads' say which).
LLAMA = "llama-tiny"
LLAMA_REPLICATED_TP = 4


def layouts(gpus: int, device: str, options: bool = True,
            strategies: tuple[str, ...] = ()) -> list[tuple[RunSpec, str, str | None]]:  # fmt: skip
    """(spec without workload, label, why it cannot run here or None) per registered strategy (those named in
    `strategies` only, when given), and per extra schedule. A layout over several degrees that does not fit drops
    data parallelism first (3D as 2x2x1 on four GPUs)."""
    budget = gpus if device == "cuda" else 8  # CPU ranks are processes: the 3D layout of 8 always fits
    rows = []
    for name in strategies or strategy_names():
        strategy = get_strategy(name)
        fields: dict = {d: max(2, strategy.min_degree.get(d, 2)) for d in strategy.degrees}
        piped = strategy.uses("microbatches") and "pp" in strategy.degrees  # (elsewhere: gradient accumulation)
        if piped:
            fields["microbatches"] = MICROBATCHES.get(name, DEFAULT_MICROBATCHES)
        spec = replace(BASE, strategy=name, **fields)
        if spec.world_size > budget and len(strategy.degrees) > 1 and "dp" in fields:
            spec = replace(spec, dp=1)
        label = " ".join([name, *(f"{d}={getattr(spec, d)}" for d in strategy.degrees)])
        label += f" m={spec.microbatches}" if piped else ""
        variants = [(spec, label)]
        if name in MORE_SCHEDULES:
            variants = [(replace(spec, schedule=x), f"{label} {x}") for x in (spec.schedule, *MORE_SCHEDULES[name])]
        if options:
            variants.append((replace(spec, model=LLAMA), f"{label} {LLAMA}"))
            if "tp" in strategy.degrees and len(strategy.degrees) == 1:
                wide = replace(spec, model=LLAMA, tp=LLAMA_REPLICATED_TP)
                variants.append((wide, f"{name} tp={wide.tp} {LLAMA} (key/value heads replicated)"))
        for changes in OPTION_VARIANTS.get(name, []) if options else []:
            if "zero_stage" in changes and spec.dp < 2:
                continue  # 3D without its data dimension here (too few GPUs): nothing to shard over
            words = [f"{SHORT[k]}={v}" if SHORT[k] else str(v) for k, v in changes.items()]
            variants.append((replace(spec, **changes), " ".join([label, *words])))
        for variant, text in variants:
            too_many = variant.world_size > budget
            rows.append((variant, text, f"needs {variant.world_size} GPUs, {gpus} present" if too_many else None))
    return rows


def selftest_specs(device: str, gpus: int, options: bool = True, data: str = BASE.data,
                   strategies: tuple[str, ...] = ()) -> list[tuple[RunSpec | None, str]]:  # fmt: skip
    """Every (spec, label) of the self-test on `device` ('cpu' or 'cuda') and `data` (runner/job/corpus.py:
    synthetic, or stdlib for real text), of the strategies named in `strategies` (empty: all); spec None where
    skipped.
    A schedule other than the default (gpipe beside 1f1b) differs only in training, so it is tested there
    alone. CPU layouts do not depend on the core count: an oversubscribed run says so in its result."""
    rows: list[tuple[RunSpec | None, str]] = []
    for spec, label, reason in layouts(gpus, device, options, strategies):
        for workload in WORKLOADS:
            if workload != "train" and (spec.schedule != BASE.schedule or _is_option_variant(spec)):
                continue
            if reason is not None:
                rows.append((None, f"{label} {workload} skipped ({reason})"))
            else:
                rows.append((replace(spec, workload=workload, device=device, data=data), f"{label} {workload}"))
    return rows


def _is_option_variant(spec: RunSpec) -> bool:
    """Whether `spec` is one of OPTION_VARIANTS (tested in training only)."""
    return (spec.zero_stage, spec.checkpoint, spec.dtype, spec.virtual_stages) != (0, "none", BASE.dtype, 1)


def comm_theory_bytes(spec: RunSpec) -> int:
    """Leading-order communication payload of one step, summed over ranks (see the module docstring)."""
    cfg = spec.model_config()
    elem = 2 if spec.dtype in ("bfloat16", "bf16-master") else 4
    tp, pp, dp = spec.degrees
    tokens = spec.batch * (spec.seq + spec.new_tokens - 1 if spec.workload == "generate" else spec.seq)
    activation = tokens * cfg.n_embd * elem  # one [tokens, h] tensor over the global batch
    directions = 2 if spec.workload == "train" else 1
    total = 0
    vocab = -(-cfg.vocab_size // tp) * tp  # padded to a multiple of tp
    if tp > 1:  # every tp rank all-reduces each layer's two partial sums; pp stages and dp replicas split the work
        total += directions * (2 * cfg.n_layer + 1) * activation * tp
        if spec.dtype == "bf16-mixed":  # the layers' forward partial sums come out of bf16 matmuls: half the bytes
            total -= cfg.n_layer * activation * tp
        if spec.workload == "forward":
            total += tp * spec.batch * spec.seq * vocab * elem
        if spec.workload == "train" and kv_copies(cfg, tp) > 1:  # each rank's copied K and V rows, every layer
            rows = 2 * cfg.head_dim
            total += tp * dp * cfg.n_layer * rows * (cfg.n_embd + (1 if cfg.bias or cfg.qkv_bias else 0)) * elem
    if pp > 1:  # every tp rank of a boundary sends its (replicated) activation; v chunks a rank: pp*v - 1 boundaries
        total += directions * (pp * spec.virtual_stages - 1) * activation * tp
        if spec.workload == "train" and cfg.tie_head:  # two ranks per (tp, dp) column, each with a V/tp slice
            total += 2 * dp * vocab * cfg.n_embd * elem
    if dp > 1 and spec.workload == "train" and spec.zero_stage == 3:
        shapes = parameter_shapes(cfg)  # outside the blocks: embeddings, final norm, an untied head
        outer = sum(math.prod(s) for name, s in shapes.items() if not name.startswith("transformer.h."))
        blocks = count_parameters(cfg) - outer
        gathers = spec.microbatches  # each block runs once per microbatch (a pipeline's, or accumulated)
        total += dp * elem * (2 * gathers * blocks + outer + count_parameters(cfg))
    elif dp > 1 and spec.workload == "train":  # ZeRO-1 and 2 add an all-gather of the updated weights
        total += dp * count_parameters(cfg) * elem * ZERO_PASSES[spec.zero_stage]
    return total
