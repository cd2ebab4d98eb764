"""Every tp x pp x dp (x ZeRO) layout of a device count: feasible ones ranked by predicted step time,
infeasible ones with their reason (torch-free).

A layout is feasible when the model splits that way (heads, width, layers, batch divide: `layout_problems`), tensor parallelism stays inside a node (tp divides the GPUs of a node: Megatron's
rule, and the one runner/service/launchers/slurm.py enforces), and the busiest rank's predicted bytes fit in the
device's memory less its reserve. Ranking: predicted step time (runner/planner/step_time.py), then less
memory. `plan()` returns both lists; `Plan.to_dict()` is what `python -m runner plan --json` prints.

Judging is cached per process (`evaluate` by its arguments, a plan's two lists by its inputs; every input is a
frozen dataclass): the Planner page reruns its script on every click, the guide's example and the user's plan
share layouts, and a 512-GPU plan's memory replays every pipeline stage's schedule of hundreds of microbatches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from runner.gpt.config import GPTConfig
from runner.planner.devices import Devices
from runner.planner.memory import RankMemory, layout_memory
from runner.planner.models import GiB, Layout, Workload
from runner.planner.step_time import StepTime, predict_step


@dataclass(frozen=True)
class Candidate:
    """One layout with its predictions; `reasons` is empty when it fits."""

    layout: Layout
    memory: RankMemory | None
    step: StepTime | None
    reasons: tuple[str, ...] = ()
    microbatches: int = 1

    @property
    def feasible(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": lay.zero_stage, "label": lay.label(),
            "microbatches": self.microbatches,
            "feasible": self.feasible, "reasons": list(self.reasons),
            "memory": self.memory.to_dict() if self.memory else None,
            "memory_gib": self.memory.total / GiB if self.memory else None,
            "step": self.step.to_dict() if self.step else None,
            "step_s": self.step.total if self.step else None,
        }  # fmt: skip


@dataclass
class Plan:
    model: GPTConfig
    work: Workload
    devices: Devices
    feasible: list[Candidate] = field(default_factory=list)
    infeasible: list[Candidate] = field(default_factory=list)
    efficiency: float | None = None  # a flat share of peak, or None: matmuls modelled per shape and device kind

    @property
    def best(self) -> Candidate | None:
        return self.feasible[0] if self.feasible else None

    def find(self, tp: int, pp: int, dp: int, zero_stage: int = 0) -> Candidate | None:
        for c in self.feasible + self.infeasible:
            if (c.layout.tp, c.layout.pp, c.layout.dp, c.layout.zero_stage) == (tp, pp, dp, zero_stage):
                return c
        return None

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "workload": self.work.__dict__,
            "devices": self.devices.to_dict(),
            "efficiency": self.efficiency,
            "feasible": [c.to_dict() for c in self.feasible],
            "infeasible": [c.to_dict() for c in self.infeasible],
        }


def layout_problems(cfg: GPTConfig, layout: Layout, work: Workload) -> list[str]:
    """Why this layout cannot run this model at all (divisibility, options), whatever the device."""
    out = []
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    v = work.chunks_for(layout)
    if cfg.n_head % tp:
        out.append(f"n_head {cfg.n_head} not divisible by tp {tp}")
    if cfg.n_embd % tp:
        out.append(f"n_embd {cfg.n_embd} not divisible by tp {tp}")
    if cfg.d_ff % tp:  # the MLP's columns split over the ranks: its own width, whatever n_embd's
        out.append(f"ffn_hidden (MLP width) {cfg.d_ff} not divisible by tp {tp}")
    kv = cfg.kv_heads
    if kv % tp and tp % kv:
        out.append(f"n_kv_head {kv} neither divides nor is divided by tp {tp}")
    if layout.cut:
        if v > 1 or len(layout.cut) != pp or sum(layout.cut) != cfg.n_layer or min(layout.cut) < 0:
            out.append(f"n_layer cut {list(layout.cut)}: one count a stage, {pp} of them, summing to {cfg.n_layer}")
    elif cfg.n_layer % (pp * v):
        what = f"pp {pp} x virtual stages {v}" if v > 1 else f"pp {pp}"
        out.append(f"n_layer {cfg.n_layer} not divisible by {what}")
    if work.batch % dp:
        out.append(f"batch {work.batch} not divisible by dp {dp}")
    else:
        m, rows = work.microbatches_for(layout), work.batch // dp
        if work.microbatch_size and rows % work.microbatch_size:
            out.append(f"batch per replica {rows} not divisible by microbatches of {work.microbatch_size}")
        elif rows % m:
            out.append(f"batch per replica {rows} not divisible by {m} microbatches")
        if v > 1 and m % pp:
            out.append(f"interleaved-1f1b needs microbatches ({m}) to be a multiple of pp {pp}")
    if layout.zero_stage and (dp < 2 or work.workload != "train"):
        out.append("ZeRO needs dp >= 2 and workload train")
    if work.sequence_parallel and tp > 1 and work.seq % tp:
        out.append(f"seq {work.seq} not divisible by tp {tp} (sequence parallelism)")
    if work.seq + (work.new_tokens if work.workload == "generate" else 0) > cfg.block_size:
        out.append(f"seq {work.seq} exceeds the model's block_size {cfg.block_size}")
    return out


# reasons that leave no split of the model to predict memory and time for
UNSPLIT = ("n_head", "n_embd", "ffn_hidden", "n_kv_head", "n_layer", "batch", "interleaved")
STEP_NOTE = ("the lab engine's AdamW step (runner/gpt/precision.py): foreach AdamW's temporary on GPUs, 4 bytes a "
             "stepped parameter (CPU ranks: for-loop AdamW's two of the largest tensor), and under bf16-master the "
             "masters' float32 gradients, 4 more; DeepSpeed and Megatron-LM step differently")


def memory_reason(mem: RankMemory, devices: Devices, sequences: int = 1, one: RankMemory | None = None) -> str:
    """Why a layout's busiest rank does not fit, short enough to read in a table (the reserve: `usable_note`); a
    peak in AdamW's step says how much of it is the lab engine's step (STEP_NOTE), which other engines differ on.
    Where microbatches of `sequences` > 1 do not fit and microbatches of one would (`one`, the same layout's memory
    with microbatch_size 1), it names that fix: gradient accumulation."""
    why = f"needs {mem.total / GiB:.1f} GiB per {devices.word}, you have {devices.usable_bytes / GiB:.1f} GiB"
    if mem.peak_at.startswith("AdamW's step") and mem.optimizer_step_bytes:
        why += f" (peak in AdamW's step: {mem.optimizer_step_bytes / GiB:.1f} GiB of it the lab engine's step buffers)"
    elif sequences > 1 and one is not None and one.total <= devices.usable_bytes:
        why += (f"; microbatches of {sequences} sequences: of 1 (microbatch_size 1, gradients accumulated) it needs "
                f"{one.total / GiB:.1f} GiB")  # fmt: skip
    return why


def usable_note(devices: Devices) -> str:
    """What 'you have' means in a memory reason: the device's memory less what is taken before any tensor."""
    taken = "the process's own" if devices.is_cpu else "CUDA context, allocator slack"
    return (f"you have {devices.usable_bytes / GiB:.1f} GiB of each {devices.word}'s {devices.memory_bytes / GiB:.1f}, "
            f"{devices.reserve_bytes / GiB:.1f} reserved before any tensor ({taken})")  # fmt: skip


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def on_devices(work: Workload, devices: Devices) -> Workload:
    """The workload as it runs on `devices` (CPU ranks: Workload.on_cpu_ranks)."""
    return work.on_cpu_ranks() if devices.is_cpu else work


@functools.lru_cache(maxsize=8192)
def evaluate(cfg: GPTConfig, layout: Layout, work: Workload, devices: Devices,
             efficiency: float | None = None) -> Candidate:  # fmt: skip
    """One layout judged: its reasons not to run, its memory and step time when the model splits that way."""
    work = on_devices(work, devices)
    reasons = list(layout_problems(cfg, layout, work))
    if layout.world_size > devices.count:
        reasons.append(f"needs {layout.world_size} devices, you have {devices.count}")
    if layout.tp > devices.gpus_per_node:
        reasons.append(f"tp {layout.tp} exceeds the {devices.gpus_per_node} {devices.word}s of a node")
    elif devices.gpus_per_node % layout.tp:
        reasons.append(f"tp {layout.tp} does not divide the {devices.gpus_per_node} {devices.word}s of a node")
    split = not any(r.startswith(UNSPLIT) for r in reasons)
    mem = layout_memory(cfg, layout, work) if split else None
    step = predict_step(cfg, layout, work, devices, efficiency) if split else None
    m = work.microbatches_for(layout)
    if mem is not None and mem.total > devices.usable_bytes:
        sequences = work.batch // layout.dp // m if work.workload == "train" else 1
        one = layout_memory(cfg, layout, replace(work, microbatches=0, microbatch_size=1)) if sequences > 1 else None
        reasons.append(memory_reason(mem, devices, sequences, one))
    return Candidate(layout, mem, step, tuple(reasons), m)


# The stages and counts a plan considers unless told: ZeRO 0 and 1 (stage 1 costs one all-gather and saves most of
# the optimizer state), and on up to 8 devices the layouts of fewer too (a node's worth, a short list), else only
# the layouts of every device (the smaller counts' layouts run to tens of thousands). The page and `runner plan`
# both start here, so the same inputs get the same answer.
DEFAULT_ZERO_STAGES = (0, 1)


def uses_every_device_by_default(count: int) -> bool:
    return count > 8


def plan(cfg: GPTConfig, work: Workload, devices: Devices, zero_stages: tuple[int, ...] = (0,),
         efficiency: float | None = None, use_all: bool = True) -> Plan:  # fmt: skip
    """Every tp x pp x dp of devices.count (use_all; else of every count up to it) for each ZeRO stage asked
    (a layout without data parallelism, or not training, takes stage 0), judged and ranked."""
    feasible, infeasible = _judged(cfg, work, devices, tuple(zero_stages), efficiency, use_all)
    return Plan(cfg, work, devices, list(feasible), list(infeasible), efficiency)


@functools.lru_cache(maxsize=64)
def _judged(cfg: GPTConfig, work: Workload, devices: Devices, zero_stages: tuple[int, ...], efficiency: float,
            use_all: bool) -> tuple[tuple[Candidate, ...], tuple[Candidate, ...]]:  # fmt: skip
    """plan()'s two lists, ranked (cached: each call of plan gets lists of its own)."""
    counts = [devices.count] if use_all else list(range(1, devices.count + 1))
    feasible: list[Candidate] = []
    infeasible: list[Candidate] = []
    for n in counts:
        for tp in divisors(n):
            for pp in divisors(n // tp):
                dp = n // tp // pp
                shardable = dp > 1 and work.workload == "train"
                for z in sorted({z if shardable else 0 for z in zero_stages}):
                    c = evaluate(cfg, Layout(tp, pp, dp, z), work, devices, efficiency)
                    (feasible if c.feasible else infeasible).append(c)
    feasible.sort(key=lambda c: (c.step.total, c.memory.total))  # type: ignore[union-attr]
    infeasible.sort(key=lambda c: (len(c.reasons), c.memory.total if c.memory else float("inf")))
    return tuple(feasible), tuple(infeasible)


# The guide's GPT-3 175B example, answered (issue 15 item 5): Brown et al. 2020 trained on 3.2M-token
# batches (1536 sequences of 2048); Megatron-style settings that make it fit: bf16-mixed, ZeRO-1 over the
# 16 replicas, every block checkpointed, 1F1B with microbatches of one sequence.
GUIDE_175B_WORK = Workload(workload="train", batch=1536, seq=2048, dtype="bf16-mixed", checkpoint="blocks",
                           schedule="1f1b", sequence_parallel=False)  # fmt: skip
GUIDE_175B_LAYOUT = Layout(tp=4, pp=8, dp=16, zero_stage=1)
GUIDE_LAYOUTS: tuple[Layout, ...] = (
    GUIDE_175B_LAYOUT,  # the guide: 8-way pipeline x 4-way tensor x 16-way data
    replace(GUIDE_175B_LAYOUT, zero_stage=0),  # the same unsharded
    Layout(tp=8, pp=8, dp=8, zero_stage=1),  # Megatron-LM 2021's choice for 175B-class (t=8 within a node)
    Layout(tp=8, pp=16, dp=4, zero_stage=1),
    Layout(tp=1, pp=8, dp=1),  # the guide's model-parallel example: 8 GPUs of ~22B parameters each
    Layout(tp=1, pp=1, dp=512, zero_stage=3),  # pure sharded data parallelism
    Layout(tp=1, pp=1, dp=1),  # one GPU
)
