"""Instrumented communication: every collective and point-to-point call goes through here and is counted.

`GroupComm` wraps one process group; each call records, by kind, into the rank's `CommStats`:
- payload bytes, with one convention for every kind: S is the full logical tensor of the operation --
  all_reduce: the tensor; all_gather: the gathered output (group size x the local shard);
  reduce_scatter: the full input; broadcast: the tensor; send: the tensor. Point-to-point traffic is
  counted once, at the sender; a receive counts as a call (kind recv) with no bytes;
- estimated wire bytes, what this rank puts on the network for it with the bandwidth-optimal
  algorithms NCCL uses (the bus-bandwidth factors of nccl-tests, doc/PERFORMANCE.md; Patarasuk & Yuan,
  "Bandwidth optimal all-reduce algorithms for clusters of workstations", JPDC 2009; Thakur,
  Rabenseifner & Gropp, "Optimization of collective communication operations in MPICH", IJHPCA 2005):
  ring all_reduce 2(n-1)/n * S (a reduce-scatter then an all-gather), all_gather and reduce_scatter
  (n-1)/n * S, broadcast S (pipelined ring: every rank but the last forwards the whole tensor), send S;
- seconds, through the rank's StepClock (runner/gpt/timing.py): host time on CPU, CUDA events on the
  current stream on GPU, resolved at the end of the step. Time blocked on a receive (waiting for a
  peer) is idle; everything else is communication. On CUDA the figure is how long the compute stream
  stood still for the call, so communication that overlaps compute on the device costs nothing here.

So sequence parallelism's reduce-scatter + all-gather put exactly the wire bytes of the all-reduce
they replace on the network (Korthikanti et al., "Reducing activation recomputation in large
transformer models", 2022, section 4.2.2), while counting two payloads of S where the all-reduce
counts one.

Instrumentation is on only while `CommStats.counting` is True (the job sets it for timed steps). With
counting False a call goes straight to torch.distributed: no clock mark, no counter; with the clock
also disabled (`stats.clock.enabled = False`) the pipeline records no spans either, so a benchmark can
time a step with no instrumentation at all and compare.
Autograd operators for tensor parallelism (identity/all-reduce conjugates) live at the bottom.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from runner.gpt.timing import Mark, StepClock

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send")  # kinds that carry bytes
CALL_KINDS = (*KINDS, "recv")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def wire_bytes(kind: str, payload: int, n: int) -> int:
    """Estimated bytes one rank of an n-rank group sends for an operation of payload S (see the module
    docstring for the algorithms and sources); rounded down to whole bytes."""
    if kind == "all_reduce":
        return 2 * (n - 1) * payload // n
    if kind in ("all_gather", "reduce_scatter"):
        return (n - 1) * payload // n
    if kind in ("broadcast", "send"):
        return payload
    return 0  # recv: the sender counts the message


@dataclass
class CommStats:
    """Per-rank counters; `counting` is False during warm-up so only timed steps are reported.

    comm_s and idle_s resolve the clock's pending intervals when read (on CUDA: read them at the end
    of a step, where the job resolves anyway)."""

    counting: bool = False
    clock: StepClock = field(default_factory=StepClock)
    bytes: Counter = field(default_factory=Counter)
    wire: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)
    _comm_s: float = 0.0
    _idle_s: float = 0.0
    # (kind, start, end) in step seconds of each collective the clock timed: the timeline's communication segments
    segments: list[tuple[str, float, float]] = field(default_factory=list)

    def record(self, kind: str, payload: int, group_size: int) -> None:
        """One call of `kind` with payload S (0 for recv) in a group of group_size ranks."""
        if not self.counting:
            return
        self.calls[kind] += 1
        if kind in KINDS:
            self.bytes[kind] += payload
            self.wire[kind] += wire_bytes(kind, payload, group_size)

    def time(self, start: Mark, end: Mark, idle: bool = False, kind: str | None = None) -> None:
        """Book the interval between two clock marks as communication (or idle) time; a collective's `kind` also
        keeps it as a segment of the timeline."""
        if not self.counting:
            return
        if idle:
            self.clock.add(start, end, self._add_idle)
        elif kind is not None:
            self.clock.add(start, end, functools.partial(self._add_collective, kind))
        else:
            self.clock.add(start, end, self._add_comm)

    def _add_comm(self, start: float, end: float) -> None:
        self._comm_s += end - start

    def _add_collective(self, kind: str, start: float, end: float) -> None:
        self._comm_s += end - start
        self.segments.append((kind, start, end))

    def take_segments(self) -> list[tuple[str, float, float]]:
        """The collectives timed since the last call, (kind, start, end) in step seconds."""
        self.clock.resolve()
        segments, self.segments = self.segments, []
        return segments

    def _add_idle(self, start: float, end: float) -> None:
        self._idle_s += end - start

    @property
    def comm_s(self) -> float:
        self.clock.resolve()
        return self._comm_s

    @property
    def idle_s(self) -> float:
        self.clock.resolve()
        return self._idle_s

    def reset(self) -> None:
        self.clock.resolve()
        self.bytes.clear()
        self.wire.clear()
        self.calls.clear()
        self.segments.clear()
        self._comm_s = self._idle_s = 0.0

    def as_dict(self) -> dict:
        return {
            "comm_bytes": {k: int(self.bytes.get(k, 0)) for k in KINDS},
            "comm_wire_bytes": {k: int(self.wire.get(k, 0)) for k in KINDS},
            "comm_calls": {k: int(self.calls.get(k, 0)) for k in CALL_KINDS},
            "comm_s": self.comm_s,
            "idle_s": self.idle_s,
        }


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

    def _counted(self, kind: str, payload: int, fn, idle: bool = False):
        stats = self.stats
        if not stats.counting:  # instrumentation off: not even a clock mark
            return fn()
        start = stats.clock.mark()
        out = fn()
        stats.time(start, stats.clock.mark(), idle=idle, kind=kind)
        stats.record(kind, payload, self.size)
        return out

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce over the group (sum unless op says otherwise), in place; returns t."""
        if self.size > 1:
            self._counted("all_reduce", nbytes(t), lambda: dist.all_reduce(t, op=op, group=self.group))
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's t along dim (rank order of the group)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        self._counted("all_gather", nbytes(t) * self.size, lambda: dist.all_gather(parts, t, group=self.group))
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Sum over the group, then keep this rank's 1/size chunk along dim."""
        if self.size == 1:
            return t
        chunks = [c.contiguous() for c in t.chunk(self.size, dim=dim)]
        out = torch.empty_like(chunks[0])
        self._counted("reduce_scatter", nbytes(t), lambda: dist.reduce_scatter(out, chunks, group=self.group))
        return out

    def broadcast(self, t: torch.Tensor, src_index: int = 0) -> torch.Tensor:
        if self.size > 1:
            src = self.ranks[src_index]
            self._counted("broadcast", nbytes(t), lambda: dist.broadcast(t, src=src, group=self.group))
        return t

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> P2PBatch:
        """Start sends (tensor, global dst) and receives (buffer, global src) as one batch.

        One `batch_isend_irecv`: on NCCL the operations form one group and progress together, so a
        send and a receive between the same two ranks cannot wait on each other whatever their size
        (runner/gpt/pipeline.py has the argument); gloo starts each one asynchronously. Ranks are
        global. NCCL needs every rank of the group to have joined a collective on it before a batch
        that involves only some of them: the pipeline exchanges on the default group (Mesh.build ends
        with a barrier on it) or on a two-rank group. The payloads are counted now; the caller waits on
        the returned batch."""
        ops = [dist.P2POp(dist.isend, t, dst, group=self.group) for t, dst in sends]
        ops += [dist.P2POp(dist.irecv, buf, src, group=self.group) for buf, src in recvs]
        if not ops:
            return P2PBatch([], self.stats)
        stats = self.stats
        start = stats.clock.mark() if stats.counting else None
        works = dist.batch_isend_irecv(ops)
        if stats.counting:
            stats.time(start, stats.clock.mark())  # starting them (on CUDA: nothing the stream waits for)
            for t, _ in sends:
                stats.record("send", nbytes(t), 2)
            for _ in recvs:
                stats.record("recv", 0, 2)
        return P2PBatch(works, stats)

    def all_reduce_async(self, t: torch.Tensor) -> PendingCollective:
        """Start a sum over the group in place; the bytes count now, the time when it is waited for."""
        if self.size == 1:
            return PendingCollective(None, t, self.stats)
        stats = self.stats
        start = stats.clock.mark() if stats.counting else None
        work = dist.all_reduce(t, group=self.group, async_op=True)
        if stats.counting:
            stats.time(start, stats.clock.mark())
            stats.record("all_reduce", nbytes(t), self.size)
        return PendingCollective(work, t, stats, "all_reduce")

    def wait_for_peers(self) -> None:
        """Wait until every rank of the group arrives; the wait counts as idle (no payload, no call).

        Called before a collective whose peers may still be computing, so that waiting for them is not
        booked as that collective's communication time (e.g. the last pipeline stage waiting for the
        first one's backward). It is an all-reduce of one number rather than a barrier: on NCCL a
        barrier blocks the host and drains the device, whereas this only makes the compute stream wait,
        and it completes when the last peer has reached it on the device as on the host."""
        if self.size > 1:
            stats = self.stats
            start = stats.clock.mark() if stats.counting else None
            token = torch.zeros(1, device=_device_of(self.group))
            dist.all_reduce(token, group=self.group)
            if stats.counting:
                stats.time(start, stats.clock.mark(), idle=True)


def _device_of(group: dist.ProcessGroup | None) -> torch.device:
    """Where a group's tensors must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class P2PBatch:
    """Point-to-point operations in flight (GroupComm.exchange)."""

    works: list[dist.Work]
    stats: CommStats

    def wait(self, idle: bool) -> None:
        """Block until every operation of the batch has completed (on CUDA: make the current stream
        wait for them). The time counts as idle when the batch holds a receive the caller needs (it
        waits for a neighbour), as communication otherwise."""
        if not self.works:
            return
        stats = self.stats
        start = stats.clock.mark() if stats.counting else None
        for work in self.works:
            work.wait()
        if stats.counting:
            stats.time(start, stats.clock.mark(), idle=idle)
        self.works = []


@dataclass
class PendingCollective:
    """An asynchronous collective in flight; wait() blocks and counts the blocked time as communication."""

    work: dist.Work | None
    tensor: torch.Tensor
    stats: CommStats
    kind: str = "all_reduce"

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            stats = self.stats
            start = stats.clock.mark() if stats.counting else None
            # On CUDA this makes the current stream wait for the collective, not the host.
            self.work.wait()
            if stats.counting:
                stats.time(start, stats.clock.mark(), kind=self.kind)
            self.work = None
        return self.tensor


# ---- tensor-parallel autograd operators (Megatron's mappings.py, named as there) ------------------
# Conjugate operators: each one's backward is what its counterpart does forward. A tensor-parallel region is
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


def _region_operator(function: type[torch.autograd.Function]):
    """The operator as a function of (x, comm): the identity, with no autograd node, on a group of one rank."""

    def apply(x: torch.Tensor, comm: GroupComm) -> torch.Tensor:
        return function.apply(x, comm) if comm.size > 1 else x

    apply.__doc__ = function.__doc__
    return apply


copy_to_parallel_region = _region_operator(_CopyToParallelRegion)
reduce_from_parallel_region = _region_operator(_ReduceFromParallelRegion)
gather_from_parallel_region = _region_operator(_GatherFromParallelRegion)
scatter_to_sequence = _region_operator(_ScatterToSequence)
gather_from_sequence = _region_operator(_GatherFromSequence)
reduce_scatter_to_sequence = _region_operator(_ReduceScatterToSequence)
