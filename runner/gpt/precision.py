"""Numeric precision of a run: pure float32, pure bfloat16, or bf16-mixed; what each keeps and sends in which dtype.

- `float32`, `bfloat16` (pure): parameters, gradients, optimizer state and activations all in that dtype
  (runner/job/rank.py materializes the parameters in it); no autocast. Unchanged by bf16-mixed.
- `bf16-mixed` (the default of Megatron-LM and torchtitan): float32 *master* parameters -- job.py
  materializes them in float32 -- so their gradients (autograd gives a parameter's gradient the
  parameter's dtype: autocast's cast to bf16 casts the gradient back in backward) and AdamW's moments
  (created like the parameter) are float32, and the update is applied in float32. The forward runs
  under `torch.autocast(device_type, dtype=torch.bfloat16)`, entered inside GPT.forward
  (`GPT.compute_context`, set by runner/gpt/build.py; the pipeline engine needs no change): the
  matmuls (linear, attention) take bf16 inputs and accumulate in float32; what autocast keeps in
  float32 (layer_norm, softmax, the loss, which is also cast to float32 explicitly) stays float32.
  Backward runs outside autocast, as PyTorch prescribes; its ops follow the forward's dtypes.

What crosses the wire, and why:
- Gradient reduction over data parallelism (runner/gpt/data_parallel.py buckets, ZeRO's
  reduce-scatter) is float32, because the gradients are float32 (the parameters are): nothing is
  downcast for the wire, as torchtitan's `MixedPrecisionPolicy(reduce_dtype=float32)` and Megatron's
  float32 main gradients do.
- Pipeline sends carry float32 hidden states and float32 gradients of them. Under autocast the
  residual stream stays float32: the embedding is not autocast (float32 out), and each block adds its
  bf16 branch output to float32 x, which type promotion keeps float32. So a stage's output is float32
  and the engine's receive buffers (the parameter dtype) match it. Casting to bf16 for the wire would
  halve those bytes but round the residual stream at every stage boundary, so a pipelined bf16-mixed
  run would no longer compute what the same model computes unsplit; we keep the exact cut.
- Tensor-parallel collectives carry what the layer produced: a row-parallel layer's partial sums come
  out of a bf16 matmul, so those forward all-reduces (reduce-scatters under sequence parallelism) are
  bf16, as in Megatron-LM; the embedding's sum, the gathered LayerNorm outputs and every backward
  all-reduce (the gradient of a float32 LayerNorm output entering a parallel region) are float32.
  tests/test_precision.py counts these bytes exactly.

On CUDA, autocast casts each float32 weight to bf16 once per autocast region (its weight cache,
emptied when GPT.forward leaves the region), the bf16 matmuls run on tensor cores with float32
accumulation, and a checkpointed block's recompute runs under the forward's autocast state again
(torch.utils.checkpoint restores it), re-casting its weights. On CPU autocast supports bfloat16 the
same way (oneDNN kernels), which is what the tests run.

The verify bound for bf16-mixed against the float32 reference is in runner/job/verify.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["PRECISIONS", "Precision", "PrecisionFigures", "precision_of"]


@dataclass(frozen=True)
class Precision:
    """One dtype choice: what parameters (and so gradients and optimizer state) are stored in, and what
    the forward's matmuls compute in."""

    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.param_dtype != self.compute_dtype

    def compute_context(self, device_type: str) -> Callable[[], AbstractContextManager]:
        """A factory of the context the forward runs in: autocast to compute_dtype when mixed, else nothing."""
        if not self.mixed:
            return nullcontext
        dtype = self.compute_dtype
        return lambda: torch.autocast(device_type=device_type, dtype=dtype)


PRECISIONS: dict[str, Precision] = {
    "float32": Precision("float32", torch.float32, torch.float32),
    "bfloat16": Precision("bfloat16", torch.bfloat16, torch.bfloat16),
    "bf16-mixed": Precision("bf16-mixed", torch.float32, torch.bfloat16),
}


def precision_of(dtype: str) -> Precision:
    """The Precision of a spec's `dtype` field."""
    try:
        return PRECISIONS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(PRECISIONS)}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class PrecisionFigures:
    """The rank's precision as figures: the configured dtypes and the dtype of the gradients autograd actually
    accumulated into the parameters (seen by a post-accumulate-grad hook, so also where a strategy frees or
    shards the full gradients afterwards, as ZeRO does); None until a backward ran (a forward-only run)."""

    def __init__(self, precision: Precision, parameters: list[nn.Parameter]):
        self.precision = precision
        self.grad_dtypes: set[str] = set()
        for p in parameters:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._seen)

    def _seen(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self.grad_dtypes.add(_dtype_name(p.grad.dtype))

    def figures(self) -> dict:
        return {
            "precision": self.precision.name,
            "param_dtype": _dtype_name(self.precision.param_dtype),
            "compute_dtype": _dtype_name(self.precision.compute_dtype),
            "grad_dtype": ",".join(sorted(self.grad_dtypes)) or None,
        }
