"""Data parallelism: dp replicas of an inner strategy, each on batch/dp rows, gradients averaged.

The inner strategy is whatever one replica is: the whole model for 'data', a tensor x pipeline
grid for '3d'. Replica d takes rows [d*B/dp, (d+1)*B/dp) of the global batch. After the inner
backward, gradients are summed over the data-parallel group in flat buckets and divided by dp, so
every replica applies the same AdamW step and stays identical.

Why reduce after backward rather than overlapping it with hooks (what DDP does): the inner
strategies drive their own backward (a pipeline accumulates every microbatch into the same .grad,
so a grad-ready hook would fire m times per step), and one reduction point keeps 'data' and '3d'
on a single code path. The price is that this communication is not hidden behind compute; the
per-rank `comm_s` figure shows exactly that exposed time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from runner.gpt.mesh import Mesh
from runner.gpt.strategy import ParallelGPT

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size: few calls, bounded extra memory


def grad_buckets(params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> list[list[nn.Parameter]]:
    """Consecutive parameters grouped so each bucket's gradients total at most bucket_bytes (or one tensor)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


class DataParallelGPT(ParallelGPT):
    def __init__(self, inner: ParallelGPT, mesh: Mesh):
        super().__init__(inner.config, mesh, inner.device, inner.dtype)
        self.inner = inner
        self.dp = mesh.dp
        # Every replica holds the same shapes in the same order, so buckets line up across ranks.
        self.buckets = grad_buckets(inner.parameters())

    def named_shards(self) -> dict[str, nn.Parameter]:
        return self.inner.named_shards()

    def shard_index(self, name: str):
        return self.inner.shard_index(name)

    @property
    def is_output_rank(self) -> bool:
        return self.inner.is_output_rank

    def batch_rows(self, batch: int) -> slice:
        per = batch // self.mesh.dp_size
        d = self.mesh.coord.dp
        return slice(d * per, (d + 1) * per)

    def begin_step(self, step: int, start: float) -> None:
        super().begin_step(step, start)
        self.inner.begin_step(step, start)

    def take_spans(self) -> list[dict]:
        return self.inner.take_spans()

    def figures(self) -> dict:
        return self.inner.figures()

    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        return self.inner.forward_logits(idx[self.batch_rows(idx.shape[0])])

    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        return self.inner.generate(idx[self.batch_rows(idx.shape[0])], new_tokens)

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        rows = self.batch_rows(idx.shape[0])
        loss = self.inner.forward_backward(idx[rows], targets[rows])
        self.average_gradients()
        if loss is None:
            return None
        # The global loss is the mean of the replicas' means (equal rows each); only output ranks
        # hold a loss, and a data-parallel group never mixes output and non-output ranks.
        total = self.dp.all_reduce(torch.tensor([loss], dtype=torch.float64, device=self.device))
        return total.item() / self.mesh.dp_size

    @torch.no_grad()
    def average_gradients(self) -> None:
        if self.mesh.dp_size == 1:
            return
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.dp.all_reduce(flat)
            flat /= self.mesh.dp_size
            offset = 0
            for p, g in zip(bucket, grads, strict=True):
                n = g.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
