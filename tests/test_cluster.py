"""runner.service.cluster: reading a Slurm partition with sinfo (captured outputs of real clusters, and the real two-node
cluster of tests/slurm_cluster.py) and judging a spec against its target (partition or machine)."""

from __future__ import annotations

import re
import socket

import pytest

from runner.service.cluster import (
    ClusterError,
    Node,
    Partition,
    gpu_count_on,
    gres_gpus,
    parse_sinfo,
    partition_or_error,
    placement_problems,
    read_partition,
)
from runner.spec.run_spec import RunSpec

pytest_plugins = ["tests.slurm_cluster"]

# Captured from `sinfo -h -p P -N -o "%N|%c|%G|%T"` on: the local two-node cluster (Slurm 22.05), a GPU
# cluster with typed GRES and socket affinity, and one with a node down and one drained.
LOCAL = "n1|2|(null)|idle\nn2|2|(null)|idle\n"
GPU = "gpu-a01|64|gpu:a100:4(S:0-1)|mixed\ngpu-a02|64|gpu:a100:4(S:0-1)|idle\ngpu-a03|64|gpu:a100:4(S:0-1)|allocated\n"
TROUBLED = "c1|8|gpu:2,mps:200|idle\nc2|8|gpu:2,mps:200|down*\nc3|8|gpu:2,mps:200|drained\nc4|8|gpu:2|idle~\n"


def test_gres_counts_gpus_only() -> None:
    assert gres_gpus("(null)") == 0
    assert gres_gpus("") == 0
    assert gres_gpus("gpu:4") == 4
    assert gres_gpus("gpu:a100:4(S:0-1)") == 4
    assert gres_gpus("gpu:a100:2,gpu:v100:2") == 4  # two types on one node
    assert gres_gpus("gpu:4,mps:400") == 4  # MPS shares are not GPUs
    assert gres_gpus("gpu:h100:8(IDX:0-3,5-7)") == 8  # a comma inside the parentheses
    assert gres_gpus("gpu") == 1  # Slurm's default count
    assert gres_gpus("shard:8") == 0
    with pytest.raises(ValueError):
        gres_gpus("gpu:a100:many")


def test_parse_local_cluster() -> None:
    p = parse_sinfo(LOCAL, "lab", account="ml", default_nodes=2)
    assert [n.name for n in p.nodes] == ["n1", "n2"]
    assert (p.node_count, p.cpus_per_node, p.gpus_per_node, p.idle_count) == (2, 2, 0, 2)
    assert p.to_dict() == {
        "partition": "lab", "account": "ml", "default_nodes": 2, "error": None,
        "nodes": [{"name": "n1", "cpus": 2, "gpus": 0, "state": "idle"},
                  {"name": "n2", "cpus": 2, "gpus": 0, "state": "idle"}],
    }  # fmt: skip
    assert Partition.from_dict(p.to_dict()) == p  # what the lease stores reads back unchanged


def test_parse_gpu_cluster_and_states() -> None:
    p = parse_sinfo(GPU, "a100")
    assert (p.node_count, p.cpus_per_node, p.gpus_per_node, p.idle_count, p.usable_count) == (3, 64, 4, 1, 3)
    t = parse_sinfo(TROUBLED, "mix")
    assert [n.usable for n in t.nodes] == [True, False, False, True]  # down (not responding), drained
    assert [n.idle for n in t.nodes] == [True, False, False, True]  # idle~ is powered down, Slurm powers it up
    assert t.gpus_per_node == 2


def test_parse_errors_say_what_is_wrong() -> None:
    with pytest.raises(ClusterError, match="no node in partition 'gpu'.*sinfo -s"):
        parse_sinfo("", "gpu")
    with pytest.raises(ClusterError, match="not 'node|cpus|gres|state'"):
        parse_sinfo("PARTITION AVAIL TIMELIMIT\n", "lab")
    with pytest.raises(ClusterError, match="node 'n1'.*CPU count"):
        parse_sinfo("n1|N/A|(null)|idle\n", "lab")
    assert parse_sinfo("n1|4|(null)|idle\nn1|4|(null)|idle\n", "lab").node_count == 1  # listed twice, counted once


def test_heterogeneous_partition_uses_the_smallest_node() -> None:
    p = Partition("mix", nodes=(Node("a", 32, 8, "idle"), Node("b", 16, 4, "idle")))
    assert (p.gpus_per_node, p.cpus_per_node) == (4, 16)  # a job asking 4 GPUs and 16 CPUs per node fits both


def test_from_dict_of_an_older_row() -> None:
    p = Partition.from_dict({"partition": "lab", "nodes": [{"name": "n1"}]})
    assert (p.node_count, p.gpus_per_node, p.cpus_per_node, p.account, p.error) == (1, 0, 0, None, None)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the real cluster ---------------------------------------------------------------------------
def test_reads_the_real_two_node_cluster(slurm_cluster) -> None:
    p = read_partition(slurm_cluster.partition, "lab-account", default_nodes=2, env=slurm_cluster.env())
    assert [n.name for n in p.nodes] == list(slurm_cluster.nodes)
    assert p.cpus_per_node == slurm_cluster.cpus  # the CPUs= of its slurm.conf
    assert p.gpus_per_node == 0  # CPU nodes, no GRES
    assert all(n.usable for n in p.nodes)
    assert p.account == "lab-account"


def test_real_cluster_errors(slurm_cluster, tmp_path) -> None:
    with pytest.raises(ClusterError, match="no node in partition 'nope'"):
        read_partition("nope", env=slurm_cluster.env())
    # The same cluster's configuration with the controller on a port nothing listens on: "connect failure"
    conf = tmp_path / "slurm.conf"
    text = slurm_cluster.conf.read_text()
    text = re.sub(r"^SlurmctldPort=\d+", f"SlurmctldPort={closed_port()}", text, flags=re.M)
    conf.write_text(text + "MessageTimeout=1\n")  # the client gives up after its retries within ~1 s each
    broken = {**slurm_cluster.env(), "SLURM_CONF": str(conf)}
    with pytest.raises(ClusterError, match="sinfo could not read partition 'lab'"):
        read_partition("lab", env=broken)
    kept = partition_or_error("nope", env=slurm_cluster.env())  # what a runner publishes when sinfo fails
    assert kept.nodes == () and "no node in partition 'nope'" in kept.error
    no_path = {**slurm_cluster.env(), "PATH": "/nonexistent"}
    with pytest.raises(ClusterError, match="sinfo is not installed or not on PATH"):
        read_partition("lab", env=no_path)


# ---- judging a spec against its target ----------------------------------------------------------
LAB = parse_sinfo(LOCAL, "lab")  # 2 CPU nodes
A100 = parse_sinfo(GPU, "a100")  # 3 nodes x 4 GPUs


def fields(problems) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in problems]


def test_two_node_pipeline_fits_the_cpu_partition() -> None:
    spec = RunSpec(strategy="pipeline", pp=2, microbatches=2, nodes=2)
    assert placement_problems(spec, LAB) == []
    assert gpu_count_on(spec, LAB) == 0  # CPU nodes: the device checks see no GPU


def test_more_nodes_than_the_partition_has() -> None:
    spec = RunSpec(strategy="pipeline", pp=3, microbatches=3, nodes=3)
    (p,) = placement_problems(spec, LAB)
    assert p.field == "nodes"
    assert "must be <= the partition's nodes: lab has 2, the run asks for 3; choose 2 or fewer" in p.message


def test_tensor_parallelism_across_nodes_is_refused() -> None:
    spec = RunSpec(strategy="tensor", tp=2, nodes=2)  # one rank per node: a tp pair would span both
    (p,) = placement_problems(spec, LAB)
    assert p.field == "tp" and "tensor parallelism must stay within a node" in p.message
    assert placement_problems(RunSpec(strategy="tensor", tp=2, nodes=1), LAB) == []


def test_gpu_partition_needs_nodes_times_gpus_per_node_ranks() -> None:
    # 8 ranks = 2 nodes x 4 GPUs; tp=4 inside a node, pp=2 across the two
    good = RunSpec(strategy="3d", tp=4, pp=2, dp=1, microbatches=2, model="small", device="cuda", nodes=2)
    assert placement_problems(good, A100) == []
    assert gpu_count_on(good, A100) == 8
    short = RunSpec(strategy="3d", tp=4, pp=2, dp=1, microbatches=2, model="small", device="cuda", nodes=1)
    assert ("nodes", "nodes x GPUs per node must equal the world size: 1 x 4 = 4, the spec has 8 ranks") in fields(
        placement_problems(short, A100)
    )
    # no nodes given: as many as the GPUs need (8 / 4 = 2)
    assert placement_problems(RunSpec(strategy="data", dp=8, device="cuda"), A100) == []


def test_nodes_only_for_a_partition() -> None:
    assert fields(placement_problems(RunSpec(nodes=2), None)) == [
        ("nodes", "nodes only apply to a Slurm partition: leave it empty for this machine")
    ]
    assert "leave it empty for host beta" in placement_problems(RunSpec(nodes=1), None, "host beta")[0].message
    assert placement_problems(RunSpec(), None) == []


def test_runner_default_nodes_apply_when_the_spec_says_none() -> None:
    lab = Partition("lab", nodes=LAB.nodes, default_nodes=2)
    assert placement_problems(RunSpec(strategy="pipeline", pp=2, microbatches=2), lab) == []
    (p,) = placement_problems(RunSpec(strategy="pipeline", pp=3, microbatches=3), lab)
    assert p.field == "nodes" and "3 ranks cannot be spread evenly over 2 nodes" in p.message


def test_a_slurm_runner_publishes_its_partition_in_its_lease(slurm_cluster, engine, monkeypatch):
    from runner.service import loop as service
    from runner.service.launchers.slurm import SlurmLauncher
    from storage import hosts as leases

    monkeypatch.setenv("LAB_HOST", "slurm-lab")
    runner = service.Runner(engine, launcher=SlurmLauncher("lab", nodes=2, env=slurm_cluster.env()))
    assert runner.acquire()
    try:
        cluster = leases.runner_status(engine, "slurm-lab")["cluster"]
        assert [n["name"] for n in cluster["nodes"]] == ["n1", "n2"]
        assert (cluster["partition"], cluster["default_nodes"], cluster["error"]) == ("lab", 2, None)
        assert runner.cluster_due() is None  # read a moment ago: not again before CLUSTER_EVERY_S
        monkeypatch.setattr(service, "CLUSTER_EVERY_S", 0.0)
        runner.launcher.partition = "nope"  # what a later sinfo would say about a partition that went away
        assert "no node in partition 'nope'" in runner.cluster_due()["error"]
    finally:
        leases.release_lease(engine, runner.runner_id)
    local = service.Runner(engine)
    assert local.read_cluster() is None  # a machine's runner publishes no partition
