"""RunSpec: the one description of a run, its parsing from JSON-like data, and what follows from it.

Pages, the CLI, the runner and the rank processes all speak RunSpec. It imports no torch, so the app can
validate a form instantly. What a strategy uses and needs comes from the registry (runner/spec/strategies).
The spec is plain data: `validate_spec(spec, ...)` (runner/spec/validation.py) returns every problem at
once, each naming the field and the fix, and nothing with a problem is ever queued. Memory estimates
live in runner/spec/estimates.py.
Also here: the cores this host offers a CPU run (`usable_cores`) and the warning when its ranks outnumber them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runner.gpt.config import PRESETS, GPTConfig, customized
from runner.job import corpus
from runner.job.checkpoint import config_from_hf_folder, is_hf_folder
from runner.spec.strategies import ParallelDims, Strategy, get_strategy, strategy_names

WORKLOADS = ("forward", "generate", "train")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1")
TP_STYLES = ("megatron", "gather")
DEVICES = ("auto", "cpu", "cuda")
# bf16-mixed: float32 weights, bf16 compute under autocast; bf16-master: bf16 weights and gradients, float32 master
# weights and AdamW state in the optimizer (runner/gpt/precision.py says what each keeps)
DTYPES = ("float32", "bfloat16", "bf16-mixed", "bf16-master")
# What each precision keeps, bytes a parameter (weights + gradients + AdamW state): the forms show it
DTYPE_KEEPS = {
    "float32": "float32 weights, gradients, AdamW moments and activations (4 + 4 + 8 bytes a parameter)",
    "bfloat16": "bfloat16 weights, gradients, AdamW moments and activations (2 + 2 + 4)",
    "bf16-mixed": "float32 weights, gradients and moments (4 + 4 + 8); bfloat16 matmuls under autocast, float32 "
                  "residual stream",
    "bf16-master": "bfloat16 weights, gradients and activations; float32 master weights and moments in the optimizer "
                   "(2 + 2 + 12, the ZeRO paper's mixed precision), sharded under ZeRO",
}  # fmt: skip
ZERO_STAGES = (0, 1, 2, 3)
CHECKPOINT_POLICIES = ("none", "blocks", "every-K")  # every-K: every K-th block, e.g. "every-2"
MODEL_DIMS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")  # what a custom model must give
MODEL_PARTS = ("family", "n_kv_head", "ffn_hidden", "rope_theta", "tie_head")  # optional: the preset's otherwise
MODEL_FIELDS = MODEL_DIMS + MODEL_PARTS
FROM_WEIGHTS = "checkpoint"  # the model whose dimensions a Hugging Face folder's config.json gives


def model_label(model: str, weights: str | None) -> str:
    """The model as lists and titles name it: a Hugging Face folder's runs by the folder too ("checkpoint hf-llama"),
    or every folder's runs would read alike; the stored and filtered name stays `model`. A missing path (None, or
    a table's NaN) names none."""
    if model == FROM_WEIGHTS and isinstance(weights, str) and weights:
        return f"{model} {Path(str(weights).rstrip('/')).name or weights}"
    return model


def __getattr__(name: str) -> Any:
    """`STRATEGIES`: the registered strategy names, read from the registry each time (never a stale copy)."""
    if name == "STRATEGIES":
        return strategy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def checkpoint_interval(policy: str) -> int:
    """Every how many blocks activations are checkpointed: 0 for none, 1 for blocks, K for every-K.

    Raises ValueError for a policy that is none of those (validate_spec reports it first)."""
    if policy == "none":
        return 0
    if policy == "blocks":
        return 1
    m = re.fullmatch(r"every-([1-9][0-9]*)", policy)
    if m is None:
        raise ValueError(f"checkpoint {policy!r} is not none, blocks or every-K")
    return int(m.group(1))


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
    virtual_stages: int = 1  # v model chunks per pipeline rank (interleaved-1f1b)
    tp_style: str = "megatron"
    sequence_parallel: bool = False
    zero_stage: int = 0  # ZeRO over the dp replicas: 1 optimizer state, 2 + gradients, 3 + parameters sharded
    checkpoint: str = "none"  # activation checkpointing: none, blocks, or every-K (every K-th block)
    model: str = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    vocab_size: int | None = None
    block_size: int | None = None
    family: str | None = None  # gpt2 or llama (None: the preset's)
    n_kv_head: int | None = None  # key/value heads, dividing n_head (grouped-query attention)
    ffn_hidden: int | None = None  # the MLP's hidden width
    rope_theta: float | None = None  # rotary base (llama)
    tie_head: bool | None = None  # the LM head shares the token embedding
    workload: str = "train"
    batch: int = 8
    seq: int = 64
    new_tokens: int = 16
    prompt: str | None = None  # generate: the text every row starts from (its tokens are the seq)
    steps: int = 5
    warmup: int = 1
    lr: float = 1e-3
    device: str = "auto"
    dtype: str = "float32"
    reduce_fp32: bool = False  # 16-bit gradients reduced over data parallelism in float32 (bfloat16, bf16-master)
    seed: int = 0
    data: str = "synthetic"  # synthetic | stdlib | a text folder or file | a nanoGPT token folder (runner/job/corpus.py)
    eval_every: int = 0  # train: the held-out loss every this many steps (0: never)
    verify: bool = False
    weights: str | None = None
    time_limit_s: float = 600.0
    nodes: int | None = None  # Slurm nodes the run spreads over (None: the runner decides; one machine locally)
    tags: tuple[str, ...] = field(default_factory=tuple)

    # ---- derived (from the strategy registry) --------------------------------------------
    @property
    def strategy_info(self) -> Strategy | None:
        """The registered Strategy of this spec's name, or None for an unknown name (validate_spec says so)."""
        try:
            return get_strategy(self.strategy)
        except ValueError:
            return None

    @property
    def degrees(self) -> ParallelDims:
        """(tp, pp, dp) as the mesh lays ranks out; degrees the strategy does not use are 1.

        Raises ValueError for a degree below 1 the strategy uses (validate_spec reports that first)."""
        s = self.strategy_info
        return s.dims(self) if s is not None else ParallelDims()

    @property
    def world_size(self) -> int:
        """Number of rank processes torchrun starts for this spec."""
        return self.degrees.world_size

    @property
    def uses_microbatches(self) -> bool:
        s = self.strategy_info
        return s is not None and s.uses("microbatches")

    @property
    def checkpoint_every(self) -> int:
        """Every how many blocks activations are checkpointed (checkpoint_interval of the policy)."""
        return checkpoint_interval(self.checkpoint)

    def model_config(self) -> GPTConfig:
        """The preset (or, for model 'checkpoint', the weights folder's config.json) with any custom dimensions
        and parts applied; a family other than the base's brings its own defaults (biases, positions). A GPT-2
        checkpoint file's dims are checked against it in validate_spec.

        Text read byte by byte has 256 symbols: without weights or a vocab_size of its own, the model's
        vocabulary is then 256, so the first loss is about ln 256 and no logit goes to ids text never holds
        (tensor parallelism pads it to a multiple of tp, runner/gpt/tp_layers.py)."""
        if self.model == FROM_WEIGHTS:
            base = PRESETS["tiny"]
            if is_hf_folder(self.weights):
                try:
                    base = config_from_hf_folder(self.weights or "")
                except (OSError, ValueError):  # validate_spec says what is wrong with the folder
                    pass
        else:
            base = PRESETS.get(self.model, PRESETS["tiny"])
        fields = {k: getattr(self, k) for k in MODEL_FIELDS}
        if self.vocab_size is None and self.weights is None and corpus.is_byte_text(self.data, self.weights):
            fields["vocab_size"] = corpus.BYTE_VOCAB
        return customized(base, **fields)

    def resolved_device(self, gpu_count: int) -> str:
        """'cuda' or 'cpu': what 'auto' becomes given the GPUs the runner sees."""
        if self.device == "auto":
            return "cuda" if gpu_count >= self.world_size and gpu_count > 0 else "cpu"
        return self.device

    def comparison_key(self) -> str:
        """What two runs must share to measure the same thing: the spec without its tags and time limit, neither
        of which changes what the ranks compute. Compare groups runs by it (ui/compare_sets.py)."""
        d = self.to_dict()
        del d["tags"], d["time_limit_s"]
        return json.dumps(d, sort_keys=True)

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


def microbatches_of_size(spec: RunSpec, size: int) -> int:
    """The microbatch count m of microbatches of `size` sequences (Megatron's --micro-batch-size): the batch per
    replica over `size`. Raises SpecError naming microbatch_size when it is not a whole number of them."""
    if size < 1:
        raise SpecError([SpecProblem("microbatch_size", f"must be at least 1 sequence (got {size})")])
    try:
        dp = spec.degrees.dp
    except ValueError:
        return spec.microbatches  # a bad degree: validate_spec names it
    rows = spec.batch // dp if spec.batch >= dp >= 1 else 0
    if rows < 1 or spec.batch % dp or rows % size:
        raise SpecError([SpecProblem("microbatch_size", f"each replica's batch of {spec.batch}/{dp} must split into "
                                                        f"microbatches of {size} sequences; use a batch that is a "
                                                        f"multiple of {dp * size}")])  # fmt: skip
    return rows // size


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


_BOOL_FIELDS = {"sequence_parallel", "verify", "reduce_fp32"}
_FLOAT_FIELDS = {"lr", "time_limit_s"}
_STR_FIELDS = {"strategy", "schedule", "tp_style", "model", "workload", "device", "dtype", "checkpoint", "data"}
_OPTIONAL_INT_FIELDS = {*MODEL_DIMS, "n_kv_head", "ffn_hidden", "nodes"}
_OPTIONAL = {"family": "model", "rope_theta": "lr", "tie_head": "verify"}  # None, or typed as the field named


def _coerce(key: str, value: Any) -> Any:
    """Strictly typed values from JSON: refuse bools for ints, non-integral floats, etc."""
    if key in _OPTIONAL:
        return None if value is None else _coerce(_OPTIONAL[key], value)
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
    if key in ("weights", "prompt"):
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return None
        if not isinstance(value, str):
            raise TypeError(f"must be {'a file path' if key == 'weights' else 'text'} (got {value!r})")
        return value
    if key == "tags":
        if isinstance(value, str):
            value = [t for t in (s.strip() for s in value.split(",")) if t]
        if not isinstance(value, list | tuple) or not all(isinstance(t, str) for t in value):
            raise TypeError("must be a list of strings")
        return tuple(value)
    # Everything else is an integer (optionally None for model dims and nodes).
    if value is None and key in _OPTIONAL_INT_FIELDS:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"must be a whole number (got {value!r})")
    return value
