"""Predicted step time of a layout on devices: compute, communication, the pipeline bubble (torch-free).

compute: model FLOPs of the step (runner/metrics.model_flops, PaLM's count: 6N + 12·l·h·s a trained token,
  2N + 4·l·h·s forwarded), plus the recomputed forwards of checkpointed blocks (a third of a trained layer's
  FLOPs each), split evenly over the world, at `efficiency` x the device's dense peak (stated: 0.5 by default,
  the MFU large runs report: Megatron-LM 2021 reaches 52% of peak on A100 for GPT-3 175B).
communication (per rank, not overlapped with compute: an upper bound; each collective at `link_efficiency`
  x the bandwidth of the slowest link its group crosses):
- tensor parallel: per layer and microbatch 2 all-reduces of b·s·h activations forward and 2 backward
  (Megatron, Shoeybi et al. 2019 figure 4; sequence parallelism's all-gather + reduce-scatter move the
  same bytes), each a ring all-reduce of 2(t-1)/t x bytes;
- pipeline: a b·s·h hidden state forward and its gradient backward per microbatch and stage boundary
  (float32 under bf16-mixed: the residual stream stays float32, runner/gpt/precision.py); the critical path
  carries 2(m·v + p - 1) of them;
- data parallel: a ring all-reduce of the gradients, 2(n-1)/n x Psi·w (Psi the rank's parameters);
  ZeRO-1 adds the all-gather of the updated parameters ((n-1)/n Psi·w), ZeRO-2 reduce-scatters instead of
  all-reducing ((n-1)/n) then all-gathers, ZeRO-3 all-gathers before each forward and each backward and
  reduce-scatters: 3(n-1)/n Psi·w (Rajbhandari et al. 2020: 1.5x plain data parallelism), and inside a
  pipeline 2m gathers (runner/gpt/zero.py).
Where a group falls (runner/gpt/mesh.py: rank = (pp_i·dp + dp_i)·tp + tp_i, tp innermost, then dp, then
pp): a group whose ranks span k consecutive ranks stays in a node when k <= GPUs per node.
bubble: the schedule's idle share (runner/job/metrics.py bubble_fraction_theory, H-pipe's one definition: (p-1)/(m+p-1) for
GPipe and 1F1B, (p-1)/(v·m+p-1) interleaved, (p-1)/(3m+p-1) ZB-H1): the pipelined part of the step lasts
compute / (1 - bubble).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from runner.gpt.config import GPTConfig
from runner.job.metrics import bubble_fraction_theory, model_flops
from runner.planner.byte_counts import rank_parameters
from runner.planner.devices import Devices
from runner.planner.models import Layout, Workload

DEFAULT_EFFICIENCY = 0.5
DEFAULT_LINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one step, by part; `total` is the step."""

    compute_s: float
    bubble_s: float
    tp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    bubble_fraction: float
    flops: float
    efficiency: float

    @property
    def total(self) -> float:
        return self.compute_s + self.bubble_s + self.tp_comm_s + self.pp_comm_s + self.dp_comm_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def group_bandwidth(devices: Devices, span: int, link_efficiency: float) -> float:
    """Bytes/s of a group spanning `span` consecutive ranks: within a node when it fits in one."""
    bw = devices.bw_intra if span <= devices.gpus_per_node else devices.bw_inter
    return bw * link_efficiency


def ring_allreduce_s(nbytes: float, n: int, bw: float) -> float:
    """A ring all-reduce of nbytes over n ranks: each sends 2(n-1)/n x nbytes (Patarasuk & Yuan 2009)."""
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bw


def step_flops(cfg: GPTConfig, work: Workload) -> float:
    """Model FLOPs of a step plus the forwards recomputed under activation checkpointing."""
    flops = model_flops(cfg, work.workload, work.batch, work.seq, work.new_tokens)
    every = work.checkpoint_every if work.workload == "train" else 0
    if every:
        share = (cfg.n_layer // every) / cfg.n_layer  # checkpointed blocks run their forward twice
        flops += flops / 3 * share
    return flops


def predict_step(cfg: GPTConfig, layout: Layout, work: Workload, devices: Devices,
                 efficiency: float = DEFAULT_EFFICIENCY,
                 link_efficiency: float = DEFAULT_LINK_EFFICIENCY) -> StepTime:  # fmt: skip
    """The step time of `work` on `layout` over `devices` (see the module docstring for every term)."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    train = work.workload == "train"
    v = work.chunks_for(layout)
    m = work.microbatches_for(layout)
    flops = step_flops(cfg, work)
    compute = flops / layout.world_size / (devices.peak(work.dtype) * efficiency)
    bubble_fraction = bubble_fraction_theory(work.schedule, pp, m, v) if pp > 1 else 0.0
    bubble = compute * bubble_fraction / (1 - bubble_fraction)
    rows = work.batch // dp
    mb = max(1, rows // m)
    tokens = work.seq if work.workload != "generate" else work.seq + work.new_tokens
    layers = cfg.n_layer // pp
    act = work.activation_width
    # tensor parallel: 2 all-reduces a layer forward (+2 backward) per microbatch
    tp_s = 0.0
    if tp > 1:
        per = ring_allreduce_s(mb * work.seq * cfg.n_embd * act, tp, group_bandwidth(devices, tp, link_efficiency))
        passes = 4 if train else 2
        tp_s = per * passes * layers * m
        if work.workload == "generate":  # one token per decode pass after the prefill
            step = ring_allreduce_s(rows * cfg.n_embd * act, tp, group_bandwidth(devices, tp, link_efficiency))
            tp_s += step * 2 * layers * max(0, work.new_tokens - 1)
        # the vocabulary-parallel loss/logits reductions are small next to these (b·s floats) and left out
    pp_s = 0.0
    if pp > 1:
        bw = group_bandwidth(devices, layout.world_size, link_efficiency)
        width = 2 if work.dtype == "bfloat16" else 4
        msg = mb * tokens * cfg.n_embd * width / bw
        pp_s = (2 if train else 1) * (m * v + pp - 1) * msg
    dp_s = 0.0
    if dp > 1 and train:
        bw = group_bandwidth(devices, tp * dp, link_efficiency)
        psi = max(rank_parameters(cfg, layout, r, v, work.tp_style).total for r in range(pp))
        grad_bytes = psi * work.param_width
        share = (dp - 1) / dp * grad_bytes / bw
        zero = layout.zero_stage
        if zero == 0:
            dp_s = 2 * share
        elif zero in (1, 2):
            dp_s = 3 * share  # all-reduce (or reduce-scatter) of gradients + all-gather of parameters
        else:
            gathers = 2 * m if pp > 1 else 2
            dp_s = (gathers + 1) * share
    return StepTime(compute, bubble, tp_s, pp_s, dp_s, bubble_fraction, flops, efficiency)
