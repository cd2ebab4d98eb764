"""RunSpec validation: every problem at once, each naming its field and saying how to fix it.

`validate_spec` (what `runner.api.submit` calls) checks in order: choices and positive numbers; then the
strategy from the registry (unused fields neutral, minimum degrees, the strategy's own rules, ranks on one
machine); the model against the degrees; batch and sequence shapes; the devices; this host's cores and
memory for CPU runs; the files it names, a weights file's layout against the chosen model and a corpus
(runner/spec/file_checks.py). No per-strategy tables live here:
what a strategy uses and needs is its file's in runner/spec/strategies.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from runner.gpt.config import FAMILIES, PRESETS, model_problems
from runner.job.checkpoint import (
    is_hf_folder,
)
from runner.spec.estimates import host_memory_estimate
from runner.spec.file_checks import validate_data, validate_weights
from runner.spec.run_spec import (
    DEVICES,
    DTYPES,
    FROM_WEIGHTS,
    MODEL_DIMS,
    MODEL_PARTS,
    SCHEDULES,
    TP_STYLES,
    WORKLOADS,
    ZERO_STAGES,
    RunSpec,
    SpecProblem,
    usable_cores,
)
from runner.spec.strategies import NEUTRAL, Strategy, get_strategy, strategy_names, users_of
from runner.spec.strategies.registry import Add

MAX_WORLD_SIZE = 64
CPU_RANKS_PER_CORE = 4  # beyond this, time-slicing makes a CPU run's figures meaningless and the machine crawl


def validate_spec(spec: RunSpec, gpu_count: int | None = None, check_weights: bool = True,
                  no_gpu_reason: str | None = None) -> list[SpecProblem]:  # fmt: skip
    """Every problem with `spec`, each naming its field and the fix; [] means runnable.

    gpu_count: GPUs the runner may use (None: unknown, device and CPU-placement checks use 'cpu' only);
    no_gpu_reason: the runner's sentence why it has none (runner/service/devices.py), said when cuda is refused.
    """
    p: list[SpecProblem] = []

    def add(field: str, message: str) -> None:
        p.append(SpecProblem(field, message))

    _validate_fields(spec, add)
    if p:  # the checks below combine fields: run only those whose fields all passed, so every problem shows at once
        bad = {problem.field for problem in p}
        # A refused rotary base sizes nothing the checks below reason from: they judge the rest with the family's own
        # (a bad rope_theta hid the key/value heads' problem until it was mended).
        judged = replace(spec, rope_theta=None) if "rope_theta" in bad else spec
        bad -= {"rope_theta"}
        if not bad & _MODEL_READS:
            _validate_model(judged, add)
        if not bad & _CONTEXT_READS:
            _validate_context(judged, add)
        if not bad & _DATA_READS:
            validate_data(judged, add)
        return p
    _validate_strategy(spec, get_strategy(spec.strategy), add)
    _validate_options(spec, add)
    _validate_model(spec, add)
    _validate_context(spec, add)
    _validate_batch(spec, add)
    _validate_device(spec, add, gpu_count, no_gpu_reason)
    _validate_host_resources(spec, add, gpu_count)
    if spec.weights and check_weights:
        validate_weights(spec, add)
    validate_data(spec, add)
    return p


# What the cross-field checks read (besides fields _validate_fields never refuses): one of them refused, the check
# would reason from a value the user must change anyway.
_MODEL = {"model", "weights", *MODEL_DIMS, *MODEL_PARTS}
_MODEL_READS = {*_MODEL, "tp", "pp", "dp", "strategy"}  # spec.degrees checks all three
_CONTEXT_READS = {*_MODEL, "seq", "new_tokens", "workload"}
_DATA_READS = {*_MODEL, "data", "workload", "prompt", "eval_every", "seq"}  # a batch under 1 fills any corpus


def _validate_fields(spec: RunSpec, add: Add) -> None:
    """Each field alone: known choices, positive numbers, a complete custom model."""
    names = strategy_names()
    if spec.strategy not in names:
        add("strategy", f"'{spec.strategy}' is not a strategy; choose one of {', '.join(names)}")
    _choice(add, "workload", spec.workload, WORKLOADS)
    _choice(add, "schedule", spec.schedule, SCHEDULES)
    _choice(add, "tp_style", spec.tp_style, TP_STYLES)
    _choice(add, "device", spec.device, DEVICES)
    _choice(add, "dtype", spec.dtype, DTYPES)
    if spec.model not in PRESETS and spec.model not in ("custom", FROM_WEIGHTS):
        add(
            "model",
            f"'{spec.model}' is not a preset; choose one of {', '.join(PRESETS)}, 'custom' with n_layer, n_head, n_embd, "
            f"vocab_size, block_size, or '{FROM_WEIGHTS}' with weights a Hugging Face folder",
        )
    if spec.model == "custom":
        for dim in MODEL_DIMS:
            if getattr(spec, dim) is None:
                add(dim, f"a custom model needs {dim}; set it or pick a preset")
    if spec.model == FROM_WEIGHTS:
        if not is_hf_folder(spec.weights):
            add("weights", f"model '{FROM_WEIGHTS}' takes its dimensions from a Hugging Face folder's config.json: "
                           "set weights to that folder, or pick a preset")  # fmt: skip
        for name in (*MODEL_DIMS, *MODEL_PARTS):
            if getattr(spec, name) is not None:
                add(name, f"the checkpoint's config.json gives {name}; leave it empty")
    if spec.family is not None and spec.family not in FAMILIES:
        add("family", f"'{spec.family}' is not a family; choose one of {', '.join(FAMILIES)} or leave it empty")
    for name in ("n_kv_head", "ffn_hidden"):
        v = getattr(spec, name)
        if v is not None and v < 1:
            add(name, f"must be at least 1 (got {v}); leave it empty for the preset's")
    if spec.rope_theta is not None and not (spec.rope_theta > 0 and math.isfinite(spec.rope_theta)):
        add("rope_theta", f"must be a positive number (got {spec.rope_theta}), e.g. 10000 or 500000")
    if spec.zero_stage not in ZERO_STAGES:
        add("zero_stage", f"must be one of {', '.join(map(str, ZERO_STAGES))} (got {spec.zero_stage}): 0 plain data "
                          "parallelism, 1 optimizer state sharded, 2 and gradients, 3 and parameters")  # fmt: skip
    try:
        _ = spec.checkpoint_every
    except ValueError:
        add("checkpoint", f"'{spec.checkpoint}' is not allowed; choose none, blocks, or every-K with K a whole number "
                          "of 1 or more (every-2 checkpoints every second block)")  # fmt: skip
    if spec.nodes is not None and spec.nodes < 1:
        add("nodes", f"must be at least 1 (got {spec.nodes}); leave it empty to let the runner decide")
    for name in ("tp", "pp", "dp", "microbatches", "virtual_stages", "batch", "seq", "steps"):
        if getattr(spec, name) < 1:
            add(name, f"must be at least 1 (got {getattr(spec, name)})")
    for dim in MODEL_DIMS:
        v = getattr(spec, dim)
        if v is not None and v < 1:
            add(dim, f"must be at least 1 (got {v})")
    if spec.warmup < 0:
        add("warmup", f"must be 0 or more (got {spec.warmup})")
    if spec.eval_every < 0:
        add("eval_every", f"must be 0 (no held-out loss) or more steps (got {spec.eval_every})")
    if spec.new_tokens < 1:
        add("new_tokens", f"must be at least 1 (got {spec.new_tokens})")
    if not (spec.lr > 0 and math.isfinite(spec.lr)):
        add("lr", f"must be a positive number (got {spec.lr})")
    if not (spec.time_limit_s > 0 and math.isfinite(spec.time_limit_s)):
        add("time_limit_s", f"must be a positive number of seconds (got {spec.time_limit_s})")
    if spec.seed < 0:
        add("seed", f"must be 0 or more (got {spec.seed})")
    for tag in spec.tags:
        if not tag.strip() or len(tag) > 64:
            add("tags", f"each tag must be 1 to 64 characters (got {tag!r})")


def _validate_strategy(spec: RunSpec, s: Strategy, add: Add) -> None:
    """What the registry says: unused fields keep their neutral value, used degrees reach their minimum,
    the strategy's own rules hold, and the ranks fit on one machine."""
    for name, neutral in NEUTRAL.items():
        value = getattr(spec, name)
        if s.uses(name) or value == neutral:
            continue
        others = users_of(name)
        alternative = f" or pick a strategy that uses it ({', '.join(others)})" if others else ""
        add(name, f"strategy '{s.name}' does not use {name}; set {name} to {json.dumps(neutral)}{alternative}")
    for name, least in s.min_degree.items():
        value = getattr(spec, name)
        if value < least:
            add(
                name,
                f"strategy '{s.name}' needs at least {least} ranks in {name} (got {value}); set {name} to {least} or more, or use strategy 'single'",
            )
    s.check(spec, add)
    if spec.world_size > MAX_WORLD_SIZE:
        add("strategy", f"needs {spec.world_size} ranks; at most {MAX_WORLD_SIZE} run on one machine")


def _validate_options(spec: RunSpec, add: Add) -> None:
    """Options that need a workload or another option: ZeRO and checkpointing shard or drop what only training
    has; virtual stages belong to the interleaved schedule, which needs them and its own divisibility."""
    s = get_strategy(spec.strategy)  # an option the strategy does not use is refused once, as unused
    if spec.zero_stage and s.uses("zero_stage") and spec.workload != "train":
        add("zero_stage", f"ZeRO shards optimizer state, gradients and (stage 3) the weights of a training step; "
                          f"workload '{spec.workload}' has none to shard: set zero_stage to 0 or workload to train")  # fmt: skip
    elif spec.zero_stage and s.uses("zero_stage") and spec.degrees.dp < 2:
        add("zero_stage", "ZeRO shards over the data-parallel replicas: set dp to 2 or more, or zero_stage to 0")
    if spec.reduce_fp32 and spec.dtype not in ("bfloat16", "bf16-master"):
        add("reduce_fp32", f"reduces 16-bit gradients in float32; under dtype '{spec.dtype}' they are float32 already: "
                           "turn reduce_fp32 off, or choose dtype bf16-master or bfloat16")  # fmt: skip
    elif spec.reduce_fp32 and (spec.workload != "train" or spec.degrees.dp < 2):
        add("reduce_fp32", "reduces the gradients over data-parallel replicas: train with dp 2 or more, or turn "
                           "reduce_fp32 off")  # fmt: skip
    if spec.checkpoint != "none" and spec.workload != "train":
        add("checkpoint", f"checkpointing recomputes activations during backward; workload '{spec.workload}' has no "
                          "backward: set checkpoint to none or workload to train")  # fmt: skip
    interleaved = spec.schedule == "interleaved-1f1b" and s.uses("virtual_stages")
    if spec.virtual_stages > 1 and s.uses("virtual_stages") and not interleaved:
        add("virtual_stages", "only the interleaved-1f1b schedule runs several model chunks per rank: set "
                              "virtual_stages to 1, or schedule to interleaved-1f1b")  # fmt: skip
    if not interleaved:
        return
    pp, v = spec.degrees.pp, spec.virtual_stages
    if pp < 2:
        add("schedule", "interleaved-1f1b interleaves model chunks over the pipeline's ranks: set pp to 2 or more, "
                        "or choose gpipe or 1f1b")  # fmt: skip
        return
    if v < 2:
        add("virtual_stages", "interleaved-1f1b needs at least 2 model chunks per rank (with 1 it is plain 1f1b): "
                              "set virtual_stages to 2 or more")  # fmt: skip
    cfg = spec.model_config()
    if cfg.n_layer % (pp * v):
        add("virtual_stages", f"{pp} ranks x {v} chunks = {pp * v} chunks must divide the model's {cfg.n_layer} "
                              f"layers; use virtual_stages in {_divisors(max(1, cfg.n_layer // pp))} with pp {pp}")  # fmt: skip
    if spec.microbatches % pp:
        add("microbatches", f"interleaved-1f1b sends microbatches round the {pp} ranks in groups of {pp}: use a "
                            f"multiple of {pp} microbatches")  # fmt: skip


def _validate_model(spec: RunSpec, add: Add) -> None:
    """The model's heads against its width and key/value heads, and its layers and heads against the pp and tp
    splits (key/value heads split over tp ranks, or each copied to tp / n_kv_head of them)."""
    cfg = spec.model_config()
    name = "the custom model" if spec.model == "custom" else f"the {spec.model} model"
    tp, pp, _ = spec.degrees
    for field, message in model_problems(cfg):
        add(field, message)
    kv = cfg.kv_heads
    if spec.rope_theta is not None and not cfg.rotary:
        add("rope_theta", "the gpt2 family has learned positions, not rotary ones: leave rope_theta empty, or set "
                          "family to llama")  # fmt: skip
    if pp > 1 and cfg.n_layer % pp:
        add(
            "pp",
            f"splitting the layers over {pp} ranks needs n_layer divisible by {pp}; {name} has {cfg.n_layer} layers, so use pp in {_divisors(cfg.n_layer)}",
        )
    if tp > 1:
        if cfg.n_head % tp:
            add(
                "tp",
                f"splitting the heads over {tp} ranks needs n_head divisible by {tp}; {name} has {cfg.n_head} heads, so use tp in {_divisors(cfg.n_head)}",
            )
        if cfg.d_ff % tp:
            add("tp", f"the MLP width {cfg.d_ff} must be divisible by tp {tp}")
        if kv % tp and tp % kv:
            add("tp", f"{name}'s {kv} key/value heads go over {tp} ranks either split (tp divides n_kv_head) or "
                      f"each copied to tp / n_kv_head ranks (n_kv_head divides tp); use tp in "
                      f"{_kv_degrees(kv, cfg.n_head)}")  # fmt: skip


def _validate_context(spec: RunSpec, add: Add) -> None:
    """Tokens against the model's context."""
    if spec.prompt is not None and spec.workload == "generate":
        return  # the prompt's tokens are the sequence: validate_data holds them against the context
    cfg = spec.model_config()
    tokens = spec.seq + (spec.new_tokens if spec.workload == "generate" else 0)
    if tokens > cfg.block_size:
        extra = f" plus {spec.new_tokens} new tokens" if spec.workload == "generate" else ""
        add("seq", f"seq {spec.seq}{extra} exceeds the model's block_size {cfg.block_size}; lower seq or new_tokens")


def _validate_batch(spec: RunSpec, add: Add) -> None:
    """The batch against dp replicas and microbatches."""
    _, _, dp = spec.degrees
    if spec.batch % dp:
        add("batch", f"batch {spec.batch} must be divisible by dp {dp}; use a multiple of {dp}")
    elif spec.uses_microbatches and (spec.batch // dp) % spec.microbatches:
        add(
            "microbatches",
            f"each replica's batch of {spec.batch // dp} must split into {spec.microbatches} equal microbatches; use a batch that is a multiple of {dp * spec.microbatches}",
        )


def _validate_device(spec: RunSpec, add: Add, gpu_count: int | None, no_gpu_reason: str | None) -> None:
    if gpu_count is None:
        return
    if spec.device == "cuda" and gpu_count == 0:
        add("device", f"is 'cuda' but {no_gpu_reason or 'no NVIDIA GPU is visible'}; choose 'cpu' or 'auto'")
    elif spec.device == "cuda" and spec.world_size > gpu_count:
        add(
            "device",
            f"{spec.world_size} ranks need {spec.world_size} GPUs but {gpu_count} are visible; lower the degrees or choose 'cpu'",
        )
    if spec.warmup == 0 and gpu_count > 0 and spec.resolved_device(gpu_count) == "cuda":
        # CPU runs may time their very first step; on CUDA it pays once for cuBLAS handles and workspaces, the
        # caching allocator's first blocks, kernel loading and NCCL's point-to-point connections.
        add("warmup", "is 0 but on CUDA the first step pays one-time set-up (cuBLAS handles and workspaces, the "
                      "allocator's first blocks, NCCL's point-to-point connections); use warmup 1 or more")  # fmt: skip


def _validate_host_resources(spec: RunSpec, add: Add, gpu_count: int | None) -> None:
    """Upper bounds for a CPU run on this machine: ranks against cores, memory against RAM.

    Checked where the run is placed too (the runner validates again on its own host), so a spec
    queued from a bigger machine is refused with the limit of the one that would run it.
    """
    on_cpu = spec.device == "cpu" or (gpu_count is not None and spec.resolved_device(gpu_count) == "cpu")
    if not on_cpu:
        return
    cores = usable_cores()
    if spec.world_size > CPU_RANKS_PER_CORE * cores:
        add(
            _widest_degree(spec),
            f"{spec.world_size} CPU ranks on {cores} core{'s' if cores != 1 else ''} is more than the "
            f"{CPU_RANKS_PER_CORE * cores} ({CPU_RANKS_PER_CORE} per core) this machine can time-slice; lower the degrees",
        )
    need = host_memory_estimate(spec)
    total = _host_memory_bytes()
    if total and need > total:
        held = ("weights, gradients, optimizer state and the activations" if spec.workload == "train"
                else "weights, the KV cache and the activations" if spec.workload == "generate"
                else "weights and the activations")  # fmt: skip
        least = replace(spec, batch=spec.degrees.dp * spec.microbatches, seq=1, new_tokens=1)  # the smallest work
        weights = host_memory_estimate(least)  # what no lower batch or seq saves
        fix = (f"use a smaller model: even at the least batch and seq it needs {weights / 2**30:.1f} GiB" if weights > total
               else "lower batch or seq, or use a smaller model")  # fmt: skip
        add(
            "batch" if weights <= total else "model",
            f"needs about {need / 2**30:.1f} GiB over its {spec.world_size} rank(s) ({held} of batch {spec.batch} x "
            f"seq {spec.seq}) but this machine has {total / 2**30:.1f} GiB; {fix}",
        )


def _widest_degree(spec: RunSpec) -> str:
    """The degree that contributes most ranks (the field to lower), or 'strategy' for a single rank."""
    tp, pp, dp = spec.degrees
    return max((("tp", tp), ("pp", pp), ("dp", dp)), key=lambda d: d[1])[0] if spec.world_size > 1 else "strategy"


def _host_memory_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except (ImportError, OSError):
        return None


def _choice(add: Add, name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        add(name, f"'{value}' is not allowed; choose one of {', '.join(options)}")


def _kv_degrees(kv: int, n_head: int) -> str:
    """tp degrees that keep heads whole: dividing n_head, and dividing or divided by the key/value heads."""
    return ", ".join(str(t) for t in range(1, 65) if n_head % t == 0 and (kv % t == 0 or t % kv == 0))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)
