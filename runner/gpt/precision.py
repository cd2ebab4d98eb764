"""Numeric precision of a run: pure float32, pure bfloat16, bf16-mixed or bf16-master; what each keeps and sends in
which dtype.

Bytes a parameter keeps between steps (weights + gradients + AdamW's optimizer state), as the planner counts them:

    dtype        weights  gradients  optimizer state                      forward computes in
    float32      4        4          8 (two float32 moments)              float32
    bfloat16     2        2          4 (two bfloat16 moments)             bfloat16
    bf16-mixed   4        4          8 (the weights are the master)       bfloat16 under autocast (float32 residual)
    bf16-master  2        2          12 (float32 master + two moments)    bfloat16 (as pure bfloat16)

- `float32`, `bfloat16` (pure): parameters, gradients, optimizer state and activations all in that dtype
  (runner/job/rank.py materializes the parameters in it); no autocast. Unchanged by bf16-mixed.
- `bf16-master` (how Megatron-LM, DeepSpeed and nanotron keep mixed precision, and the ZeRO paper's 2 + 2 + K
  bytes with K = 12): the model is pure bfloat16 -- weights, gradients, activations, pipeline messages -- and the
  optimizer (`MasterAdamW`) keeps a float32 copy of every weight it steps with AdamW's two float32 moments. Each
  step it turns the bfloat16 gradients into float32 ones for the masters, steps them, and rounds the masters
  back into the bfloat16 weights; small updates accumulate in the masters instead of vanishing under bfloat16's
  rounding. Under ZeRO the optimizer steps the rank's shards, so the masters are sharded with the moments: the
  paper's P_os. Gradients are reduced over data parallelism in bfloat16, or in float32 with the spec's
  `reduce_fp32` (torchtitan's reduce_dtype, Megatron's float32 gradient reduction): each bucket or unit is cast
  to float32 for the wire and the mean cast back.
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

The verify bounds for bf16-mixed and bf16-master against the float32 reference are in runner/job/verify.py.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["PRECISIONS", "MasterAdamW", "Precision", "PrecisionFigures", "adamw", "optimizer_state_bytes",
           "precision_of"]


@dataclass(frozen=True)
class Precision:
    """One dtype choice: what parameters (and so gradients and optimizer state) are stored in, and what
    the forward's matmuls compute in."""

    name: str
    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    master_dtype: torch.dtype | None = None  # the optimizer's copy of the weights, when it keeps one

    @property
    def mixed(self) -> bool:
        """Whether the forward runs under autocast (weights stored wider than the matmuls compute)."""
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
    "bf16-master": Precision("bf16-master", torch.bfloat16, torch.bfloat16, master_dtype=torch.float32),
}


def precision_of(dtype: str) -> Precision:
    """The Precision of a spec's `dtype` field."""
    try:
        return PRECISIONS[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(PRECISIONS)}") from None


class MasterAdamW(torch.optim.AdamW):
    """AdamW on master copies (float32) of 16-bit parameters: `step` casts their gradients onto the masters, steps
    the masters, and rounds them back into the parameters. Its `state` is AdamW's (two moments and a step count
    per master); the masters themselves are `masters` (optimizer_state_bytes counts both)."""

    def __init__(self, params: list[nn.Parameter], lr: float, master_dtype: torch.dtype = torch.float32):
        self.model_params = list(params)
        self.masters = [p.detach().to(master_dtype).clone() for p in self.model_params]
        super().__init__(self.masters, lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)
        super().zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 -- torch.optim's signature
        for p, m in zip(self.model_params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.to(m.dtype)
        loss = super().step(closure)
        for p, m in zip(self.model_params, self.masters, strict=True):
            if m.grad is not None:
                p.copy_(m)  # rounded to the parameter's dtype
            m.grad = None  # the float32 gradients exist during the step only
        return loss


def adamw(params: list[nn.Parameter], lr: float, master_dtype: torch.dtype | None = None) -> torch.optim.Optimizer:
    """The optimizer of a training run: AdamW, on float32 masters of the parameters when the precision keeps them."""
    return MasterAdamW(params, lr, master_dtype) if master_dtype is not None else torch.optim.AdamW(params, lr=lr)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer keeps between steps: its state tensors, and the master weights where it has them."""
    held = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return held + sum(m.numel() * m.element_size() for m in getattr(optimizer, "masters", []))


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
        master = self.precision.master_dtype
        return {
            "precision": self.precision.name,
            "param_dtype": _dtype_name(self.precision.param_dtype),
            "master_dtype": _dtype_name(master) if master is not None else None,
            "compute_dtype": _dtype_name(self.precision.compute_dtype),
            "grad_dtype": ",".join(sorted(self.grad_dtypes)) or None,
        }
