"""RunSpec: the one description of a run, and its validation into readable, per-field problems.

Pages, the CLI, the runner and the rank processes all speak RunSpec. It imports no torch, so the
app can validate a form instantly. `validate()` returns every problem at once, each naming the
field and the fix; nothing with a problem is ever queued.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from runner.checkpoint import checkpoint_shapes
from runner.gpt.config import PRESETS, GPTConfig, count_parameters

STRATEGIES = ("single", "layer", "tensor", "pipeline", "data", "3d")
# Strategies the rank code implements today; the rest answer "not supported yet" in validate().
IMPLEMENTED_STRATEGIES = frozenset(STRATEGIES)
WORKLOADS = ("forward", "generate", "train")
SCHEDULES = ("gpipe", "1f1b")
TP_STYLES = ("megatron", "gather")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")
MODEL_DIMS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
MAX_WORLD_SIZE = 64


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a spec: the field it concerns and a sentence saying how to fix it."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecError(ValueError):
    """Raised where a spec must be valid; carries every problem found."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class RunSpec:
    strategy: str = "single"
    tp: int = 1
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    tp_style: str = "megatron"
    sequence_parallel: bool = False
    model: str = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    vocab_size: int | None = None
    block_size: int | None = None
    workload: str = "train"
    batch: int = 8
    seq: int = 64
    new_tokens: int = 16
    steps: int = 5
    warmup: int = 1
    lr: float = 1e-3
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    verify: bool = False
    weights: str | None = None
    time_limit_s: float = 600.0
    tags: tuple[str, ...] = field(default_factory=tuple)

    # ---- derived -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of rank processes torchrun starts for this spec."""
        return {
            "single": 1,
            "layer": self.pp,
            "tensor": self.tp,
            "pipeline": self.pp,
            "data": self.dp,
            "3d": self.tp * self.pp * self.dp,
        }.get(self.strategy, 1)

    @property
    def degrees(self) -> tuple[int, int, int]:
        """(tp, pp, dp) as the mesh lays ranks out; degrees a strategy does not use count as 1."""
        s = self.strategy
        tp = self.tp if s in ("tensor", "3d") else 1
        pp = self.pp if s in ("layer", "pipeline", "3d") else 1
        dp = self.dp if s in ("data", "3d") else 1
        return tp, pp, dp

    @property
    def uses_microbatches(self) -> bool:
        return self.strategy in ("pipeline", "3d")

    def model_config(self) -> GPTConfig:
        """The preset with any custom dimensions applied (a checkpoint's dims are checked in validate)."""
        base = PRESETS.get(self.model, PRESETS["tiny"])
        overrides = {k: getattr(self, k) for k in MODEL_DIMS if getattr(self, k) is not None}
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # ---- parsing -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> RunSpec:
        """Build a spec from JSON-like data; raises SpecError naming every unknown or mistyped field."""
        if not isinstance(data, dict):
            raise SpecError([SpecProblem("spec", "must be a JSON object of field: value pairs")])
        problems: list[SpecProblem] = []
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                problems.append(SpecProblem(str(key), f"is not a spec field; known fields are {', '.join(known)}"))
                continue
            try:
                values[key] = _coerce(key, value)
            except (TypeError, ValueError) as exc:
                problems.append(SpecProblem(key, str(exc)))
        if problems:
            raise SpecError(problems)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError([SpecProblem("spec", f"is not valid JSON ({exc.msg} at line {exc.lineno})")]) from exc
        return cls.from_dict(data)

    # ---- validation ----------------------------------------------------------------------
    def validate(self, gpu_count: int | None = None, check_weights: bool = True) -> list[SpecProblem]:
        """Every problem with this spec, each naming its field and the fix; [] means runnable.

        gpu_count: GPUs visible to the runner (None: unknown, device checks skipped).
        """
        p: list[SpecProblem] = []
        add = lambda f, m: p.append(SpecProblem(f, m))  # noqa: E731

        if self.strategy not in STRATEGIES:
            add("strategy", f"'{self.strategy}' is not a strategy; choose one of {', '.join(STRATEGIES)}")
        elif self.strategy not in IMPLEMENTED_STRATEGIES:
            add(
                "strategy",
                f"'{self.strategy}' is not supported yet; choose one of {', '.join(sorted(IMPLEMENTED_STRATEGIES))}",
            )
        _choice(add, "workload", self.workload, WORKLOADS)
        _choice(add, "schedule", self.schedule, SCHEDULES)
        _choice(add, "tp_style", self.tp_style, TP_STYLES)
        _choice(add, "device", self.device, DEVICES)
        _choice(add, "dtype", self.dtype, DTYPES)
        if self.model not in PRESETS and self.model != "custom":
            add(
                "model",
                f"'{self.model}' is not a preset; choose one of {', '.join(PRESETS)} or 'custom' with n_layer, n_head, n_embd, vocab_size, block_size",
            )
        if self.model == "custom":
            for dim in MODEL_DIMS:
                if getattr(self, dim) is None:
                    add(dim, f"a custom model needs {dim}; set it or pick a preset")

        for name in ("tp", "pp", "dp", "microbatches", "batch", "seq", "steps"):
            if getattr(self, name) < 1:
                add(name, f"must be at least 1 (got {getattr(self, name)})")
        for dim in MODEL_DIMS:
            v = getattr(self, dim)
            if v is not None and v < 1:
                add(dim, f"must be at least 1 (got {v})")
        if self.warmup < 0:
            add("warmup", f"must be 0 or more (got {self.warmup})")
        if self.new_tokens < 1:
            add("new_tokens", f"must be at least 1 (got {self.new_tokens})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            add("lr", f"must be a positive number (got {self.lr})")
        if not (self.time_limit_s > 0 and math.isfinite(self.time_limit_s)):
            add("time_limit_s", f"must be a positive number of seconds (got {self.time_limit_s})")
        if self.seed < 0:
            add("seed", f"must be 0 or more (got {self.seed})")
        for tag in self.tags:
            if not tag.strip() or len(tag) > 64:
                add("tags", f"each tag must be 1 to 64 characters (got {tag!r})")
        if p:
            return p  # degree arithmetic below assumes positive numbers and known choices

        self._validate_degrees(add)
        self._validate_model(add)
        self._validate_shape(add)
        self._validate_device(add, gpu_count)
        self._validate_host_resources(add, gpu_count)
        if self.weights and check_weights:
            self._validate_weights(add)
        return p

    def _validate_host_resources(self, add, gpu_count: int | None) -> None:
        """Upper bounds for a CPU run on this machine: ranks against cores, memory against RAM.

        Checked where the run is placed too (the runner validates again on its own host), so a spec
        queued from a bigger machine is refused with the limit of the one that would run it.
        """
        on_cpu = self.device == "cpu" or (gpu_count is not None and self.resolved_device(gpu_count) == "cpu")
        if not on_cpu:
            return
        cores = usable_cores()
        if self.world_size > CPU_RANKS_PER_CORE * cores:
            add(
                _widest_degree(self),
                f"{self.world_size} CPU ranks on {cores} core{'s' if cores != 1 else ''} is more than the "
                f"{CPU_RANKS_PER_CORE * cores} ({CPU_RANKS_PER_CORE} per core) this machine can time-slice; lower the degrees",
            )
        need = self.host_memory_estimate()
        total = _host_memory_bytes()
        if total and need > total:
            add(
                "batch",
                f"needs about {need / 2**30:.1f} GiB over its {self.world_size} rank(s) (weights, gradients, optimizer "
                f"state and the activations of batch {self.batch} x seq {self.seq}) but this machine has "
                f"{total / 2**30:.1f} GiB; lower batch or seq, or use a smaller model",
            )

    def host_memory_estimate(self) -> int:
        """Bytes a CPU run needs over all its ranks, estimated: process baseline, weights, gradients and
        AdamW state of the largest rank, activations saved for backward (Korthikanti et al. 2022: 34*s*b*h plus
        5*a*s^2*b per layer at 16 bits, doubled at 32) and the logits with their gradient."""
        cfg = self.model_config()
        tp, pp, dp = self.degrees
        mem = self.memory_estimate()
        width = 2 if self.dtype == "bfloat16" else 4
        train = self.workload == "train"
        per_rank = RANK_BASELINE_BYTES + mem["param_bytes"] * (2 if train else 1) + mem["optimizer_bytes"]
        rows = max(1, self.batch // dp)
        seq = self.seq + (self.new_tokens if self.workload == "generate" else 0)
        per_layer = (34 * seq * rows * cfg.n_embd + 5 * cfg.n_head * seq * seq * rows) * width // 2 // tp
        layers = cfg.n_layer // pp if train else 1  # inference keeps one layer's activations at a time
        logits = rows * seq * cfg.vocab_size * 4 // tp * (2 if train else 1)
        return self.world_size * (per_rank + layers * per_layer + logits)

    def _validate_degrees(self, add) -> None:
        s = self.strategy
        unused = {
            "single": ("tp", "pp", "dp"),
            "layer": ("tp", "dp"),
            "tensor": ("pp", "dp"),
            "pipeline": ("tp", "dp"),
            "data": ("tp", "pp"),
            "3d": (),
        }[s]
        for name in unused:
            if getattr(self, name) != 1:
                add(name, f"strategy '{s}' does not use {name}; set {name} to 1 or pick a strategy that uses it")
        if self.microbatches != 1 and not self.uses_microbatches:
            add("microbatches", f"strategy '{s}' does not use microbatches; set microbatches to 1 or use 'pipeline'")
        if self.sequence_parallel and not (s == "tensor" and self.tp_style == "megatron"):
            add("sequence_parallel", "works only with strategy 'tensor' and tp_style 'megatron'; turn it off")
        if s == "layer" and self.pp < 2:
            add("pp", "a layer split needs at least 2 ranks; set pp to 2 or more, or use strategy 'single'")
        if s == "tensor" and self.tp < 2:
            add("tp", "tensor parallelism needs tp of at least 2; set tp to 2 or more, or use strategy 'single'")
        if s == "pipeline" and self.pp < 2:
            add("pp", "a pipeline needs at least 2 stages; set pp to 2 or more")
        if s == "data" and self.dp < 2:
            add("dp", "data parallelism needs dp of at least 2; set dp to 2 or more")
        if self.world_size > MAX_WORLD_SIZE:
            add("strategy", f"needs {self.world_size} ranks; at most {MAX_WORLD_SIZE} run on one machine")

    def _validate_model(self, add) -> None:
        cfg = self.model_config()
        name = "the custom model" if self.model == "custom" else f"the {self.model} model"
        tp, pp, _ = self.degrees
        if cfg.n_embd % cfg.n_head:
            add(
                "n_head",
                f"n_embd {cfg.n_embd} must be divisible by n_head {cfg.n_head}; pick n_head among {_divisors(cfg.n_embd)}",
            )
        if pp > 1 and cfg.n_layer % pp:
            what = "layer split" if self.strategy == "layer" else "pipeline"
            add(
                "pp",
                f"{what} over {pp} ranks needs n_layer divisible by {pp}; {name} has {cfg.n_layer} layers, so use pp in {_divisors(cfg.n_layer)}",
            )
        if tp > 1:
            if cfg.n_head % tp:
                add(
                    "tp",
                    f"tensor parallelism over {tp} ranks needs n_head divisible by {tp}; {name} has {cfg.n_head} heads, so use tp in {_divisors(cfg.n_head)}",
                )
            if cfg.d_ff % tp:
                add("tp", f"the MLP width {cfg.d_ff} must be divisible by tp {tp}")

    def _validate_shape(self, add) -> None:
        cfg = self.model_config()
        tokens = self.seq + (self.new_tokens if self.workload == "generate" else 0)
        if tokens > cfg.block_size:
            extra = f" plus {self.new_tokens} new tokens" if self.workload == "generate" else ""
            add(
                "seq", f"seq {self.seq}{extra} exceeds the model's block_size {cfg.block_size}; lower seq or new_tokens"
            )
        _, _, dp = self.degrees
        per_replica = self.batch // dp if self.batch % dp == 0 else None
        if self.batch % dp:
            add("batch", f"batch {self.batch} must be divisible by dp {dp}; use a multiple of {dp}")
        if self.uses_microbatches and per_replica is not None and per_replica % self.microbatches:
            add(
                "microbatches",
                f"each replica's batch of {per_replica} must split into {self.microbatches} equal microbatches; use a batch that is a multiple of {dp * self.microbatches}",
            )
        if self.sequence_parallel and self.seq % self.tp:
            add("seq", f"sequence parallelism needs seq divisible by tp {self.tp}; use a multiple of {self.tp}")

    def _validate_device(self, add, gpu_count: int | None) -> None:
        if gpu_count is None:
            return
        if self.device == "cuda" and gpu_count == 0:
            add("device", "is 'cuda' but no NVIDIA GPU is visible; choose 'cpu' or 'auto'")
        elif self.device == "cuda" and self.world_size > gpu_count:
            add(
                "device",
                f"{self.world_size} ranks need {self.world_size} GPUs but {gpu_count} are visible; lower the degrees or choose 'cpu'",
            )

    def _validate_weights(self, add) -> None:
        path = Path(self.weights or "").expanduser()
        if not path.is_file():
            add("weights", f"no file at {str(path)!r}; give the path of a GPT-2 .safetensors or .pt/.bin file")
            return
        try:
            shapes = checkpoint_shapes(path)
        except (OSError, ValueError) as exc:
            add(
                "weights",
                f"{path.name} is not a readable GPT-2 checkpoint ({exc}); use a Hugging Face GPT-2 .safetensors or torch state dict",
            )
            return
        wte = shapes.get("wte.weight") or shapes.get("transformer.wte.weight")
        if wte is None or not any(k.endswith("attn.c_attn.weight") for k in shapes):
            add(
                "weights",
                f"{path.name} has no GPT-2 tensors (wte.weight, h.N.attn.c_attn.weight); use a Hugging Face GPT-2 checkpoint",
            )
            return
        cfg = self.model_config()
        if tuple(wte) != (cfg.vocab_size, cfg.n_embd):
            add(
                "weights",
                f"{path.name} has vocab x width {tuple(wte)} but the {self.model} model has {(cfg.vocab_size, cfg.n_embd)}; pick the matching preset",
            )
            return
        # The rest of the layout, so a checkpoint of another depth or context (distilgpt2 for gpt2) is refused
        # here instead of failing inside the job.
        layers = {int(m.group(1)) for k in shapes if (m := re.search(r"(?:^|\.)h\.(\d+)\.", k))}
        if len(layers) != cfg.n_layer:
            add(
                "weights",
                f"{path.name} has {len(layers)} layers but the {self.model} model has {cfg.n_layer}; pick the preset of that depth",
            )
        wpe = shapes.get("wpe.weight") or shapes.get("transformer.wpe.weight")
        if wpe is not None and tuple(wpe) != (cfg.block_size, cfg.n_embd):
            add(
                "weights",
                f"{path.name} has {wpe[0]} positions but the {self.model} model has block_size {cfg.block_size}; pick the matching preset",
            )
        expected = {"attn.c_attn.weight": (cfg.n_embd, 3 * cfg.n_embd), "mlp.c_fc.weight": (cfg.n_embd, cfg.d_ff)}
        for suffix, shape in expected.items():
            found = {tuple(v) for k, v in shapes.items() if k.endswith(suffix)}
            if found and found != {shape}:
                add(
                    "weights",
                    f"{path.name} has {suffix} of shape {sorted(found)[0]} but the {self.model} model needs {shape}",
                )

    def resolved_device(self, gpu_count: int) -> str:
        """'cuda' or 'cpu': what 'auto' becomes given the GPUs the runner sees."""
        if self.device == "auto":
            return "cuda" if gpu_count >= self.world_size and gpu_count > 0 else "cpu"
        return self.device

    # ---- estimates -----------------------------------------------------------------------
    def memory_estimate(self) -> dict[str, int]:
        """Bytes per rank of parameters and AdamW state for this split (largest rank)."""
        cfg = self.model_config()
        tp, pp, _ = self.degrees
        bytes_per = 2 if self.dtype == "bfloat16" else 4
        h = cfg.n_embd
        layer_params = count_parameters(replace(cfg, n_layer=1)) - count_parameters(replace(cfg, n_layer=0))
        embed = cfg.vocab_size * h + cfg.block_size * h
        # Sharded: the big matrices split over tp; LayerNorms and row-parallel biases are replicated.
        layer_share = layer_params // tp + 8 * h
        first_stage = embed // tp + (cfg.n_layer // pp) * layer_share + 2 * h
        params = first_stage if pp > 1 else count_parameters(cfg) // tp + (8 * h * cfg.n_layer if tp > 1 else 0)
        optimizer = 2 * params * 4 if self.workload == "train" else 0
        return {"param_count": params, "param_bytes": params * bytes_per, "optimizer_bytes": optimizer}


CPU_RANKS_PER_CORE = 4  # beyond this, time-slicing makes a CPU run's figures meaningless and the machine crawl
RANK_BASELINE_BYTES = 200 * 2**20  # a rank process with torch and its process group, before any tensor


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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_oversubscription(world_size: int, cores: int | None = None) -> str | None:
    """A warning when a CPU run would start more rank processes than there are cores, else None.

    With more ranks than cores the kernel time-slices them: a rank's measured idle and bubble time then
    includes waiting for a core, not only waiting for its peers. The job measures that wait per rank
    (cpu_wait_s) and marks the run oversubscribed; this is the warning shown before launch.
    """
    cores = usable_cores() if cores is None else cores
    if world_size <= cores:
        return None
    return (
        f"{world_size} ranks on {cores} CPU core{'s' if cores != 1 else ''}: ranks will take turns on the cores, "
        f"so idle time and the pipeline bubble will include waiting for a core. The run is marked oversubscribed "
        f"and reports each rank's CPU wait; for figures of the schedule alone use at most {cores} ranks."
    )


def _choice(add, name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        add(name, f"'{value}' is not allowed; choose one of {', '.join(options)}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


_BOOL_FIELDS = {"sequence_parallel", "verify"}
_FLOAT_FIELDS = {"lr", "time_limit_s"}
_STR_FIELDS = {"strategy", "schedule", "tp_style", "model", "workload", "device", "dtype"}


def _coerce(key: str, value: Any) -> Any:
    """Strictly typed values from JSON: refuse bools for ints, non-integral floats, etc."""
    if key in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        raise TypeError(f"must be true or false (got {value!r})")
    if key in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"must be a number (got {value!r})")
        return float(value)
    if key in _STR_FIELDS:
        if not isinstance(value, str):
            raise TypeError(f"must be a string (got {value!r})")
        return value
    if key == "weights":
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        if not isinstance(value, str):
            raise TypeError(f"must be a file path (got {value!r})")
        return value
    if key == "tags":
        if isinstance(value, str):
            value = [t for t in (s.strip() for s in value.split(",")) if t]
        if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
            raise TypeError("must be a list of strings")
        return tuple(value)
    # Everything else is an integer (optionally None for model dims).
    if value is None and key in MODEL_DIMS:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"must be a whole number (got {value!r})")
    return value
