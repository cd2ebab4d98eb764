"""Data parallelism: dp replicas of an inner strategy, each on batch/dp rows, gradients averaged.

The inner strategy is whatever one replica is: the whole model for 'data', a tensor x pipeline
grid for '3d'. Replica d takes rows [d*B/dp, (d+1)*B/dp) of the global batch. Gradients are summed
over the data-parallel group in flat buckets of about 25 MB (DDP's default: few calls, bounded
extra memory) and divided by dp, so every replica applies the same AdamW step and stays identical.

Overlap: when the inner strategy's last microbatch runs its backward as one pass that gives every
gradient its last addition (the whole model, as in 'data', with or without gradient accumulation over
microbatches), each bucket's all-reduce starts asynchronously from a post-accumulate-grad hook the moment
its last gradient of that pass is ready, in reverse layer order as backward produces them, and runs while
backward continues; NCCL and gloo both progress asynchronous collectives on their own threads. The hooks
are armed just before that pass (the engine's `before_last_backward`), so the earlier microbatches'
backwards only accumulate: one reduction a step, as DDP's no_sync and Megatron's gradient accumulation
do. When the inner strategy's passes interleave microbatches (a pipeline, as in '3d'), a hook would fire
too early, so the buckets are reduced after the inner backward instead. Either way `comm_s` is the time the rank was
blocked on this communication (CPU: its main thread in work.wait(); CUDA: its compute stream waiting
for the NCCL stream, timed by events, runner/gpt/timing.py), so the figure shows how much of it stayed
exposed. The overlap is observed, not assumed: tests/test_data_parallel.py records when each bucket's
all-reduce completes on gloo and finds buckets done before backward has ended.

With `zero_stage` 1-3 the buckets give way to ZeRO (runner/gpt/zero.py ZeroShards): the same rows, loss and
overlap rule, but gradients, optimizer state and (stage 3) parameters sharded over the replicas; what the
rank holds (named_shards, parameters), its optimizer and its step come from there. Every stage reports
`zero_stage` and `grad_bytes` (the gradients held after the step's reduction) among its figures.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.nn as nn

from runner.gpt.comm import PendingCollective
from runner.gpt.mesh import Mesh
from runner.gpt.strategy import ParallelGPT
from runner.gpt.zero import ZeroShards

# DDP's default bucket size; the variable lets tests drive many buckets through a tiny model.
BUCKET_BYTES = int(os.environ.get("LAB_DP_BUCKET_BYTES", 25 * 1024 * 1024))


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
    def __init__(self, inner: ParallelGPT, mesh: Mesh, zero_stage: int = 0, seed: int | None = None,
                 reduce_dtype: torch.dtype | None = None):  # fmt: skip
        """`seed` lets ZeRO give values to parameters the builder left on the meta device (stage 3 built
        lazily: one parameter at a time, only this rank's shard kept). `reduce_dtype`: the dtype the gradients
        cross the wire in, when not their own (float32 for 16-bit gradients: the spec's reduce_fp32)."""
        super().__init__(inner.config, mesh, inner.device, inner.dtype)
        self.inner = inner
        self.master_dtype = inner.master_dtype
        self.reduce_dtype = reduce_dtype
        self.dp = mesh.dp
        self.zero_stage = zero_stage
        self.overlap = mesh.dp_size > 1 and getattr(inner, "last_backward_finishes_grads", False)
        self.zero = ZeroShards(inner, mesh.dp, zero_stage, self.overlap, seed, reduce_dtype) if zero_stage else None
        if self.overlap:
            inner.before_last_backward.append(self.zero.arm if self.zero else self._arm)
        self.grad_bytes = 0
        # Every replica holds the same shapes in the same order, so buckets line up across ranks;
        # reversed because backward produces the last layers' gradients first.
        self.buckets = [] if self.zero else grad_buckets(list(reversed(inner.parameters())))
        self._pending: list[PendingCollective | None] = [None] * len(self.buckets)
        self._missing: list[int] = []
        if self.overlap and not self.zero:
            for i, bucket in enumerate(self.buckets):
                for p in bucket:
                    p.register_post_accumulate_grad_hook(lambda _p, i=i: self._grad_ready(i))

    def named_shards(self) -> dict[str, nn.Parameter]:
        return self.zero.named_shards() if self.zero else self.inner.named_shards()

    def shard_index(self, name: str):
        return self.zero.shard_index(name) if self.zero else self.inner.shard_index(name)

    def parameters(self) -> list[nn.Parameter]:
        return self.zero.parameters() if self.zero else super().parameters()

    def grad_holders(self) -> list[nn.Parameter]:
        """The tensors whose .grad holds this rank's gradients after forward_backward: its ZeRO shards
        (under stage 2 the whole parameters hold none), else the parameters."""
        return self.zero.shards() if self.zero else self.parameters()

    def zero_grad(self) -> None:
        if self.zero:
            self.zero.zero_grad()
        else:
            super().zero_grad()

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return self.zero.make_optimizer(lr) if self.zero else super().make_optimizer(lr)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.zero:
            self.zero.optimizer_step(optimizer)
        else:
            optimizer.step()

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
        if self.zero:
            return {**self.inner.figures(), **self.zero.figures()}
        return {**self.inner.figures(), "zero_stage": 0, "grad_bytes": self.grad_bytes}

    def _workload(self, train: bool):
        return self.zero.workload(train) if self.zero else nullcontext()

    def forward_logits(self, idx: torch.Tensor) -> torch.Tensor | None:
        with self._workload(train=False):
            return self.inner.forward_logits(idx[self.batch_rows(idx.shape[0])])

    def generate(self, idx: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        with self._workload(train=False):
            return self.inner.generate(idx[self.batch_rows(idx.shape[0])], new_tokens)

    def forward_backward(self, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
        rows = self.batch_rows(idx.shape[0])
        if self.zero:
            with self.zero.workload(train=True):  # reduces (ZeRO's way) when the inner backward is done
                loss = self.inner.forward_backward(idx[rows], targets[rows])
        else:
            loss = self.inner.forward_backward(idx[rows], targets[rows])
            self.average_gradients()
        if loss is None:
            return None
        # The global loss is the mean of the replicas' means (equal rows each); only output ranks
        # hold a loss, and a data-parallel group never mixes output and non-output ranks.
        total = self.dp.all_reduce(torch.tensor([loss], dtype=torch.float64, device=self.device))
        return total.item() / self.mesh.dp_size

    def _arm(self) -> None:
        """Just before the last microbatch's backward: from now on a bucket's last gradient starts its all-reduce."""
        self._missing = [len(b) for b in self.buckets]

    def _grad_ready(self, i: int) -> None:
        if not self._missing:
            return  # an earlier microbatch's backward (its gradients are not final) or one outside forward_backward
        self._missing[i] -= 1
        if self._missing[i] == 0:
            self._start_bucket(i)

    @torch.no_grad()
    def _start_bucket(self, i: int) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.buckets[i]])
        self._pending[i] = self.dp.all_reduce_async(flat.to(self.reduce_dtype) if self.reduce_dtype else flat)

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Finish every bucket's sum (starting those no hook started), divide by dp, hand back as .grad."""
        if self.mesh.dp_size == 1:
            return
        for i in range(len(self.buckets)):
            if self._pending[i] is None:
                self._start_bucket(i)
        self.grad_bytes = 0
        for i, bucket in enumerate(self.buckets):
            flat = self._pending[i].wait()
            flat /= self.mesh.dp_size
            flat = flat.to(bucket[0].dtype)  # the mean back in the gradients' dtype (reduced wider: reduce_dtype)
            self.grad_bytes += flat.numel() * flat.element_size()
            offset = 0
            for p in bucket:
                n = p.numel()
                p.grad = flat[offset : offset + n].view_as(p)
                offset += n
        self._pending = [None] * len(self.buckets)
        self._missing = []
