"""The rank layout over tp x pp x dp and every process group built from it: the one place that knows ranks.

Layout: tp is innermost, then dp, then pp:  rank = (pp_i * dp + dp_i) * tp + tp_i.
Why this order: tensor-parallel peers exchange the most bytes (several all-reduces per layer), so
they get consecutive ranks (the same node / NVLink island on real clusters); data-parallel peers
all-reduce gradients once a step; pipeline neighbours only exchange activations, so they are
farthest apart. This is Megatron's default order.

Across nodes: torchrun numbers ranks node by node (node k holds ranks k*R .. k*R + R-1 for R ranks per
node), so with tp dividing R a tensor-parallel group never leaves its node, and pipeline stages -- the
outermost coordinate -- land on different nodes once the job has more than one. The Slurm launcher refuses
a tp that does not divide the ranks per node (runner/service/launchers/slurm.py layout_problems), and the run
page's per-rank table shows each rank's node.

Grouped-query attention whose key/value heads are fewer than tp copies each head to kv_share = tp / n_kv_head
consecutive tp ranks (runner/gpt/tp_plan.py); a 'kv' group joins those ranks, which sum the gradient of
the head they share. With kv_share 1 the kv groups are single ranks.

`grid()` is pure arithmetic (tested without processes); `Mesh.build(dims)` creates the groups that carry
collectives -- tp, dp, kv and the tied embedding's first+last stage pairs, each only where it has more than one
rank -- with torch.distributed, on every rank in the same order, as new_group requires. Pipeline neighbours talk
point-to-point over the world group (runner/gpt/stage_links.py StageLinks), so a pipeline column gets no group: a
communicator nobody uses still costs its set-up and, on NCCL, GPU memory. On CUDA the job binds the default group
to its device (init_process_group(device_id=...)), so every new_group here creates its NCCL communicator at once
(split from the default one) instead of at its first collective inside a timed step or mid-generate. It gives the rank's
counters a StepClock for its device (CUDA events under NCCL, the host clock under gloo). `barrier()`
is the one barrier every caller uses: valid on NCCL as on gloo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import torch
import torch.distributed as dist

from runner.gpt.comm import CommStats, GroupComm
from runner.gpt.timing import StepClock
from runner.spec.strategies.dims import ParallelDims


def rank_device() -> torch.device:
    """The device this rank's tensors and clock live on: the current CUDA device under NCCL (the job
    calls torch.cuda.set_device before creating the process group), the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gloo_available() -> bool:
    """Whether this torch build has gloo, which every CPU run needs (the self-test reports it)."""
    return dist.is_available() and dist.is_gloo_available()


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """dist.barrier on `group` (default: every rank). On NCCL the barrier is an all-reduce on a device,
    so it names this rank's device: left to guess, PyTorch picks cuda:(rank % devices), which is wrong
    for subgroups and warns that it can hang. An NCCL barrier blocks the host until it has completed
    on the device; the job uses it only between steps."""
    if dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)


COLLECTIVE_GROUPS = ("tp", "dp", "kv", "embed")  # the kinds of group collectives run on; grid's "pp" columns are not one


@dataclass(frozen=True)
class Coord:
    tp: int
    pp: int
    dp: int


def rank_of(c: Coord, tp: int, pp: int, dp: int) -> int:
    return (c.pp * dp + c.dp) * tp + c.tp


def coord_of(rank: int, tp: int, pp: int, dp: int) -> Coord:
    return Coord(tp=rank % tp, dp=(rank // tp) % dp, pp=rank // (tp * dp))


def grid(tp: int, pp: int, dp: int, kv_share: int = 1) -> dict[str, list[list[int]]]:
    """Every group of each kind as sorted rank lists; the groups of one kind partition the ranks.

    'embed' pairs the first and last pipeline stage of each (tp, dp) column: they both hold the
    tied token embedding / LM head and must sum its gradient (only when pp > 1); generate passes the
    picked tokens over it. 'kv' splits each tp group into runs of kv_share consecutive ranks.
    """
    world = tp * pp * dp
    if min(tp, pp, dp) < 1:
        raise ValueError(f"degrees must be >= 1, got tp={tp} pp={pp} dp={dp}")
    if kv_share < 1 or tp % kv_share:
        raise ValueError(f"kv_share {kv_share} must divide tp {tp}")
    groups: dict[str, list[list[int]]] = {"tp": [], "pp": [], "dp": [], "embed": [], "kv": []}
    for p, d in product(range(pp), range(dp)):
        ranks = [rank_of(Coord(t, p, d), tp, pp, dp) for t in range(tp)]
        groups["tp"].append(ranks)
        groups["kv"] += [ranks[i : i + kv_share] for i in range(0, tp, kv_share)]
    for p, t in product(range(pp), range(tp)):
        groups["dp"].append([rank_of(Coord(t, p, d), tp, pp, dp) for d in range(dp)])
    for d, t in product(range(dp), range(tp)):
        column = [rank_of(Coord(t, p, d), tp, pp, dp) for p in range(pp)]
        groups["pp"].append(column)
        if pp > 1:
            groups["embed"].append([column[0], column[-1]])
    assert all(sorted(sum(groups[k], [])) == list(range(world)) for k in ("tp", "pp", "dp", "kv"))
    return groups


@dataclass
class Mesh:
    """This rank's place in the grid and a GroupComm for each kind of group it belongs to."""

    tp_size: int
    pp_size: int
    dp_size: int
    rank: int
    stats: CommStats
    tp: GroupComm | None = None
    dp: GroupComm | None = None
    embed: GroupComm | None = None  # first+last pipeline stage of this column, when pp > 1
    kv: GroupComm | None = None  # the tp ranks sharing this rank's key/value heads (grouped-query attention)
    world: GroupComm | None = None
    _groups: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def coord(self) -> Coord:
        return coord_of(self.rank, self.tp_size, self.pp_size, self.dp_size)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size * self.dp_size

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.pp_size - 1

    def stage_rank(self, stage: int) -> int:
        """Global rank of pipeline stage `stage` in this rank's (tp, dp) column."""
        c = self.coord
        return rank_of(Coord(c.tp, stage, c.dp), self.tp_size, self.pp_size, self.dp_size)

    @classmethod
    def build(cls, dims: ParallelDims, stats: CommStats | None = None, tied: bool = True, kv_share: int = 1) -> Mesh:
        """Create every group collectives run on, on every rank (new_group is collective), and keep this rank's,
        for the run's degrees (validated when `dims` was made) and key/value head copies (`kv_copies`). tied: the
        first and last stages exchange over their embed pair (train: the tied embedding's gradient; generate: the
        next token); a forward pass never does, so it creates none."""
        tp, pp, dp = dims
        rank, world = dist.get_rank(), dist.get_world_size()
        if tp * pp * dp != world:
            raise ValueError(f"tp x pp x dp = {tp * pp * dp} but the job has {world} ranks")
        stats = stats or CommStats()
        stats.clock.device = rank_device()  # keeps a clock the caller switched off switched off
        mesh = cls(tp, pp, dp, rank, stats, _groups=grid(tp, pp, dp, kv_share))
        mesh.world = GroupComm(dist.group.WORLD, list(range(world)), stats)
        for kind in COLLECTIVE_GROUPS if tied else ("tp", "dp", "kv"):
            for ranks in mesh._groups[kind]:
                # Single-rank groups need no communicator; every rank still walks the same list.
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    setattr(mesh, kind, GroupComm(group, ranks, stats))
        # A collective on the default group before any point-to-point batch: NCCL requires every rank
        # of a group to take part in its first operation, and pipeline batches involve two ranks.
        barrier()
        return mesh

    @property
    def clock(self) -> StepClock:
        return self.stats.clock
