"""What each part of a rank's memory weighs, torch-free: parameters per layout and stage, activations per layer,
the ZeRO paper's model states. runner/planner/memory.py adds them up over the schedule into the peak.

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
The Llama family (runner/gpt/config.py) holds no biases (Qwen2: on Q, K, V), RMSNorm weights (h each), c_attn
of h + 2*kv_width rows (kv_width = n_kv_head * head_dim), SwiGLU's c_fc of 2f rows and c_proj of f columns
(f = ffn_hidden), no position embedding, and an untied head as a parameter of its own on the last stage.
A rank holds h/t query rows and, of K and V each, kv_width/t rows when tp splits the key/value heads or one
head's head_dim rows when it copies them (`tp_widths`). Llama-3.1-8B: 128256*4096*2 + 32*(2*4096 + 6144*4096 +
4096^2 + 3*14336*4096) + 4096 = 8,030,261,248.

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
output (which is c_proj's input: reshaping the kernel's transposed output is a view, no copy), GELU's input and
output, 12 values -- s*b*h*(2w_r + 2w_c + 12w_c/t), all over t under sequence parallelism. A Llama block saves,
per token, the same norm and projection inputs and, split over t: the rotated q and k and a copy of v (c_attn's
output itself is freed once its heads are read: runner/gpt/rotary.py), the attention output, and SwiGLU's c_fc
output (gate and up, 2f), silu(gate) and its product with up (f each): q + 2kv + q + 4f values with the rank's
widths q, kv, f
(`saved_split_values`; the rotary cos and sin are [s, head_dim], shared by the layers, left out); and each of its
RMSNorms (x * rsqrt(mean x^2) * weight, not a fused kernel) keeps its normalized input for the weight's gradient
beside the input itself: 4 values at the residual width where LayerNorm keeps 2. At 16 bits and t = 1
that is Korthikanti's 34 without the scores and the two dropout masks (sbh bytes each; our model has no dropout):
32; float32 64, bf16-mixed (float32 residual, bf16 matmul inputs) 36. "naive" keeps the paper's formula. Real runs' saved
bytes land within 10% (tests/test_planner_measured.py). A checkpointed layer keeps its input at w_r.
A checkpointed stage also needs one block's full activations while that block is recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runner.gpt.config import GPTConfig
from runner.planner.models import Layout, Workload, padded_vocab


# ---- parameters ---------------------------------------------------------------------------------------
def tp_widths(cfg: GPTConfig, tp: int = 1) -> tuple[int, int, int]:
    """A tensor-parallel rank's widths: its query rows h/t, its rows of K (and of V) -- kv_width/t when tp splits
    the key/value heads, one head's when it copies them (runner/gpt/tp_plan.py) -- and its MLP width f/t."""
    kv = cfg.kv_width // tp if cfg.kv_heads % tp == 0 else cfg.head_dim
    return cfg.n_embd // tp, kv, cfg.d_ff // tp


def block_parameters(cfg: GPTConfig, tp: int = 1, tp_style: str = "megatron") -> int:
    """Parameters of one transformer block on one tensor-parallel rank (see the module docstring)."""
    h, b = cfg.n_embd, 1 if cfg.bias else 0
    q, kv, f = tp_widths(cfg, tp)
    qkv_b = 1 if cfg.bias or cfg.qkv_bias else 0
    norms = 2 * (h + h * b)  # replicated
    c_attn = (q + 2 * kv) * (h + qkv_b)  # column: Q, K, V of this rank's heads
    c_fc = cfg.fused_mlp_parts * f * (h + b)  # column (SwiGLU: gate and up)
    mlp_proj = f * h + h * b  # row: weight split by input columns, bias whole
    attn_proj = h * h // tp + h * b if tp_style == "megatron" else h * h + h * b  # "gather": whole
    return norms + c_attn + c_fc + mlp_proj + attn_proj


def block_tensors(cfg: GPTConfig) -> int:
    """Parameter tensors of one block (AdamW keeps one step counter per tensor): 6 weights, and 6 biases (GPT-2)
    or c_attn's alone (Qwen2)."""
    return 6 + (6 if cfg.bias else 1 if cfg.qkv_bias else 0)


@dataclass(frozen=True)
class StageParameters:
    """What pipeline rank `stage` holds on one tensor-parallel rank: its blocks and its outer parameters."""

    stage: int
    layers: tuple[int, ...]  # global layer ids of the rank's blocks (all its chunks)
    block: int  # parameters of each block
    outer: int  # embeddings, final norm, head (a tied weight once)
    outer_tensors: int
    matmul: int  # parameters that multiply activations (autocast casts them): no positions, no LayerNorms
    block_matmul: int = 0  # of them, one block's

    @property
    def total(self) -> int:
        return self.block * len(self.layers) + self.outer


def stage_layers(n_layer: int, pp: int, v: int, stage: int, cut: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Global layer ids of pipeline rank `stage`: chunk c is virtual stage c*pp + stage of pp*v equal ones
    (runner/gpt/pipeline.py cut_chunks), or with `cut` (one chunk a rank) the stage's share of it in order."""
    if cut:
        first = sum(cut[:stage])
        return tuple(range(first, first + cut[stage]))
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
        outer += embedding_parameters(cfg, tp)
        tensors += 2 if cfg.learned_positions else 1
    if has_head:
        outer += h + h * b  # final norm
        tensors += 2 if b else 1
        if not (has_embed and cfg.tie_head):  # an untied head, or the tied weight again as this stage's own
            outer += vocab_rows * h
            tensors += 1
        matmul += vocab_rows * h  # the head multiplies; an embedding lookup is no matmul (autocast leaves it)
    layers = stage_layers(cfg.n_layer, pp, v, stage, layout.cut)
    blk = block_parameters(cfg, tp, tp_style)
    blk_matmul = blk - 2 * (h + h * b)
    return StageParameters(stage, layers, blk, outer, tensors, matmul + blk_matmul * len(layers), blk_matmul)


def embedding_parameters(cfg: GPTConfig, tp: int = 1) -> int:
    """The first stage's embeddings on one tensor-parallel rank: its vocabulary rows, and learned positions."""
    positions = cfg.block_size * cfg.n_embd if cfg.learned_positions else 0
    return padded_vocab(cfg.vocab_size, tp) // tp * cfg.n_embd + positions


def largest_block_tensor(cfg: GPTConfig, tp: int, tp_style: str = "megatron") -> int:
    """Elements of a block's largest matmul weight on one tensor-parallel rank: c_fc or c_proj of the MLP, c_attn,
    or the whole attention c_proj under the "gather" style."""
    h = cfg.n_embd
    q, kv, f = tp_widths(cfg, tp)
    return max(cfg.fused_mlp_parts * f * h, (q + 2 * kv) * h, h * h if tp_style != "megatron" else h * h // tp)


def largest_tensor(cfg: GPTConfig, layout: Layout, stage: int, tp_style: str = "megatron") -> int:
    """Elements of the largest parameter tensor pipeline rank `stage` holds: its vocabulary rows (first and last
    stage) or a block's largest matmul weight, split by tp."""
    largest = largest_block_tensor(cfg, layout.tp, tp_style)
    if stage in (0, layout.pp - 1):
        largest = max(largest, padded_vocab(cfg.vocab_size, layout.tp) // layout.tp * cfg.n_embd)
    return largest


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


def saved_split_values(cfg: GPTConfig, tp: int = 1) -> int:
    """Values a token of one block saves inside the parallel region on a tensor-parallel rank (module docstring):
    GPT-2 q, k, v (c_attn's output), the attention output, GELU's input and output; Llama the rotated q and k, v's
    copy, the attention output, SwiGLU's c_fc output, silu(gate) and the product."""
    q, kv, f = tp_widths(cfg, tp)
    if cfg.is_llama:
        return q + 2 * kv + q + 4 * f
    return (q + 2 * kv) + q + 2 * f


def lab_layer_activation_bytes(
    s: int, b: int, h: int, tp: int = 1, sequence_parallel: bool = False, residual: int = 4, compute: int = 4,
    cfg: GPTConfig | None = None,
) -> float:  # fmt: skip
    """Bytes our GPT block (runner/gpt/model.py) saves for backward, value by value (see the module docstring):
    2 norm inputs at the residual stream's width (RMSNorm: and their normalized values, 4), the c_attn and c_fc
    inputs at the compute width (whole under tensor parallelism), and at the compute width the rank's share of the
    parallel region (`saved_split_values` of `cfg`; without one GPT-2's with d_ff = 4h: q, k, v, the attention
    output, GELU's input and output, 3 + 1 + 4 + 4 = 12 values of s*b*h over tp). Sequence parallelism splits
    the whole ones too."""
    norms = 4 if cfg is not None and cfg.is_llama else 2
    whole = (norms * residual + 2 * compute) * h
    split = (saved_split_values(cfg, tp) if cfg is not None else 12 * h / tp) * compute
    if tp > 1 and sequence_parallel:
        return s * b * (whole / tp + split)
    return s * b * (whole + split)


def checkpointed_layer_bytes(s: int, b: int, h: int, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Korthikanti et al. 2022 (full recompute): a checkpointed layer keeps only its 16-bit input, 2sbh
    (sequence-sharded under sequence parallelism)."""
    return 2 * s * b * h / (tp if tp > 1 and sequence_parallel else 1)


def zero_paper_bytes(psi: float, nd: int, stage: int, k: int = 12) -> float:
    """Rajbhandari et al. 2020 figure 1: model-state bytes per device under mixed-precision Adam."""
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return (2 + 2) * psi + k * psi / nd
    if stage == 2:
        return 2 * psi + (2 + k) * psi / nd
    return (2 + 2 + k) * psi / nd


def unit_shard(n: int, dp: int) -> int:
    return math.ceil(n / dp)


def layer_bytes(work: Workload, s: int, b: int, cfg: GPTConfig, tp: int) -> float:
    """One layer's saved bytes for a microbatch: our block's own count ("sdpa"), or Korthikanti's formula with
    the attention scores ("naive", 16-bit figures scaled to the activation width)."""
    h, a = cfg.n_embd, cfg.n_head
    if work.attention == "naive":
        return layer_activation_bytes(s, b, h, a, tp, work.sequence_parallel) * work.activation_width / 2
    return lab_layer_activation_bytes(s, b, h, tp, work.sequence_parallel, work.residual_width, work.activation_width,
                                      cfg)  # fmt: skip
