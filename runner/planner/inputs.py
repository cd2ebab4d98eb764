"""The planner's inputs checked before anything is planned: one function, `input_problems`, for the CLI
(`python -m runner plan`) and the Planner page alike (torch-free).

Each problem is a runner.spec.run_spec.SpecProblem naming the field (the planner's own name: `efficiency`,
`virtual_stages`, `gpus`, ...; the CLI prints it as its flag) and saying how to fix it. Nothing here plans: a
value that passes is one the planner's arithmetic can take (no division by zero, no negative step time);
whether a layout fits is the planner's answer, not an input problem. The model parts the user gave (n_kv_head,
ffn_hidden, rope_theta) are held to `submit`'s own rules, runner/spec/validation.py's (`part_problems`). A device
count above one node must fill whole nodes. `zero_stages` reads the ZeRO stages to consider ("0,1,3", or a list)
as the rules here accept them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from runner.gpt.config import GPTConfig, model_problems
from runner.planner.models import Workload
from runner.spec.run_spec import (
    DTYPES,
    MODEL_DIMS,
    SCHEDULES,
    WORKLOADS,
    RunSpec,
    SpecProblem,
    checkpoint_interval,
)
from runner.spec.validation import validate_spec

ZERO_CHOICES = (0, 1, 2, 3)
MICROBATCHES_HELP = ("per replica, gradients accumulated over them; 0: one sequence each when pipelined, else the whole "
                     "batch as one")  # fmt: skip
# The largest global batches published are a few thousand sequences (GPT-3 175B: 3.2M tokens of 2,048, about 1,560
# sequences, Brown et al. 2020 table 2.1; Llama 3 405B: 16M tokens of 8,192, 2,048, Llama Team 2024 section 3.4.1):
# 32 times the largest is a typo, and a plan's schedule simulates every microbatch (65,536 of them: seconds; a
# billion filled the memory).
MAX_BATCH = 65536
DEFAULT_SEQ = 1024  # a plan's sequence unless given: Llama 3's 131,072-position context is not what a step trains on


def default_seq(block_size: int) -> int:
    """The sequence a plan takes unless given, on the page and the CLI alike: the model's context, at most
    DEFAULT_SEQ (1 for a model without one)."""
    return max(1, min(block_size, DEFAULT_SEQ))

MICROBATCH_SIZE_HELP = "sequences per microbatch (Megatron's --micro-batch-size), instead of a count of microbatches"
CHECKED_PARTS = ("n_kv_head", "ffn_hidden", "rope_theta")  # the model parts submit's rules check when given


def zero_stages(value: str | Sequence[int]) -> tuple[tuple[int, ...], list[SpecProblem]]:
    """The ZeRO stages asked ("0,1,3" or a list), sorted and unique, with a problem for anything that is not one."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    stages: set[int] = set()
    bad = []
    for item in items:
        if item == "":
            continue
        try:
            stage = int(item)
        except (TypeError, ValueError):
            bad.append(repr(item))
            continue
        (stages.add(stage) if stage in ZERO_CHOICES else bad.append(repr(item)))
    problems = []
    if bad:
        problems.append(SpecProblem("zero", f"{', '.join(bad)} is not a ZeRO stage; give stages 0 to 3 separated "
                                            "by commas, e.g. 0,1 (0: plain data parallelism)"))  # fmt: skip
    elif not stages:
        problems.append(SpecProblem("zero", "names no stage; give at least one of 0, 1, 2, 3, e.g. 0"))
    return tuple(sorted(stages)), problems


def part_problems(cfg: GPTConfig, parts: Mapping[str, Any]) -> list[SpecProblem]:
    """`submit`'s own rules for the model parts the user gave (runner/spec/validation.py: n_kv_head and ffn_hidden at
    least 1, rope_theta positive and finite, and only on a rotary family): asked of a spec of this model carrying
    them, keeping its problems with those parts only (its others are about a run, not a plan)."""
    given = {k: parts[k] for k in CHECKED_PARTS if parts.get(k) is not None}
    if not given:
        return []
    # cuda without a GPU count: validate_spec leaves this host's cores and memory alone (a plan is not run here)
    spec = RunSpec(model="custom", **{d: getattr(cfg, d) for d in MODEL_DIMS}, family=cfg.family,
                   tie_head=cfg.tie_head, batch=1, seq=1, device="cuda", **given)  # fmt: skip
    return [p for p in validate_spec(spec, check_weights=False) if p.field in given]


def _positive(add, name: str, value: float | None, what: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        add(name, f"must be a positive {what} (got {value})")


def input_problems(
    cfg: GPTConfig,
    work: Workload,
    *,
    parts: Mapping[str, Any] | None = None,
    zero: str | Sequence[int] = (0,),
    efficiency: float | None = None,
    gpus: int = 1,
    gpus_per_node: int | None = None,
    usual_per_node: int | None = None,
    memory_gib: float | None = None,
    tflops: float | None = None,
    bw_intra: float | None = None,
    bw_inter: float | None = None,
    top: int = 1,
) -> list[SpecProblem]:
    """Every problem with a plan's inputs, each naming its field and the fix; [] means the planner can run.

    cfg: the model with any custom dimensions applied; parts: the custom dimensions and parts as given (None: not
    given), for the rules that depend on what the user set; work: the workload as asked; efficiency None: modelled per
    matmul; gpus_per_node as given, usual_per_node the node the devices have without it (None: whole nodes by
    construction, this host or a partition); the rest as the CLI and the page take them (device fields None when
    not described by hand)."""
    p: list[SpecProblem] = []

    def add(field: str, message: str) -> None:
        p.append(SpecProblem(field, message))

    for dim in MODEL_DIMS:
        value = getattr(cfg, dim)
        if value < 1:
            add(dim, f"must be at least 1 (got {value})")
    if cfg.n_head >= 1 and cfg.n_embd >= 1 and cfg.n_embd % cfg.n_head:
        heads = ", ".join(str(d) for d in range(1, min(cfg.n_embd, 256) + 1) if cfg.n_embd % d == 0)
        add("n_head", f"n_embd {cfg.n_embd} must be divisible by n_head {cfg.n_head}; pick n_head among {heads}")
    p += part_problems(cfg, parts or {})  # first: a part's own rule (n_kv_head 0) says more than how it divides
    if all(getattr(cfg, dim) >= 1 for dim in MODEL_DIMS):  # the family's parts: key/value heads, rotary pairs
        for field, message in model_problems(cfg):
            if not any(q.field == field for q in p):
                add(field, message)
    if work.workload not in WORKLOADS:
        add("workload", f"'{work.workload}' is not allowed; choose one of {', '.join(WORKLOADS)}")
    if work.dtype not in DTYPES:
        add("dtype", f"'{work.dtype}' is not allowed; choose one of {', '.join(DTYPES)}")
    elif work.reduce_fp32 and work.dtype not in ("bfloat16", "bf16-master"):
        add("reduce_fp32", f"reduces 16-bit gradients in float32; under {work.dtype} they are float32 already: turn it "
                           "off, or choose dtype bf16-master or bfloat16")  # fmt: skip
    if work.schedule not in SCHEDULES:
        add("schedule", f"'{work.schedule}' is not allowed; choose one of {', '.join(SCHEDULES)}")
    _workload_problems(cfg, work, add)
    p += zero_stages(zero)[1]
    if efficiency is not None and not (math.isfinite(efficiency) and 0 < efficiency <= 1):
        add("efficiency", f"is the share of the devices' peak FLOP/s reached, above 0 and at most 1 (got {efficiency}); "
                          "0.5 is typical of large runs")  # fmt: skip
    if gpus < 1:
        add("gpus", f"must be at least 1 device (got {gpus})")
    if gpus_per_node is not None and gpus_per_node < 1:
        add("gpus_per_node", f"must be at least 1 (got {gpus_per_node}); leave it out for the kind's usual node")
    elif gpus >= 1:
        _whole_nodes(add, gpus, gpus_per_node, usual_per_node)
    _positive(add, "memory_gib", memory_gib, "number of GiB per device")
    _positive(add, "tflops", tflops, "bfloat16 peak in TFLOP/s")
    _positive(add, "bw_intra", bw_intra, "bandwidth in GB/s")
    _positive(add, "bw_inter", bw_inter, "bandwidth in GB/s")
    if top < 1:
        add("top", f"must be at least 1 row (got {top})")
    return p


def _whole_nodes(add, gpus: int, given: int | None, usual: int | None) -> None:
    """More GPUs than a node must fill whole nodes: a run takes nodes x GPUs a node (the Slurm launcher refuses any
    other world size, runner/service/launchers/slurm.py), so a plan of 8 GPUs on nodes of 3 plans a cluster nobody
    has. Fewer than a node are part of one. Blamed on gpus_per_node when given, else on gpus."""
    per = given or (min(gpus, usual) if usual else None)
    if per is None or gpus <= per or gpus % per == 0:
        return
    fits = ", ".join(str(d) for d in range(1, gpus + 1) if gpus % d == 0)
    add("gpus_per_node" if given else "gpus",
        f"{gpus} GPUs do not fill whole nodes of {per} (a run takes whole nodes): give gpus a multiple of {per} "
        f"({gpus // per * per} or {(gpus // per + 1) * per}), or gpus_per_node one of {fits}")  # fmt: skip


def _workload_problems(cfg: GPTConfig, work: Workload, add) -> None:
    """The batch, sequence, microbatching, schedule and checkpointing of `work` against the model."""
    train = work.workload == "train"
    if work.batch < 1:
        add("batch", f"must be at least 1 sequence (got {work.batch}): the global batch over all replicas")
    elif work.batch > MAX_BATCH:
        add("batch", f"at most {MAX_BATCH:,} sequences (got {work.batch:,}): the global batch over all replicas, "
                     "which published runs keep to a few thousand; a plan simulates each microbatch")  # fmt: skip
    if work.seq < 1:
        add("seq", f"must be at least 1 token (got {work.seq})")
    elif cfg.block_size >= 1:
        extra = work.new_tokens if work.workload == "generate" else 0
        if work.seq + extra > cfg.block_size:
            plus = f" plus {extra} new tokens" if extra else ""
            add("seq", f"seq {work.seq}{plus} exceeds the model's block_size {cfg.block_size}; lower seq"
                       f"{' or new_tokens' if extra else ''}, or raise block_size")  # fmt: skip
    if work.new_tokens < 1:
        add("new_tokens", f"must be at least 1 (got {work.new_tokens})")
    if work.microbatches < 0:
        add("microbatches", f"must be 0 (one sequence each when pipelined, else the whole batch) or more "
                            f"(got {work.microbatches})")  # fmt: skip
    if work.microbatch_size < 0:
        add("microbatch_size", f"must be 0 (not given) or a number of sequences (got {work.microbatch_size})")
    if work.microbatches > 0 and work.microbatch_size > 0:
        add("microbatch_size", "give microbatches (a count) or microbatch_size (sequences each), not both")
    elif work.microbatch_size > work.batch >= 1:
        add("microbatch_size", f"{work.microbatch_size} sequences is more than the global batch of {work.batch}; "
                               "lower it or raise batch")  # fmt: skip
    if work.virtual_stages < 1:
        add("virtual_stages", f"must be at least 1 model chunk per pipeline rank (got {work.virtual_stages})")
    elif work.virtual_stages > 1 and work.schedule != "interleaved-1f1b":
        add("virtual_stages", f"only the interleaved-1f1b schedule runs several model chunks per rank (schedule is "
                              f"{work.schedule}): set virtual_stages to 1, or schedule to interleaved-1f1b")  # fmt: skip
    elif work.schedule == "interleaved-1f1b" and work.virtual_stages < 2:
        add("virtual_stages", "interleaved-1f1b needs at least 2 model chunks per rank (with 1 it is plain 1f1b): "
                              "set virtual_stages to 2 or more, or schedule to 1f1b")  # fmt: skip
    try:
        checkpoint_interval(work.checkpoint)
    except ValueError:
        add("checkpoint", f"'{work.checkpoint}' is not allowed; choose none, blocks, or every-K with K a whole "
                          "number of 1 or more (every-2 checkpoints every second block)")  # fmt: skip
    else:
        if work.checkpoint != "none" and not train:
            add("checkpoint", f"recomputes activations during backward; workload '{work.workload}' has none: set "
                              "checkpoint to none or workload to train")  # fmt: skip

