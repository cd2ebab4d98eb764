"""The planner's inputs (torch-free): the model presets (`MODELS`), a layout (`Layout`: tp x pp x dp and the ZeRO
stage) and what runs on it (`Workload`: the spec fields memory and step time depend on), with the constants the
models share, and the Layout and Workload of a RunSpec (`spec_layout`, `spec_workload`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from runner.gpt.config import PRESETS, GPTConfig, customized
from runner.spec.run_spec import RunSpec, checkpoint_interval

GiB = 2**30

# The planner's models: the lab's presets plus well-known sizes in GPT-2 shape (learned positions,
# LayerNorm, GELU MLP of 4h, biases, multi-head attention without grouped-query heads, tied head).
# GPT-3 (Brown et al. 2020, table 2.1): 175B is 96 layers, d_model 12288, 96 heads; 13B is 40 layers,
# 40 heads of 128 -- the table prints d_model 5140, which 40 heads do not divide; 40 x 128 = 5120 is used.
# Llama-2-7B/70B-sized: their layers, heads and width (Touvron et al. 2023) in GPT-2 shape (no SwiGLU, no
# GQA, no RoPE), so counts differ from Llama's own: 7B-sized is ~6.6B, 70B-sized ~64.7B.
MODELS: dict[str, GPTConfig] = {
    **PRESETS,
    "gpt3-13b": GPTConfig(n_layer=40, n_head=40, n_embd=5120, vocab_size=50257, block_size=2048),
    "gpt3-175b": GPTConfig(n_layer=96, n_head=96, n_embd=12288, vocab_size=50257, block_size=2048),
    "llama2-7b-sized": GPTConfig(n_layer=32, n_head=32, n_embd=4096, vocab_size=32000, block_size=4096),
    "llama2-70b-sized": GPTConfig(n_layer=80, n_head=64, n_embd=8192, vocab_size=32000, block_size=4096),
}

ADAM_STEP_BYTES = 4  # AdamW's `step` is a float32 0-d tensor per optimized tensor (torch.optim.AdamW)
LOGIT_BYTES = 4  # cross entropy runs in float32 (the loss is cast to float32 under bf16-mixed too)


@dataclass(frozen=True)
class Layout:
    """tp x pp x dp ranks (tp innermost, runner/gpt/mesh.py) and the ZeRO stage over dp.

    `cut`: the blocks on each pipeline stage, first to last, where they are not split evenly (empty: n_layer / pp
    each, as runner/gpt/pipeline.py cuts). Other stacks cut by cost: nanotron balances each stage's share of
    the FLOPs counting the head as V x h, so the first stages hold more blocks (bench/bench_playbook.py)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 0
    cut: tuple[int, ...] = ()

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def label(self) -> str:
        zero = f" zero{self.zero_stage}" if self.zero_stage else ""
        return f"tp{self.tp} pp{self.pp} dp{self.dp}{zero}"


@dataclass(frozen=True)
class Workload:
    """What runs on the layout: the spec fields the memory and the step time depend on.

    batch is the global batch (all replicas). A replica's batch is cut into microbatches whose gradients accumulate
    before one optimizer step, in every layout (gradient accumulation without a pipeline, the pipeline's
    microbatches with one): `microbatches` is their count m per replica, or `microbatch_size` the sequences in
    each (Megatron's --micro-batch-size); 0 for both: one sequence each when pp > 1, else the whole batch at once."""

    workload: str = "train"
    batch: int = 8
    seq: int = 1024
    new_tokens: int = 16
    dtype: str = "float32"
    checkpoint: str = "none"
    schedule: str = "1f1b"
    microbatches: int = 0
    virtual_stages: int = 1
    sequence_parallel: bool = False
    tp_style: str = "megatron"
    attention: str = "sdpa"  # "sdpa": fused, no s x s scores kept (our model); "naive": the paper's 5as/h term
    # How torch's AdamW steps (its default per device): "foreach" on GPUs, one temporary the size of the whole
    # parameter group (the square roots of the second moments); "for-loop" on CPUs, a tensor at a time, two
    # temporaries of the largest tensor's size (its square root and the quotient) at once.
    adamw: str = "foreach"
    # The collectives' backend: "nccl" on GPUs; "gloo" on CPUs, whose reduce-scatter works on a copy of its input
    # and whose all-gather fills a buffer of its own before copying out.
    backend: str = "nccl"
    microbatch_size: int = 0  # sequences per microbatch instead of a count (0: not given)
    reduce_fp32: bool = False  # 16-bit gradients reduced over data parallelism in float32

    @classmethod
    def of(cls, source: Any, **overrides: Any) -> Workload:
        """The Workload of `source`'s same-named fields (a RunSpec, the planner CLI's arguments), then `overrides`."""
        given = {f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)}
        return cls(**{**given, **overrides})

    def on_cpu_ranks(self) -> Workload:
        """The same work as CPU ranks run it: torch's for-loop AdamW (its CPU default) and gloo."""
        return replace(self, adamw="for-loop", backend="gloo")

    @property
    def checkpoint_every(self) -> int:
        """0 for none, 1 for blocks, K for every-K (the spec's own reading of the policy)."""
        return checkpoint_interval(self.checkpoint)

    @property
    def param_width(self) -> int:
        """Bytes per parameter (and gradient) element: 2 for bfloat16 and bf16-master, else 4 (bf16-mixed's
        parameters are float32; runner/gpt/precision.py has the table of what each precision keeps)."""
        return 2 if self.dtype in ("bfloat16", "bf16-master") else 4

    @property
    def master_width(self) -> int:
        """Bytes per parameter of the optimizer's master copy: 4 under bf16-master (float32), else 0 (none)."""
        return 4 if self.dtype == "bf16-master" else 0

    @property
    def moment_width(self) -> int:
        """Bytes per element of each AdamW moment: as wide as what it steps (the masters under bf16-master)."""
        return self.master_width or self.param_width

    @property
    def activation_width(self) -> int:
        """Bytes per activation element: 2 under bfloat16 and bf16-mixed (autocast), 4 under float32."""
        return 4 if self.dtype == "float32" else 2

    @property
    def residual_width(self) -> int:
        """Bytes per element of the residual stream (and so of pipeline messages): 2 under bfloat16 and bf16-master,
        else 4 (bf16-mixed keeps it float32)."""
        return 2 if self.dtype in ("bfloat16", "bf16-master") else 4

    @property
    def reduce_width(self) -> int:
        """Bytes per gradient element on the data-parallel wire: the gradients' own, or 4 under reduce_fp32."""
        return 4 if self.reduce_fp32 else self.param_width

    def microbatches_for(self, layout: Layout) -> int:
        """m per replica on this layout: the batch per replica over microbatch_size, or the count given, or (both 0)
        one sequence per microbatch in a pipeline and the whole batch as one without."""
        rows = max(1, self.batch // layout.dp)
        if self.microbatch_size > 0:
            return max(1, rows // self.microbatch_size)
        if self.microbatches > 0:
            return self.microbatches
        return rows if layout.pp > 1 else 1

    def chunks_for(self, layout: Layout) -> int:
        """v, the model chunks per pipeline rank: virtual_stages under interleaved-1f1b with a pipeline, else 1."""
        return self.virtual_stages if self.schedule == "interleaved-1f1b" and layout.pp > 1 else 1


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp (as runner/gpt/tp_layers.padded_vocab, torch-free)."""
    return math.ceil(vocab_size / tp) * tp


def with_dims(cfg: GPTConfig, **dims: Any) -> GPTConfig:
    """A config with custom dimensions and parts applied (None leaves one as it is; runner/gpt/config.py
    customized, as a RunSpec applies them)."""
    return customized(cfg, **dims)


# ---- a RunSpec's layout and workload (what runner/spec/estimates.py and the Launch page ask) ---------------
def spec_layout(spec: RunSpec) -> Layout:
    """The Layout of a runner.spec.run_spec.RunSpec (its degrees; ZeRO only where it shards something)."""
    tp, pp, dp = spec.degrees
    zero = spec.zero_stage if dp > 1 and spec.workload == "train" else 0
    return Layout(tp, pp, dp, zero)


def spec_workload(spec: RunSpec, device: str | None = None) -> Workload:
    """The Workload of a runner.spec.run_spec.RunSpec on `device` (default: the spec's; "auto" counts as a GPU)."""
    work = Workload.of(spec)
    return work.on_cpu_ranks() if (device or spec.device) == "cpu" else work
