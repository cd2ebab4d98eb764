"""The rank layout: every factorisation up to 16 ranks gives the groups the layout promises."""

from __future__ import annotations

from itertools import product

import pytest

from runner.gpt.mesh import Coord, coord_of, grid, rank_of


def factorisations(world: int):
    for tp, pp in product(range(1, world + 1), repeat=2):
        if world % (tp * pp) == 0:
            yield tp, pp, world // (tp * pp)


@pytest.mark.parametrize("world", range(1, 17))
def test_groups_partition_ranks_and_follow_the_layout(world):
    for tp, pp, dp in factorisations(world):
        groups = grid(tp, pp, dp)
        for kind in ("tp", "pp", "dp"):
            flat = sorted(r for g in groups[kind] for r in g)
            assert flat == list(range(world)), (kind, tp, pp, dp)
        for rank in range(world):
            c = coord_of(rank, tp, pp, dp)
            assert rank_of(c, tp, pp, dp) == rank
            (tp_group,) = [g for g in groups["tp"] if rank in g]
            (pp_group,) = [g for g in groups["pp"] if rank in g]
            (dp_group,) = [g for g in groups["dp"] if rank in g]
            # A group of one kind varies only that coordinate, in order.
            assert tp_group == [rank_of(Coord(t, c.pp, c.dp), tp, pp, dp) for t in range(tp)]
            assert pp_group == [rank_of(Coord(c.tp, p, c.dp), tp, pp, dp) for p in range(pp)]
            assert dp_group == [rank_of(Coord(c.tp, c.pp, d), tp, pp, dp) for d in range(dp)]
        if pp > 1:
            assert len(groups["embed"]) == tp * dp
            for first, last in groups["embed"]:
                assert coord_of(first, tp, pp, dp).pp == 0 and coord_of(last, tp, pp, dp).pp == pp - 1
        else:
            assert groups["embed"] == []


def test_tensor_parallel_peers_are_consecutive_ranks():
    # The guide's 64-GPU example: 8-way tp, 4-way pp, 2-way dp.
    groups = grid(8, 4, 2)
    assert groups["tp"][0] == list(range(8))
    assert groups["dp"][0] == [0, 8]
    assert groups["pp"][0] == [0, 16, 32, 48]


def test_bad_degrees_are_refused():
    with pytest.raises(ValueError, match="degrees must be >= 1"):
        grid(0, 1, 1)


def test_mesh_build_takes_the_degrees_object_and_refuses_a_wrong_world_size(tmp_path):
    """One gloo rank in this process: Mesh.build(ParallelDims) lays it out; degrees whose product is not
    the job's world size are refused with both numbers named."""
    import torch.distributed as dist

    from runner.gpt.mesh import Mesh
    from runner.spec.strategies.dims import ParallelDims

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = Mesh.build(ParallelDims())
        assert (mesh.tp_size, mesh.pp_size, mesh.dp_size, mesh.coord) == (1, 1, 1, Coord(tp=0, pp=0, dp=0))
        assert mesh.tp.size == mesh.dp.size == 1 and mesh.embed is None and not hasattr(mesh, "pp")
        with pytest.raises(ValueError, match="tp x pp x dp = 2 but the job has 1 ranks"):
            Mesh.build(ParallelDims(tp=2))
    finally:
        dist.destroy_process_group()
