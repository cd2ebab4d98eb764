"""Predicted step time of a layout on devices: the passes of each pipeline rank, the schedule's bubble, and the
communication each group needs, exposed or hidden as the lab's engine runs it (torch-free).

Compute, per microbatch and pipeline rank (runner/planner/devices.py `matmul_seconds`, `memory_seconds`: the one
function of shapes and device kind, one set of constants per kind):
- a transformer layer's forward is its matrix multiplies on the rank's share of the heads and MLP columns (c_attn
  [b*s, h] x [h, 3h/t], attention's c_proj [h/t -> h], c_fc [h -> d_ff/t], the MLP's c_proj [d_ff/t -> h]), the
  attention core, and its elementwise work. Attention "sdpa" (our model: a fused causal kernel, FlashAttention's
  way) is its two products over the causal half of the scores, its backward 2.5 forwards (FlashAttention-2, Dao
  2023: five products against two, recomputing the scores); "naive" (Megatron-LM 2021, the paper's Korthikanti
  count) multiplies the whole s x s scores per head and moves them through the fused scale-mask-softmax and dropout
  (9 bytes a score forward: read and write at 2 bytes twice, a 1-byte mask). Elementwise work a token forward, in
  elements of h: two LayerNorms read and write (4), two bias-residual adds read two and write one (6), GeLU reads and
  writes d_ff/t (2 d_ff/(h t); SwiGLU reads gate and up, writes their product: 3); sequence parallelism splits the
  first two over t. A Llama-family config's c_attn has h + 2 x its key/value width outputs and its c_fc both gate
  and up. A backward costs two forwards
  (each product's input gradient and weight gradient; the elementwise work's gradients).
- activation checkpointing runs the checkpointed layers' forward again in the backward (full recompute).
- gradient accumulation: every microbatch after the first adds its weight gradients into the rank's .grad (autograd's
  AccumulateGrad: the held gradient and the new one read, the sum written), amortized over the m microbatches.
- the last virtual stage adds the head ([b*s, h] x [h, V/t], backward twice) and cross entropy over float32
  logits (16 bytes a logit forward and backward).
- `efficiency` given (a number): every matrix multiply runs at that flat share of the device's peak and elementwise
  work is not timed apart -- the model before shapes mattered, and a calibrated CPU's (its rate is measured).
Tensor parallelism (Megatron, Shoeybi et al. 2019 figure 4; sequence parallelism's reduce-scatter + all-gather move
the same bytes): per layer and microbatch 2 all-reduces of b*s*h activations forward, 2 backward, 2 more in a
recomputed forward, each a ring all-reduce of 2(t-1)/t x bytes at the run's activation width; not overlapped (the
engine waits for each). Sequence parallelism keeps only seq/t of each column-parallel layer's input and gathers it
again in the backward (Korthikanti et al. 2022, section 4.2.2): one more all-gather of b*s*h for c_attn, c_fc and
the head, (t-1)/t x bytes each. Every one of those collectives (and the loss's three all-reduces of a number a token)
also costs NCCL's latency, its fixed cost and one for each ring step (runner/planner/collectives.py): what makes a
micro-batch of one sequence, or a decode step, slower under tensor parallelism than its bytes say. Data-parallel and
pipeline communication is charged its bytes only: 25 MB buckets, whole blocks and b*s*h messages, where the
latency is a small share.
Pipeline: the slowest rank's microbatch time T paces the pipeline: m*T of work and the schedule's bubble
(runner/job/metrics.py bubble_fraction_theory: (p-1)/(m+p-1) for GPipe and 1F1B, (p-1)/(v*m+p-1) interleaved,
(p-1)/(3m+p-1) ZB-H1) on top; messages of b*s*h at the residual stream's width (float32 under bf16-mixed, bfloat16
under bfloat16 and bf16-master), 2(m*v + p - 1) on the critical path.
Data parallelism, at the gradients' width on the wire (Workload.reduce_width: bfloat16 under bfloat16 and
bf16-master unless reduce_fp32, float32 otherwise), each collective at the slowest link its group crosses:
- plain: a ring all-reduce of the rank's gradients, 2(n-1)/n x Psi*w;
- ZeRO-1: the same all-reduce, then an all-gather of the updated parameters ((n-1)/n Psi*w): three shares;
- ZeRO-2: a reduce-scatter ((n-1)/n) and the all-gather: two shares (Rajbhandari et al. 2020, section 7: the
  volume of plain data parallelism);
- ZeRO-3: an all-gather of the parameters before each microbatch's forward and another before its backward, and
  the reduce-scatter: (2m + 1) shares, the gathers prefetched behind the passes they feed.
Without a pipeline the engine reduces each bucket (ZeRO: each unit) as the last microbatch's backward makes it
(runner/gpt/data_parallel.py), so only what outlasts that backward is exposed, and at least the last bucket's
share (25 MB buckets; a block's unit under ZeRO). Inside a pipeline the reductions follow the backward: exposed.
The all-gather of ZeRO-1/2 follows the optimizer step: exposed.
Optimizer: AdamW moves each element it steps through memory once (gradient read, parameter and both moments read
and written; under bf16-master the float32 master read and written and its float32 gradient written and read).
Where a group falls (runner/gpt/mesh.py: rank = (pp_i*dp + dp_i)*tp + tp_i, tp innermost, then dp, then pp): a
group whose ranks span k consecutive ranks stays in a node when k <= GPUs per node; one that crosses nodes moves
its ring over as many network cards at once as it has members in a node (`group_bandwidth`: NCCL's channels),
a pipeline's message over one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from runner.gpt.config import GPTConfig
from runner.job.metrics import bubble_fraction_theory, model_flops
from runner.planner.byte_counts import rank_parameters, stage_layers, tp_widths
from runner.planner.collectives import tp_collectives, tp_latency_s, wire_bytes
from runner.planner.devices import Devices, matmul_seconds, memory_seconds
from runner.planner.models import LOGIT_BYTES, Layout, Workload, padded_vocab

DEFAULT_EFFICIENCY = 0.5  # a flat share of peak where one is asked for (the Planner page's slider starts there)
DEFAULT_LINK_EFFICIENCY = 0.8
BUCKET_BYTES = 25 * 2**20  # the data-parallel buckets (runner/gpt/data_parallel.py, DDP's default)
SCORE_BYTES = 9  # "naive" attention, bytes a score forward: scale-mask-softmax and dropout (module docstring)
FLASH_BACKWARD = 2.5  # a fused attention's backward in forwards (FlashAttention-2: five products against two)


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one step, by part; `total` is the step. dp_comm_s is the exposed part of the data-parallel
    communication (dp_comm_total_s before overlap); efficiency: model FLOPs a rank / (peak x compute_s)."""

    compute_s: float
    bubble_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    bubble_fraction: float
    flops: float
    efficiency: float
    dp_comm_total_s: float = 0.0
    optimizer_s: float = 0.0

    @property
    def total(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_comm_s + self.pp_comm_s + self.dp_comm_s + self.optimizer_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def group_bandwidth(devices: Devices, span: int, link_efficiency: float, stride: int = 1) -> float:
    """Bytes/s a rank of a collective's group moves at: the group's members `stride` ranks apart spanning `span`
    consecutive ranks. Within a node, the node's links; across nodes, the k members a node holds reach the others
    through their k network cards at once (NCCL runs one ring channel through each card), so the ring moves k times
    one card's bandwidth across the node boundary, at most the node's own links."""
    if span <= devices.gpus_per_node:
        return devices.bw_intra * link_efficiency
    k = max(1, devices.gpus_per_node // max(1, stride))
    return min(devices.bw_intra, k * devices.bw_inter) * link_efficiency


def message_bandwidth(devices: Devices, tp: int, dp: int, link_efficiency: float) -> float:
    """Bytes/s of a pipeline message from a rank to its peer in the next stage, tp * dp ranks on: one link, a node's
    own when both stages' ranks share one, else one network card."""
    bw = devices.bw_intra if 2 * tp * dp <= devices.gpus_per_node else devices.bw_inter
    return bw * link_efficiency


def ring_allreduce_s(nbytes: float, n: int, bw: float) -> float:
    """A ring all-reduce of nbytes over n ranks: each sends 2(n-1)/n x nbytes (Patarasuk & Yuan 2009)."""
    return wire_bytes("all_reduce", n, nbytes) / bw


def step_flops(cfg: GPTConfig, work: Workload) -> float:
    """Model FLOPs of a step plus the forwards recomputed under activation checkpointing."""
    flops = model_flops(cfg, work.workload, work.batch, work.seq, work.new_tokens)
    every = work.checkpoint_every if work.workload == "train" else 0
    if every:
        share = (cfg.n_layer // every) / cfg.n_layer  # checkpointed blocks run their forward twice
        flops += flops / 3 * share
    return flops


@dataclass(frozen=True)
class Passes:
    """Seconds of one microbatch's passes on one pipeline rank: forward, backward (input and weight gradients),
    recomputed forwards, and the tensor-parallel all-reduces among them."""

    forward: float
    backward: float
    recompute: float
    tp_comm: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute + self.tp_comm


class _Clock:
    """Seconds of a rank's matrix multiplies and memory traffic: modelled per shape, or at a flat share of peak."""

    def __init__(self, devices: Devices, dtype: str, efficiency: float | None):
        self.devices, self.dtype, self.flat = devices, dtype, efficiency
        self.width = 4 if dtype == "float32" else 2

    def mm(self, m: float, n: float, k: float, batch: float = 1) -> float:
        if self.flat is not None:
            return 2 * batch * m * n * k / (self.devices.peak(self.dtype) * self.flat)
        return matmul_seconds(self.devices, self.dtype, int(m), int(n), int(k), int(batch), self.width)

    def moved(self, nbytes: float) -> float:
        return 0.0 if self.flat is not None else memory_seconds(self.devices, nbytes)


def _layer_widths(cfg: GPTConfig) -> tuple[int, int]:
    """(key/value width, MLP input projections): a Llama config has grouped key/value heads and SwiGLU's gate
    beside its up projection; GPT-2 has n_embd and 1."""
    return getattr(cfg, "kv_width", cfg.n_embd), getattr(cfg, "fused_mlp_parts", 1)


def layer_forward_flops(cfg: GPTConfig, tokens: int, seq: int) -> float:
    """Model FLOPs of one layer's forward for `tokens` tokens attending over `seq` positions, counted as
    model_flops counts them: 2 per matmul weight and token, and 4·h·seq a token for attention's two products."""
    h, f = cfg.n_embd, cfg.d_ff
    kv, parts = _layer_widths(cfg)
    weights = h * (h + 2 * kv) + h * h + parts * f * h + f * h
    return tokens * (2 * weights + 4 * h * seq)


def layer_seconds(cfg: GPTConfig, work: Workload, clock: _Clock, b: int, tp: int) -> tuple[float, float]:
    """(forward, backward) seconds of one transformer layer on one tensor-parallel rank for b sequences."""
    s, h, a, f = work.seq, cfg.n_embd, cfg.n_head, cfg.d_ff
    tokens, heads, hd = b * s, max(1, a // tp), h // a
    kv, parts = _layer_widths(cfg)
    gemm = clock.mm(tokens, (h + 2 * kv) / tp, h) + clock.mm(tokens, h, h / tp) + clock.mm(tokens, parts * f / tp, h)
    gemm += clock.mm(tokens, h, f / tp)
    width = work.activation_width
    split = tp if work.sequence_parallel and tp > 1 else 1
    elementwise = clock.moved(tokens * width * (10 * h / split + (1 + parts) * f / tp))
    if work.attention == "naive":  # the whole s x s scores, kept through softmax and dropout
        core = clock.mm(s, s, hd, b * heads) + clock.mm(s, hd, s, b * heads)
        elementwise += clock.moved(b * heads * s * s * SCORE_BYTES)
        core_back = 2 * core
    else:  # a fused causal kernel: the lower half of the scores
        core = (clock.mm(s, s, hd, b * heads) + clock.mm(s, hd, s, b * heads)) / 2
        core_back = FLASH_BACKWARD * core
    return gemm + core + elementwise, 2 * gemm + core_back + 2 * elementwise


def rank_passes(cfg: GPTConfig, layout: Layout, work: Workload, devices: Devices, stage: int,
                efficiency: float | None, link_efficiency: float) -> Passes:  # fmt: skip
    """One microbatch's passes on pipeline rank `stage` (all its chunks), the head's on the last virtual stage."""
    tp, pp = layout.tp, layout.pp
    v = work.chunks_for(layout)
    m = work.microbatches_for(layout)
    b = max(1, work.batch // layout.dp // m)
    clock = _Clock(devices, work.dtype, efficiency)
    layers = stage_layers(cfg.n_layer, pp, v, stage, layout.cut)
    fwd, bwd = layer_seconds(cfg, work, clock, b, tp)
    every = work.checkpoint_every if work.workload == "train" else 0
    ckpt = sum(1 for i in layers if every and (i + 1) % every == 0)
    forward, backward, recompute = len(layers) * fwd, len(layers) * bwd, ckpt * fwd
    if stage == pp - 1:  # the last virtual stage is chunk v - 1 of the last rank: the head and the loss
        tokens, vocab = b * work.seq, padded_vocab(cfg.vocab_size, tp) // tp
        head = clock.mm(tokens, vocab, cfg.n_embd)
        forward += head + clock.moved(tokens * vocab * 2 * LOGIT_BYTES)
        backward += 2 * head + clock.moved(tokens * vocab * 2 * LOGIT_BYTES)
    if m > 1 and work.workload == "train":  # each later microbatch's weight gradients added into .grad: 3 touches
        grads = rank_parameters(cfg, layout, stage, v, work.tp_style).total
        backward += (m - 1) / m * clock.moved(3 * grads * work.param_width)
    tp_comm = 0.0
    if tp > 1:
        bw = group_bandwidth(devices, tp, link_efficiency)
        activation = b * work.seq * cfg.n_embd * work.activation_width
        one = ring_allreduce_s(activation, tp, bw)
        tp_comm = one * (2 * len(layers) + 2 * len(layers) + 2 * ckpt)
        if work.sequence_parallel:  # the backward re-gathers c_attn's and c_fc's inputs: an all-reduce's bytes
            tp_comm += one * (len(layers) + (0.5 if stage == pp - 1 else 0.0))  # and the head's: half of one
        counts = tp_collectives(work.tp_style, work.sequence_parallel, len(layers), ckpt, stage == 0, stage == pp - 1,
                                positions=not cfg.is_llama)  # fmt: skip
        tp_comm += tp_latency_s(devices, tp, counts, activation, bw)
    return Passes(forward, backward, recompute, tp_comm)


def _dp_seconds(cfg: GPTConfig, layout: Layout, work: Workload, devices: Devices, slowest: Passes, m: int,
                link_efficiency: float) -> tuple[float, float]:  # fmt: skip
    """(exposed, total) seconds of the data-parallel communication of a training step (module docstring)."""
    tp, pp, dp, zero = layout.tp, layout.pp, layout.dp, layout.zero_stage
    v = work.chunks_for(layout)
    params = [rank_parameters(cfg, layout, r, v, work.tp_style) for r in range(pp)]
    psi = max(p.total for p in params)
    bw = group_bandwidth(devices, tp * dp, link_efficiency, stride=tp)
    share = (dp - 1) / dp * psi / bw  # seconds of (n-1)/n of the rank's parameters, per byte of element width
    grads, weights = share * work.reduce_width, share * work.param_width
    reduce = 2 * grads if zero <= 1 else grads  # all-reduce, or reduce-scatter
    gather = weights if zero in (1, 2) else 0.0  # the updated parameters, after the step
    passes_gathered = 0.0
    if zero == 3:  # every microbatch's forward and backward gather the blocks, prefetched behind the passes
        per_pass = weights
        passes_gathered = m * (max(0.0, per_pass - slowest.forward) + max(0.0, per_pass - slowest.backward))
        gather = 2 * m * per_pass
    total = reduce + gather
    if pp > 1:  # inside a pipeline the engine reduces after the backward
        return reduce + (passes_gathered if zero == 3 else gather), total
    largest = max(p.block for p in params) if zero else BUCKET_BYTES / work.param_width
    tail = reduce * min(1.0, largest / max(1, psi))  # the last bucket (unit) starts when the backward ends
    window = slowest.backward + slowest.recompute + slowest.tp_comm / 2
    exposed = max(reduce - window, tail)
    return exposed + (passes_gathered if zero == 3 else gather), total


def _optimizer_seconds(cfg: GPTConfig, layout: Layout, work: Workload, devices: Devices, clock: _Clock) -> float:
    """AdamW's step: each element it steps read and written once (module docstring)."""
    v = work.chunks_for(layout)
    psi = max(rank_parameters(cfg, layout, r, v, work.tp_style).total for r in range(layout.pp))
    stepped = math.ceil(psi / layout.dp) if layout.zero_stage and layout.dp > 1 else psi
    w, mw, master = work.param_width, work.moment_width, work.master_width
    per = w + 2 * w + 4 * mw + 4 * master
    return clock.moved(stepped * per)


def predict_step(cfg: GPTConfig, layout: Layout, work: Workload, devices: Devices,
                 efficiency: float | None = None,
                 link_efficiency: float = DEFAULT_LINK_EFFICIENCY) -> StepTime:  # fmt: skip
    """The step time of `work` on `layout` over `devices` (see the module docstring for every term). `efficiency`:
    None models each matrix multiply from its shape and the device kind; a number is a flat share of peak."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    train = work.workload == "train"
    v = work.chunks_for(layout)
    m = work.microbatches_for(layout)
    flops = step_flops(cfg, work)
    if not train:
        return _inference_step(cfg, layout, work, devices, efficiency, link_efficiency, flops)
    ranks = [rank_passes(cfg, layout, work, devices, r, efficiency, link_efficiency) for r in range(pp)]
    slowest = max(ranks, key=lambda p: p.total)
    compute = m * (slowest.forward + slowest.backward + slowest.recompute)
    tp_s = m * slowest.tp_comm
    bubble_fraction = bubble_fraction_theory(work.schedule, pp, m, v) if pp > 1 else 0.0
    bubble = (compute + tp_s) * bubble_fraction / (1 - bubble_fraction)
    pp_s = 0.0
    if pp > 1:
        bw = message_bandwidth(devices, tp, dp, link_efficiency)
        b = max(1, work.batch // dp // m)
        msg = b * work.seq * cfg.n_embd * work.residual_width / bw
        pp_s = 2 * (m * v + pp - 1) * msg
    dp_s = dp_total = 0.0
    if dp > 1:
        dp_s, dp_total = _dp_seconds(cfg, layout, work, devices, slowest, m, link_efficiency)
    optimizer = _optimizer_seconds(cfg, layout, work, devices, _Clock(devices, work.dtype, efficiency))
    achieved = flops / layout.world_size / (devices.peak(work.dtype) * compute) if compute > 0 else 0.0
    return StepTime(compute, bubble, tp_s, pp_s, dp_s, bubble_fraction, flops, achieved, dp_total, optimizer)


def _decode_bytes(cfg: GPTConfig, layout: Layout, work: Workload, rows: int, layers: int) -> float:
    """Bytes the busiest rank reads from device memory over a generation's decode steps (new_tokens - 1: the prompt's
    pass yields the first token): each step its weights once -- at their stored width, and under bf16-mixed
    autocast's bfloat16 copy written and read again -- and its key/value cache, 2 x layers x rows x its key/value
    width a position, over the seq + j - 1 positions step j attends to."""
    steps = work.new_tokens - 1
    psi = max(rank_parameters(cfg, layout, r, 1, work.tp_style).total for r in range(layout.pp))
    cast = 2 * work.activation_width if work.param_width != work.activation_width else 0
    _, kv_width, _ = tp_widths(cfg, layout.tp)
    per_position = 2 * layers * rows * kv_width * work.activation_width
    positions = steps * (work.seq - 1) + steps * (steps + 1) // 2
    return steps * psi * (work.param_width + cast) + per_position * positions


def _inference_step(cfg: GPTConfig, layout: Layout, work: Workload, devices: Devices, efficiency: float | None,
                    link_efficiency: float, flops: float) -> StepTime:  # fmt: skip
    """Forward and generate: the model FLOPs spread over the ranks at the modelled rate of a layer's forward, the
    pipeline filled and drained once, the tensor-parallel collectives of every pass (and of each decode step) with
    their latency, and the full logits gathered for the user. A decode step (one position a row) takes at least the
    time to read the rank's weights and its key/value cache from device memory (`_decode_bytes`): the roofline's
    memory bound, which a handful of FLOPs a weight cannot reach."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    rows = max(1, work.batch // dp)
    clock = _Clock(devices, work.dtype, efficiency)
    fwd, _ = layer_seconds(cfg, work, clock, rows, tp)
    layer_flops = layer_forward_flops(cfg, rows * work.seq, work.seq) / tp
    rate = layer_flops / fwd if fwd > 0 else devices.peak(work.dtype)  # this shape's FLOP/s
    compute = flops / layout.world_size / rate
    layers = max(layout.cut) if layout.cut else cfg.n_layer // pp  # the longest stage's all-reduces
    if work.workload == "generate" and work.new_tokens > 1:
        decode_flops = flops - model_flops(cfg, "forward", work.batch, work.seq)
        decoded = decode_flops / layout.world_size / rate
        compute += max(decoded, clock.moved(_decode_bytes(cfg, layout, work, rows, layers))) - decoded
    m = work.microbatches_for(layout)  # an assembly line: GPipe's fill and drain
    bubble_fraction = bubble_fraction_theory("gpipe", pp, m, 1) if pp > 1 else 0.0
    bubble = compute * bubble_fraction / (1 - bubble_fraction)
    tp_s = pp_s = 0.0
    if tp > 1:
        bw = group_bandwidth(devices, tp, link_efficiency)
        # a pipeline runs each micro-batch through its stages: the collectives are per micro-batch, the bytes per row
        calls = m if pp > 1 else 1
        prefill = rows * work.seq * cfg.n_embd * work.activation_width
        tp_s = 2 * layers * ring_allreduce_s(prefill, tp, bw)
        sp = work.sequence_parallel and work.workload == "forward"  # generation runs whole sequences (tp_layers.py)
        tp_s += calls * tp_latency_s(devices, tp, tp_collectives(work.tp_style, sp, layers, train=False),
                                     prefill / calls, bw)  # fmt: skip
        # the full logits gathered for the user: every position's for forward, the last one's for each new token
        vocab_bytes = padded_vocab(cfg.vocab_size, tp) * work.activation_width
        tp_s += wire_bytes("all_gather", tp, rows * (work.seq if work.workload == "forward" else 1) * vocab_bytes) / bw
        if work.workload == "generate":  # each decode step: Megatron's forward on one position, latency-bound
            token = rows * cfg.n_embd * work.activation_width
            step = 2 * layers * ring_allreduce_s(token, tp, bw) + wire_bytes("all_gather", tp, rows * vocab_bytes) / bw
            step += calls * tp_latency_s(devices, tp, tp_collectives(work.tp_style, False, layers, train=False),
                                         token / calls, bw)  # fmt: skip
            tp_s += step * max(0, work.new_tokens - 1)
    if pp > 1:
        bw = message_bandwidth(devices, tp, dp, link_efficiency)
        tokens = work.seq + (work.new_tokens if work.workload == "generate" else 0)
        pp_s = (pp - 1) * rows * tokens * cfg.n_embd * work.residual_width / bw
    return StepTime(compute, bubble, tp_s, pp_s, 0.0, bubble_fraction, flops, rate / devices.peak(work.dtype))
