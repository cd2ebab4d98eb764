"""Instrumented communication: every collective and point-to-point call goes through here and is counted.

`GroupComm` wraps one process group; each call records the payload bytes (the tensor handed to it)
and the seconds spent, by kind, into the rank's `CommStats`. Time blocked in `recv` counts as idle
(waiting for a peer), everything else as communication. Counting is switched on only for timed steps.
Autograd operators for tensor parallelism (identity/all-reduce conjugates) live at the bottom.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send", "recv")


def _sync(t: torch.Tensor) -> None:
    # CUDA ops are asynchronous: without this the clock would measure the launch, not the transfer.
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@dataclass
class CommStats:
    """Per-rank counters; `counting` is False during warm-up so only timed steps are reported."""

    counting: bool = False
    bytes: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    comm_s: float = 0.0
    idle_s: float = 0.0

    def record(self, kind: str, nbytes: int, seconds: float, idle: bool = False) -> None:
        if not self.counting:
            return
        self.bytes[kind] += nbytes
        self.calls[kind] += 1
        if idle:
            self.idle_s += seconds
        else:
            self.comm_s += seconds

    def record_time(self, seconds: float) -> None:
        """Communication time with no new payload (waiting for an asynchronous call)."""
        if self.counting:
            self.comm_s += seconds

    def add_idle(self, seconds: float) -> None:
        if self.counting:
            self.idle_s += seconds

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.comm_s = self.idle_s = 0.0

    def as_dict(self) -> dict:
        return {
            "comm_bytes": {k: int(self.bytes.get(k, 0)) for k in KINDS},
            "comm_calls": {k: int(self.calls.get(k, 0)) for k in KINDS},
            "comm_s": self.comm_s,
            "idle_s": self.idle_s,
        }


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class GroupComm:
    """One process group (None for a group of one rank) with counted collectives."""

    group: dist.ProcessGroup | None
    ranks: list[int]
    stats: CommStats

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def index(self) -> int:
        """This rank's position inside the group."""
        return self.ranks.index(dist.get_rank())

    def _timed(self, kind: str, payload: torch.Tensor, fn, idle: bool = False):
        start = time.perf_counter()
        out = fn()
        _sync(payload)
        self.stats.record(kind, nbytes(payload), time.perf_counter() - start, idle=idle)
        return out

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce over the group (sum unless op says otherwise), in place; returns t."""
        if self.size > 1:
            self._timed("all_reduce", t, lambda: dist.all_reduce(t, op=op, group=self.group))
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's t along dim (rank order of the group)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._timed("all_gather", t, lambda: dist.all_gather(parts, t, group=self.group))
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum over the group, then keep this rank's 1/size chunk along dim."""
        if self.size == 1:
            return t
        chunks = [c.contiguous() for c in t.chunk(self.size, dim=dim)]
        out = torch.empty_like(chunks[0])
        self._timed("reduce_scatter", t, lambda: dist.reduce_scatter(out, chunks, group=self.group))
        return out

    def broadcast(self, t: torch.Tensor, src_index: int = 0) -> torch.Tensor:
        if self.size > 1:
            src = self.ranks[src_index]
            self._timed("broadcast", t, lambda: dist.broadcast(t, src=src, group=self.group))
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        """Blocking send to global rank dst."""
        t = t.contiguous()
        self._timed("send", t, lambda: dist.send(t, dst=dst))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        """Blocking receive from global rank src; the wait counts as idle time."""
        buf = torch.empty(shape, dtype=dtype, device=device)
        self._timed("recv", buf, lambda: dist.recv(buf, src=src), idle=True)
        return buf

    def isend(self, t: torch.Tensor, dst: int) -> PendingCollective:
        """Start a send to global rank dst; never blocks, so neighbours sending to each other cannot deadlock.
        The caller keeps the handle and waits for it before the step ends."""
        t = t.contiguous()
        start = time.perf_counter()
        work = dist.isend(t, dst=dst)
        self.stats.record("send", nbytes(t), time.perf_counter() - start)
        return PendingCollective(work, t, self.stats, "send")

    def all_reduce_async(self, t: torch.Tensor) -> PendingCollective:
        """Start a sum over the group in place; the bytes count now, the time when it is waited for."""
        if self.size == 1:
            return PendingCollective(None, t, self.stats, "all_reduce")
        start = time.perf_counter()
        work = dist.all_reduce(t, group=self.group, async_op=True)
        self.stats.record("all_reduce", nbytes(t), time.perf_counter() - start)
        return PendingCollective(work, t, self.stats, "all_reduce")

    def wait_for_peers(self) -> None:
        """Block until every rank of the group arrives; the wait counts as idle (no payload, no call).
        Called before a collective whose peers may still be computing, so that waiting for them is not
        booked as communication time (e.g. the last pipeline stage waiting for the first one's backward)."""
        if self.size > 1:
            start = time.perf_counter()
            dist.barrier(group=self.group)
            self.stats.add_idle(time.perf_counter() - start)


@dataclass
class PendingCollective:
    """An asynchronous collective in flight; wait() blocks and counts the blocked time as communication."""

    work: dist.Work | None
    tensor: torch.Tensor
    stats: CommStats
    kind: str

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            _sync(self.tensor)
            self.stats.record_time(time.perf_counter() - start)
        return self.tensor


# ---- tensor-parallel autograd operators (Megatron's mappings.py, named as there) ------------------
# Each pair is conjugate: what one does forward, the other does backward. A tensor-parallel region is
# entered with copy_to_parallel_region (every rank needs the whole input; its gradient is a sum of
# per-rank partial gradients) and left with reduce_from_parallel_region (the outputs are partial sums;
# their gradient is already whole on every rank), so the region gives the reference gradients.
# Sequence-parallel twins work on dim 1 of [batch, seq, hidden]: outside the parallel region each rank
# holds seq/tp positions, and the all-reduce becomes reduce-scatter (leaving) + all-gather (entering).
# With a group of one rank every operator is the identity and adds no autograd node.


class _CopyToParallelRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)  # a new tensor object, so autograd records this node

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_reduce(grad.contiguous()), None


class _ReduceFromParallelRegion(torch.autograd.Function):
    """All-reduce forward (summing a row-parallel layer's partial outputs); identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        # In place, as Megatron does: x is the fresh partial output of a row-parallel matmul, which no
        # autograd node saves (the matmul saves its input and weight), so summing into it is safe and
        # saves a copy of [b, s, h] per layer.
        return comm.all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToParallelRegion(torch.autograd.Function):
    """Keep this rank's chunk of the last dim forward; all-gather the last dim backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        ctx.comm = comm
        return x.chunk(comm.size, dim=-1)[comm.index].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_gather(grad, dim=-1), None


class _GatherFromParallelRegion(torch.autograd.Function):
    """All-gather the last dim forward; keep this rank's chunk backward (the gradient is replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_gather(x, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.comm.size, dim=-1)[ctx.comm.index].contiguous(), None


class _ScatterToSequence(torch.autograd.Function):
    """Keep this rank's seq/tp positions forward (a replicated tensor entering the sequence-parallel
    region); all-gather the sequence backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        ctx.comm = comm
        return x.chunk(comm.size, dim=1)[comm.index].contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_gather(grad, dim=1), None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather the sequence forward (entering the tensor-parallel region from a sequence-parallel
    one); reduce-scatter the sequence backward (each rank's gradient is a partial sum over its columns)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_gather(x, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.reduce_scatter(grad.contiguous(), dim=1), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Reduce-scatter along the sequence forward (leaving a row-parallel layer into the
    sequence-parallel region); all-gather the sequence backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.reduce_scatter(x.contiguous(), dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.comm.all_gather(grad.contiguous(), dim=1), None


def copy_to_parallel_region(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
    return _CopyToParallelRegion.apply(x, comm) if comm.size > 1 else x


def reduce_from_parallel_region(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
    return _ReduceFromParallelRegion.apply(x, comm) if comm.size > 1 else x


def scatter_to_parallel_region(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
    return _ScatterToParallelRegion.apply(x, comm) if comm.size > 1 else x


def gather_from_parallel_region(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
    return _GatherFromParallelRegion.apply(x, comm) if comm.size > 1 else x


def scatter_to_sequence(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
    return _ScatterToSequence.apply(x, comm) if comm.size > 1 else x


def gather_from_sequence(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
    return _GatherFromSequence.apply(x, comm) if comm.size > 1 else x


def reduce_scatter_to_sequence(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
    return _ReduceScatterToSequence.apply(x, comm) if comm.size > 1 else x
