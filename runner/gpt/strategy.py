"""What every parallel strategy gives the job: a rank's shard of the GPT and the three workloads on it.

A strategy holds parameters under the reference model's names (each possibly a slice of it), so the
job can verify any strategy generically: compare each local gradient and weight with the same slice
of the single-device reference, and the output ranks' logits with the reference logits of their rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn as nn

from runner.gpt.config import GPTConfig
from runner.gpt.mesh import Mesh
from runner.gpt.precision import adamw


class ParallelGPT(ABC):
    """One rank's part of a parallel GPT. Two implement it: the engine every strategy runs
    (runner/gpt/pipeline.py PipelineGPT) and data parallelism around it (runner/gpt/data_parallel.py)."""

    def __init__(self, config: GPTConfig, mesh: Mesh, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.mesh = mesh
        self.device = device
        self.dtype = dtype
        # The optimizer's copy of the weights, where the precision keeps one (bf16-master: float32); build.py sets it
        self.master_dtype: torch.dtype | None = None

    # ---- what the rank holds -------------------------------------------------------------
    @abstractmethod
    def named_shards(self) -> dict[str, nn.Parameter]:
        """Reference parameter name -> this rank's parameter (a tied copy appears under its own name)."""

    def shard_index(self, name: str):
        """Which part of the reference parameter `name` this rank holds, as an index `ref[index]`
        (a tuple of slices, or a LongTensor of rows for shards gathered from several places such as
        tensor-parallel Q/K/V); None means all of it."""
        return None

    def parameters(self) -> list[nn.Parameter]:
        """Unique parameters for the optimizer (tied weights once)."""
        seen: dict[int, nn.Parameter] = {}
        for p in self.named_shards().values():
            seen.setdefault(id(p), p)
        return list(seen.values())

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The optimizer of a training run: AdamW over this rank's parameters (ZeRO keeps a shard of its state), on
        float32 masters of them under bf16-master (runner/gpt/precision.py)."""
        return adamw(self.parameters(), lr, self.master_dtype)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """One update after forward_backward (ZeRO steps its shard, then gathers the updated weights)."""
        optimizer.step()

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # ---- where outputs land --------------------------------------------------------------
    @property
    @abstractmethod
    def is_output_rank(self) -> bool:
        """True where logits, loss and generated tokens are returned (None elsewhere)."""

    def batch_rows(self, batch: int) -> slice:
        """The rows of the global batch this rank's outputs cover (data parallelism narrows it)."""
        return slice(0, batch)

    # ---- workloads -----------------------------------------------------------------------
    @abstractmethod
    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Prefill: logits [rows, seq, vocab] on output ranks, no autograd."""

    @abstractmethod
    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        """Loss (mean over the global batch) on output ranks; leaves complete gradients on every shard."""

    @abstractmethod
    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        """Greedy decoding with a KV cache; prompt + new tokens [rows, seq + new] on output ranks."""

    def begin_step(self, step: int, start: float) -> None:
        """Called right after the barrier that starts each step and the clock's start_step();
        `start` is time.perf_counter() then. Timeline spans are measured from the clock's origin
        (runner/gpt/timing.py), which every rank takes on leaving the same barrier, so the ranks'
        timelines line up."""
        self.step_start = start

    def take_spans(self) -> list[dict]:
        """Timeline spans recorded during the last step ({stage, microbatch, phase, start, end},
        seconds since the step's clock origin); the job emits them as events for timed steps."""
        return []

    def figures(self) -> dict:
        """Strategy-specific per-rank figures (bubble fraction, in-flight microbatches, ...)."""
        return {}
