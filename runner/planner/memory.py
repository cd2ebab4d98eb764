"""Bytes per device of a tp x pp x dp (x ZeRO) layout: the lab's one memory model (torch-free).

Owns the exact per-rank parameter count of our GPT split by a layout (`rank_parameters`) and
`rank_memory` / `layout_memory`: parameters, gradients, AdamW state, activations of the microbatches in
flight, KV cache; and a RunSpec's figures (`spec_*`), which runner/estimates.py (the Launch page's estimate
and the CPU memory check) calls. Its inputs -- presets, `Layout`, `Workload` -- are runner/planner/models.py.

Parameters, exactly as our model holds them (runner/gpt/model.py, tp_plan.py, pipeline.py). A GPT-2
block of width h with biases has 12h^2 + 13h parameters: c_attn 3h^2 + 3h, attention c_proj h^2 + h,
c_fc 4h^2 + 4h, MLP c_proj 4h^2 + h, two LayerNorms 2h each. Megatron tensor parallelism over t splits
the column layers (c_attn, c_fc: weights and biases) and the row layers' weights; the row layers' biases
and the LayerNorms stay whole: 12h^2/t + 7h/t + 6h per rank (the "gather" style keeps attention's c_proj
whole: 11h^2/t + 7h/t + h^2 + 6h). The token embedding has V_pad/t rows of h, V_pad = V rounded up to a
multiple of t (tp_layers.padded_vocab); the learned positions (block_size x h) and the final LayerNorm are
whole. The LM head is tied to the token embedding: counted once where one rank holds both (pp = 1), and
held again by the last pipeline stage otherwise (cut_stage keeps it as that stage's lm_head.weight).
GPT-2 124M: 50257*768 + 1024*768 + 12*(12*768^2 + 13*768) + 2*768 = 124,439,808.

What a rank keeps between steps (workload train), w = 4 bytes for float32 and bf16-mixed (float32 master
weights, runner/gpt/precision.py), 2 for pure bfloat16:
- parameters Psi*w, gradients Psi*w (a gradient has its parameter's dtype), AdamW's two moments 2*Psi*w
  (created like the parameter) plus one 4-byte float32 step counter per optimized tensor;
- ZeRO (Rajbhandari et al., SC 2020) over the dp replicas, as runner/gpt/zero.py lays it out: one unit per
  block and one "outer" unit (embeddings, final LayerNorm, head), each padded to dp*S_u with
  S_u = ceil(Psi_u/dp). Stage 1 shards the optimizer state (2*w*sum S_u, one step counter a unit),
  stage 2 also the gradients (w*sum S_u at rest), stage 3 also the parameters (w*sum S_u at rest, plus
  the gathered outer unit and two gathered blocks -- the one running and the prefetched one -- during a
  step). The paper's mixed-precision figures are (2 + 2 + K)Psi, (2 + 2)Psi + K*Psi/Nd,
  2Psi + (2 + K)Psi/Nd and (2 + 2 + K)Psi/Nd with K = 12; ours differ in where the 16 bytes a parameter
  sit (float32 parameters and gradients, 8 bytes of moments: the master copy is the parameter itself),
  so stage 1 here saves 8 bytes a parameter, not 12, and `zero_paper_bytes` gives the paper's for
  comparison.
- bf16-mixed: autocast casts each float32 weight to bfloat16 once per forward (2 bytes a matmul
  weight; an embedding lookup is no matmul, so the token embedding is cast only where the tied head
  multiplies by it), and autograd keeps that copy for the backward: one copy per microbatch in flight unless the
  block is checkpointed. Checkpointed or not, autocast's cast cache holds every copy made during a forward
  until GPT.forward leaves the autocast region, so a stage's whole bf16 copy exists during its forward --
  under ZeRO-3 as well (the cache keeps casts of blocks whose shards were released), which is why FSDP
  casts parameters itself (MixedPrecisionPolicy) instead of autocast.

Activations (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022,
section 4, Table 2), bytes per transformer layer for a microbatch of b sequences of s tokens, width h,
a heads, 16-bit activations (doubled for float32):
    no parallelism                       s*b*h*(34 + 5*a*s/h)
    tensor parallel t                    s*b*h*(10 + 24/t + 5*a*s/(h*t))
    tensor + sequence parallel           s*b*h*(34 + 5*a*s/h)/t
    full recompute (checkpointed block)  2*s*b*h (its input; /t under sequence parallelism)
The 5as/h term is the attention scores, their softmax and its dropout mask. Our model attends with
scaled_dot_product_attention (a fused kernel, FlashAttention's way), keeps no s x s matrix and has no dropout,
so by default (`Workload.attention = "sdpa"`) the planner counts what our block saves, value by value
(`lab_layer_activation_bytes`): the two LayerNorm inputs at the residual stream's width w_r, the c_attn and
c_fc inputs at the compute width w_c (whole under tensor parallelism), and split over t: q, k, v, the attention
output, c_proj's input, GELU's input and output, 13 values -- s*b*h*(2w_r + 2w_c + 13w_c/t), all over t under
sequence parallelism. At 16 bits and t = 1 that is Korthikanti's 34 without the scores; float32 68,
bf16-mixed (float32 residual, bf16 matmul inputs) 38. "naive" keeps the paper's formula. Real runs' saved
bytes land within 10% (tests/test_planner_measured.py). A checkpointed layer keeps its input at w_r.
A checkpointed stage also needs one block's full activations while that block is recomputed.
Microbatches in flight on pipeline rank r of p, m microbatches (runner/gpt/schedules.py):
- GPipe: m;
- 1F1B: min(p - r, m);
- ZB-H1: min(p, m) on every rank (Qi et al. 2023: 1F1B's peak of p; our schedule runs rank r's W passes r
  microbatches behind its B passes and a microbatch's activations live until its W);
- interleaved 1F1B: min(2(p - r - 1) + (v - 1)p + 1, v*m) chunk-microbatches of L/(p*v) layers each
  (Megatron's warm-up count + the one in its steady state; Korthikanti eq. 5: L(1 + (p-1)/(p*v)) layers' worth
  on rank 0).
The last virtual stage also keeps, per microbatch, the final LayerNorm's input (residual width), the head's
input (compute width) and cross entropy's float32 log-softmax (b*s*V_pad/t); the log-softmax's gradient, of
the same size, exists while that backward runs. Int64 token ids and targets and the LayerNorms' statistics
(O(b*s), not O(b*s*h)) are left out. An interleaved rank's chunks differ (only one holds the head), so its peak
is not a count of chunk-microbatches times an average chunk: `held_chunk_counts` replays the rank's schedule
(runner/schedule_ops.py, the lists the engine runs) and the peak is the heaviest of the chunk counts it held.
Transient bytes (during a step only; `RankMemory.transient_bytes`): ZeRO-3's gathered units, a checkpointed
block's recompute, the log-softmax's gradient (and under bf16-mixed the head's bfloat16 logits beside their
float32 copy), and, when a rank accumulates over microbatches, its largest tensor's gradient a second time
(autograd computes each microbatch's gradient into a fresh tensor before adding it to .grad).
AdamW's step (`optimizer_step_bytes`) runs after the backward has freed the activations, so the peak is the
states plus the larger of the two: torch's foreach AdamW (its default on GPUs) makes one temporary the size of
everything it steps (the square roots of the second moments; the rank's shards under ZeRO), its for-loop AdamW
(the default on CPUs) two of the largest tensor's size (that square root and the quotient).
What is not modelled: the backward's own gradients of activations, allocator rounding and fragmentation, and on
a CPU the process's resident overhead. The total is therefore compared with a run's measured peak on Compare
and in the README, not held to a bound in the tests; states and saved activations are.
Generate keeps a KV cache of 2 * layers * b * (s + new_tokens) * h/t values (float32, else bf16).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from runner.gpt.config import GPTConfig
from runner.planner.models import (  # the inputs: presets, Layout, Workload (runner/planner/models.py)
    ADAM_STEP_BYTES,
    LOGIT_BYTES,
    Layout,
    Workload,
    padded_vocab,
)
from runner.schedule_ops import schedule_ops, splits_backward


# ---- parameters ---------------------------------------------------------------------------------------
def block_parameters(cfg: GPTConfig, tp: int = 1, tp_style: str = "megatron") -> int:
    """Parameters of one transformer block on one tensor-parallel rank (see the module docstring)."""
    h, b = cfg.n_embd, 1 if cfg.bias else 0
    f = cfg.d_ff
    layer_norms = 2 * (h + h * b)  # replicated
    c_attn = (3 * h * h + 3 * h * b) // tp  # column: Q, K, V of this rank's heads
    c_fc = (h * f + f * b) // tp  # column
    mlp_proj = f * h // tp + h * b  # row: weight split by input columns, bias whole
    attn_proj = h * h // tp + h * b if tp_style == "megatron" else h * h + h * b  # "gather": whole
    return layer_norms + c_attn + c_fc + mlp_proj + attn_proj


def block_tensors(cfg: GPTConfig) -> int:
    """Parameter tensors of one block (AdamW keeps one step counter per tensor): 6 weights + 6 biases."""
    return 12 if cfg.bias else 6


@dataclass(frozen=True)
class StageParameters:
    """What pipeline rank `stage` holds on one tensor-parallel rank: its blocks and its outer parameters."""

    stage: int
    layers: tuple[int, ...]  # global layer ids of the rank's blocks (all its chunks)
    block: int  # parameters of each block
    outer: int  # embeddings, final LayerNorm, head (tied weight once)
    outer_tensors: int
    matmul: int  # parameters that multiply activations (autocast casts them): no positions, no LayerNorms
    block_matmul: int = 0  # of them, one block's

    @property
    def total(self) -> int:
        return self.block * len(self.layers) + self.outer


def stage_layers(n_layer: int, pp: int, v: int, stage: int) -> tuple[int, ...]:
    """Global layer ids of pipeline rank `stage`: chunk c is virtual stage c*pp + stage of pp*v equal ones
    (runner/gpt/pipeline.py cut_chunks)."""
    per = n_layer // (pp * v)
    return tuple(i for c in range(v) for i in range((c * pp + stage) * per, (c * pp + stage + 1) * per))


def rank_parameters(
    cfg: GPTConfig, layout: Layout, stage: int, v: int = 1, tp_style: str = "megatron"
) -> StageParameters:
    """Parameters of one rank of pipeline stage `stage` (before ZeRO), exactly as the model holds them."""
    h, b = cfg.n_embd, 1 if cfg.bias else 0
    tp, pp = layout.tp, layout.pp
    vocab_rows = padded_vocab(cfg.vocab_size, tp) // tp
    has_embed = stage == 0
    has_head = stage == pp - 1
    outer, tensors, matmul = 0, 0, 0
    if has_embed:
        outer += vocab_rows * h + cfg.block_size * h
        tensors += 2
    if has_head:
        outer += h + h * b  # final LayerNorm
        tensors += 2 if b else 1
        if not has_embed:  # the tied weight again, as this stage's own lm_head.weight
            outer += vocab_rows * h
            tensors += 1
        matmul += vocab_rows * h  # the head multiplies; an embedding lookup is no matmul (autocast leaves it)
    layers = stage_layers(cfg.n_layer, pp, v, stage)
    blk = block_parameters(cfg, tp, tp_style)
    blk_matmul = blk - 2 * (h + h * b)
    return StageParameters(stage, layers, blk, outer, tensors, matmul + blk_matmul * len(layers), blk_matmul)


def largest_tensor(cfg: GPTConfig, layout: Layout, stage: int, tp_style: str = "megatron") -> int:
    """Elements of the largest parameter tensor pipeline rank `stage` holds: its vocabulary rows (first and last
    stage) or a block's largest matmul weight (c_fc or c_proj of the MLP, c_attn, or the whole attention c_proj
    under the "gather" style), split by tp."""
    h, tp = cfg.n_embd, layout.tp
    sizes = [cfg.d_ff * h // tp, 3 * h * h // tp, h * h if tp_style != "megatron" else h * h // tp]
    if stage in (0, layout.pp - 1):
        sizes.append(padded_vocab(cfg.vocab_size, tp) // tp * h)
    return max(sizes)


def full_parameters(cfg: GPTConfig) -> int:
    """The whole model's parameters (tied head once): rank_parameters of a 1 x 1 x 1 layout."""
    return rank_parameters(cfg, Layout(), 0).total


# ---- activations --------------------------------------------------------------------------------------
def layer_activation_bytes(
    s: int, b: int, h: int, a: int, tp: int = 1, sequence_parallel: bool = False, scores: bool = True
) -> float:
    """Korthikanti et al. 2022 Table 2: 16-bit activation bytes one transformer layer saves for backward.
    scores=False drops the 5as/h term (attention scores, softmax and its dropout): a fused attention kernel
    (FlashAttention, scaled_dot_product_attention) keeps no s x s matrix."""
    attn = 5 * a * s / h if scores else 0.0
    if tp > 1 and sequence_parallel:
        return s * b * h * (34 + attn) / tp
    return s * b * h * (10 + 24 / tp + attn / tp)


def lab_layer_activation_bytes(
    s: int, b: int, h: int, tp: int = 1, sequence_parallel: bool = False, residual: int = 4, compute: int = 4
) -> float:
    """Bytes our GPT block (runner/gpt/model.py) saves for backward, value by value (see the module docstring):
    2 LayerNorm inputs at the residual stream's width, the c_attn and c_fc inputs at the compute width (whole
    under tensor parallelism), and at the compute width split over tp: q, k, v, the attention output, c_proj's
    input, GELU's input and output (3 + 1 + 1 + 4 + 4 = 13 values of s*b*h). Sequence parallelism splits all."""
    whole = 2 * residual + 2 * compute
    split = 13 * compute
    if tp > 1 and sequence_parallel:
        return s * b * h * (whole + split) / tp
    return s * b * h * (whole + split / tp)


def checkpointed_layer_bytes(s: int, b: int, h: int, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Korthikanti et al. 2022 (full recompute): a checkpointed layer keeps only its 16-bit input, 2sbh
    (sequence-sharded under sequence parallelism)."""
    return 2 * s * b * h / (tp if tp > 1 and sequence_parallel else 1)


def in_flight(schedule: str, pp: int, m: int, stage: int, v: int = 1) -> float:
    """Microbatches whose activations pipeline rank `stage` holds at its peak, in units of the rank's whole
    share of layers (an interleaved chunk-microbatch counts 1/v)."""
    if pp <= 1:
        return 1.0
    if schedule == "gpipe":
        return float(m)
    if schedule == "interleaved-1f1b":
        chunks = min(2 * (pp - stage - 1) + (v - 1) * pp + 1, v * m)
        return chunks / v
    if schedule == "zb-h1":  # rank r runs its W passes r microbatches behind its B: (p - r) + r held until W
        return float(min(pp, m))
    return float(min(pp - stage, m))  # 1f1b


@functools.lru_cache(maxsize=1024)
def held_chunk_counts(schedule: str, pp: int, m: int, stage: int, v: int) -> tuple[tuple[int, ...], ...]:
    """Chunk-microbatches pipeline rank `stage` holds per local chunk right after each of its forwards, as the
    engine runs its schedule (runner/schedule_ops.py: a forward saves, the backward -- the W pass of a split
    one -- frees); only the vectors no other one exceeds on every chunk, since those alone can be the peak
    whatever each chunk's bytes. The closed forms of `in_flight` count the same (tests/test_planner_memory.py);
    this is what weighs an interleaved rank's chunks differently (the last virtual stage's head)."""
    held = [0] * v
    seen: set[tuple[int, ...]] = set()
    frees = "W" if splits_backward(schedule) else "B"
    for op in schedule_ops(schedule, m, pp, stage, v):
        if op.kind == "F":
            held[op.chunk] += 1
            seen.add(tuple(held))
        elif op.kind == frees:
            held[op.chunk] -= 1
    return tuple(x for x in seen if not any(y != x and all(a >= b for a, b in zip(y, x, strict=True)) for y in seen))


def zero_paper_bytes(psi: float, nd: int, stage: int, k: int = 12) -> float:
    """Rajbhandari et al. 2020 figure 1: model-state bytes per device under mixed-precision Adam."""
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return (2 + 2) * psi + k * psi / nd
    if stage == 2:
        return 2 * psi + (2 + k) * psi / nd
    return (2 + 2 + k) * psi / nd


# ---- the rank's memory --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankMemory:
    """Predicted bytes of one rank (pipeline stage `stage`); `total` is what must fit on the device."""

    stage: int
    param_count: int  # parameters held between steps (shards under ZeRO-3)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    transient_bytes: int  # during a step only: gathered ZeRO-3 units, autocast copies, logits, recompute
    microbatch_size: int
    in_flight: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    optimizer_step_bytes: int = 0  # AdamW's temporaries while it steps, after the backward freed the activations

    @property
    def states_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    @property
    def total(self) -> int:
        """The peak: the states, plus whichever is larger -- the forward and backward's activations and
        transients, or the optimizer step's temporaries (they never coexist: the step runs after the backward)."""
        during = max(self.activation_bytes + self.transient_bytes, self.optimizer_step_bytes)
        return self.states_bytes + self.kv_cache_bytes + during

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes), "total": self.total}


def _shard(n: int, dp: int) -> int:
    return math.ceil(n / dp)


def _layer_bytes(work: Workload, s: int, b: int, h: int, a: int, tp: int) -> float:
    """One layer's saved bytes for a microbatch: our block's own count ("sdpa"), or Korthikanti's formula with
    the attention scores ("naive", 16-bit figures scaled to the activation width)."""
    if work.attention == "naive":
        return layer_activation_bytes(s, b, h, a, tp, work.sequence_parallel) * work.activation_width / 2
    return lab_layer_activation_bytes(s, b, h, tp, work.sequence_parallel, work.residual_width, work.activation_width)


def rank_memory(cfg: GPTConfig, layout: Layout, work: Workload, stage: int) -> RankMemory:
    """Bytes on one rank of pipeline stage `stage` (any tp and dp coordinate: they hold the same)."""
    tp, pp, dp, zero = layout.tp, layout.pp, layout.dp, layout.zero_stage
    v = work.chunks_for(layout)
    sp = rank_parameters(cfg, layout, stage, v, work.tp_style)
    w = work.param_width
    train = work.workload == "train"
    psi = sp.total
    n_tensors = sp.outer_tensors + block_tensors(cfg) * len(sp.layers)
    units = [sp.block] * len(sp.layers) + ([sp.outer] if sp.outer else [])
    shards = [_shard(u, dp) for u in units]
    sharded = sum(shards)
    largest = largest_tensor(cfg, layout, stage, work.tp_style)
    notes: list[str] = []
    zero = zero if dp > 1 else 0
    params = sharded if zero == 3 else psi
    grads = 0
    optimizer = 0
    transient = 0
    step_bytes = 0
    if train:
        # AdamW steps over the rank's parameters, or under ZeRO over its shard of each unit
        if work.adamw == "foreach":
            step_bytes = (sharded if zero >= 1 else psi) * w
        else:
            step_bytes = 2 * (max(shards) if zero >= 1 else largest) * w
        grads = sharded if zero >= 2 else psi
        optimizer = (
            (2 * sharded * w + ADAM_STEP_BYTES * len(units))
            if zero >= 1
            else (2 * psi * w + ADAM_STEP_BYTES * n_tensors)
        )
        if zero >= 2 and pp > 1:  # inside a pipeline all of the stage's full gradients exist before reducing
            transient += (psi - sharded) * w
            notes.append("ZeRO-2/3 in a pipeline: the stage's full gradients exist until the reduce-scatter")
    if zero == 3:  # gathered during a step: the outer unit, the running block and the prefetched one
        gathered = sp.outer + min(2, len(sp.layers)) * sp.block
        transient += gathered * w
        if train and pp == 1:
            transient += sp.block * w  # one unit's full gradients before its reduce-scatter
    m = work.microbatches_for(layout)
    rows = max(1, work.batch // dp)
    mb = max(1, rows // m) if work.workload == "train" else rows
    if train and m > 1:
        # Accumulating over microbatches, autograd computes a parameter's gradient into a fresh tensor and then adds
        # it to .grad: the largest tensor's gradient exists twice for a moment.
        transient += largest * w
        notes.append("microbatches accumulate gradients: the largest tensor's gradient counted twice")
    s, h, a = work.seq, cfg.n_embd, cfg.n_head
    flight = in_flight(work.schedule, pp, m, stage, v) if train else 1.0
    activations = 0.0
    kv = 0
    if train:
        every = work.checkpoint_every
        full = _layer_bytes(work, s, mb, h, a, tp)
        residual, compute = work.residual_width, work.activation_width
        ckpt = checkpointed_layer_bytes(s, mb, h, tp, work.sequence_parallel) * residual / 2
        split = tp if tp > 1 and work.sequence_parallel else 1
        logits = mb * s * padded_vocab(cfg.vocab_size, tp) // tp * LOGIT_BYTES
        # The last virtual stage's head: the final LayerNorm's input (residual width), the head's input (its
        # output, at the compute width) and cross entropy's float32 log-softmax; its gradient is transient.
        head = (residual + compute) * s * mb * h // split + logits
        bf16_mixed = work.dtype == "bf16-mixed"
        head_matmul = sp.matmul - sp.block_matmul * len(sp.layers)  # the head's (tied) weight on the last stage
        per_chunk = []
        n_ckpt = 0
        for c in range(v):
            layers = sp.layers[c * len(sp.layers) // v : (c + 1) * len(sp.layers) // v]
            ckpts = sum(1 for i in layers if every and (i + 1) % every == 0)
            n_ckpt += ckpts
            last = c * pp + stage == pp * v - 1
            saved = ckpts * ckpt + (len(layers) - ckpts) * full + (head if last else 0)
            if bf16_mixed:
                # autocast's bf16 weight copies: autograd keeps them per microbatch in flight (saved tensors, not
                # parameters); a checkpointed block's are not saved, but autocast's cast cache holds every weight
                # cast during the forward until GPT.forward leaves the region (under ZeRO-3 too)
                saved += 2 * sp.block_matmul * (len(layers) - ckpts) + (2 * head_matmul if last else 0)
            per_chunk.append(saved)
        if n_ckpt:
            transient += int(full)  # the block being recomputed
        if stage == pp - 1:
            transient += logits  # the log-softmax's gradient while cross entropy's backward runs
            if bf16_mixed:  # the head's bfloat16 logits exist beside their float32 copy
                transient += logits // LOGIT_BYTES * 2
        if bf16_mixed:
            transient += 2 * sp.block_matmul * n_ckpt
            notes.append("bf16-mixed: autocast's bfloat16 weight copies counted (2 bytes a matmul weight)")
        if v == 1:  # (a rank without a pipeline holds one chunk: Workload.chunks_for)
            activations = flight * per_chunk[0]
        elif m % pp:  # no such interleaved schedule (validation says so): the closed form's average chunk
            activations = flight * sum(per_chunk)
        else:
            held = held_chunk_counts(work.schedule, pp, m, stage, v)
            activations = max(sum(n * b for n, b in zip(vec, per_chunk, strict=True)) for vec in held)
    else:
        # inference keeps no activations for backward: one layer's working set at a time
        transient += int(_layer_bytes(work, s, mb, h, a, tp))
        if stage == pp - 1:
            transient += mb * (s if work.workload == "forward" else 1) * padded_vocab(cfg.vocab_size, tp) // tp * 4
        if work.workload == "generate":
            kv = 2 * len(sp.layers) * mb * (s + work.new_tokens) * (h // tp) * work.activation_width
    return RankMemory(
        stage=stage,
        param_count=params,
        param_bytes=params * w,
        grad_bytes=grads * w,
        optimizer_bytes=optimizer,
        activation_bytes=int(activations),
        kv_cache_bytes=kv,
        transient_bytes=int(transient),
        microbatch_size=mb,
        in_flight=flight,
        notes=tuple(notes),
        optimizer_step_bytes=int(step_bytes),
    )


def layout_memory(cfg: GPTConfig, layout: Layout, work: Workload) -> RankMemory:
    """The rank that needs the most bytes (pipeline stages differ: the first holds the most microbatches,
    the first and last the embedding and head)."""
    return max((rank_memory(cfg, layout, work, r) for r in range(layout.pp)), key=lambda m: m.total)


# ---- a RunSpec's layout (what runner/estimates.py and the Launch page ask) ----------------------------
def spec_layout(spec: Any) -> Layout:
    """The Layout of a runner.spec.RunSpec (its degrees; ZeRO only where it shards something)."""
    tp, pp, dp = spec.degrees
    zero = spec.zero_stage if dp > 1 and spec.workload == "train" else 0
    return Layout(tp, pp, dp, zero)


def spec_workload(spec: Any, device: str | None = None) -> Workload:
    """The Workload of a runner.spec.RunSpec on `device` (default: the spec's; "auto" counts as a GPU)."""
    _, pp, _ = spec.degrees
    return Workload(
        adamw="for-loop" if (device or spec.device) == "cpu" else "foreach",
        workload=spec.workload,
        batch=spec.batch,
        seq=spec.seq,
        new_tokens=spec.new_tokens,
        dtype=spec.dtype,
        checkpoint=spec.checkpoint,
        schedule=spec.schedule,
        microbatches=spec.microbatches if pp > 1 else 1,
        virtual_stages=spec.virtual_stages,
        sequence_parallel=spec.sequence_parallel,
        tp_style=spec.tp_style,
    )


def spec_rank_memory(spec: Any, device: str | None = None) -> list[RankMemory]:
    """Predicted bytes of every pipeline stage of a RunSpec (index = pp coordinate; tp and dp peers hold
    the same), on `device` (default: the spec's)."""
    cfg, layout, work = spec.model_config(), spec_layout(spec), spec_workload(spec, device)
    return [rank_memory(cfg, layout, work, r) for r in range(layout.pp)]


def spec_memory(spec: Any) -> RankMemory:
    """The busiest rank of a RunSpec."""
    return max(spec_rank_memory(spec), key=lambda m: m.total)


def spec_host_bytes(spec: Any, rank_baseline_bytes: int) -> int:
    """Bytes every rank of a RunSpec needs together (a CPU run on one host): each rank's predicted bytes
    plus a process baseline (torch and its process group before any tensor)."""
    layout = spec_layout(spec)
    per_stage = spec_rank_memory(spec, "cpu")
    return sum(m.total for m in per_stage) * layout.tp * layout.dp + layout.world_size * rank_baseline_bytes
