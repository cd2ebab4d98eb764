"""A Slurm partition as the Launch page and submit see it: its nodes, CPUs, GPUs and states read from `sinfo`,
and the problems of placing a spec there (or of asking for nodes where there is no partition).

A Slurm runner (`serve --backend slurm --partition P`) reads its partition with `read_partition` when it
starts and every ~30 s after (runner.service.loop), and publishes `Partition.to_dict()` in its lease's `cluster`
column; the page and `api.submit` read it back with `Partition.from_dict` and judge a spec with
`placement_problems`, the same layout rules the Slurm launcher applies (runner.service.launchers.slurm.layout_problems)
plus the partition's size, so a bad layout is refused before anything is queued.

`sinfo -h -p P -N -o "%N|%c|%G|%T"` prints one line per node: name, CPUs, configured GRES (`(null)`,
`gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:a100:2,gpu:v100:2`, `gpu:4,mps:400`) and its long state (`idle`,
`mixed`, `allocated`, `down*`, `drained`, `idle~`...). Every failure (sinfo missing, the controller not
answering, an unknown partition, a line we cannot read) is a ClusterError whose message says what to do.
No torch here: the app imports this module.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.service.launchers.slurm import layout_problems, nodes_for
from runner.spec.run_spec import RunSpec, SpecProblem

SINFO_FORMAT = "%N|%c|%G|%T"
SINFO_TIMEOUT_S = 10.0  # under the 30 s a lease stays fresh without a heartbeat
# Node states in which Slurm may still start a job on the node; down, drained, failed ... are not.
USABLE_STATES = {"idle", "mixed", "allocated", "completing", "planned", "reserved"}
_STATE_FLAGS = "*~#!%$@^-+"  # sinfo's suffixes: not responding, powered off, powering up, ... (state is the rest)
_GRES_COUNT = re.compile(r"^\d+$")


class ClusterError(RuntimeError):
    """The partition could not be read; the message says why and what to do."""


@dataclass(frozen=True)
class Node:
    """One node of the partition as sinfo reports it."""

    name: str
    cpus: int
    gpus: int
    state: str  # sinfo's long state with its flag suffixes (e.g. "idle", "down*")

    @property
    def base_state(self) -> str:
        """The state without sinfo's flag suffixes and drain/plus markers: 'idle', 'mixed', 'down', ..."""
        return self.state.rstrip(_STATE_FLAGS).split("+")[0].lower()

    @property
    def usable(self) -> bool:
        """Whether Slurm may start a job here (not down, drained, failed, or not responding)."""
        return self.base_state in USABLE_STATES and not self.state.endswith("*")

    @property
    def idle(self) -> bool:
        return self.base_state == "idle" and self.usable


@dataclass(frozen=True)
class Partition:
    """A Slurm partition: its name, the account runs are charged to, its nodes; `error` when sinfo failed."""

    name: str
    account: str | None = None
    nodes: tuple[Node, ...] = ()
    default_nodes: int | None = None  # the runner's --nodes: what a spec without nodes gets
    error: str | None = None

    @property
    def node_count(self) -> int:
        return len(self.nodes)

    @property
    def gpus_per_node(self) -> int:
        """GPUs every node has (the smallest node's count: a job asking that many per node fits on any node)."""
        return min((n.gpus for n in self.nodes), default=0)

    @property
    def cpus_per_node(self) -> int:
        return min((n.cpus for n in self.nodes), default=0)

    @property
    def idle_count(self) -> int:
        return sum(1 for n in self.nodes if n.idle)

    @property
    def usable_count(self) -> int:
        return sum(1 for n in self.nodes if n.usable)

    def to_dict(self) -> dict[str, Any]:
        """What the runner's lease carries (JSON)."""
        return {
            "partition": self.name,
            "account": self.account,
            "default_nodes": self.default_nodes,
            "error": self.error,
            "nodes": [{"name": n.name, "cpus": n.cpus, "gpus": n.gpus, "state": n.state} for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Partition:
        """Back from a lease's `cluster`; a node entry missing a number counts 0 (an older runner's row)."""
        nodes = tuple(
            Node(str(n.get("name", "?")), int(n.get("cpus") or 0), int(n.get("gpus") or 0), str(n.get("state") or ""))
            for n in data.get("nodes") or []
            if isinstance(n, Mapping)
        )
        default = data.get("default_nodes")
        return cls(
            name=str(data.get("partition") or data.get("name") or "?"),
            account=data.get("account") or None,
            nodes=nodes,
            default_nodes=int(default) if default else None,
            error=data.get("error") or None,
        )


def gres_gpus(gres: str) -> int:
    """The GPU count of one node's GRES string: 0 for '(null)' or none; 'gpu:a100:2,gpu:v100:2' counts 4.

    A GRES entry is name[:type][:count][(extra)]; a 'gpu' without a count is one GPU (Slurm's default).
    """
    gres = gres.strip()
    if not gres or gres in ("(null)", "N/A"):
        return 0
    total = 0
    # Entries are comma separated, but '(S:0-1)' / '(IDX:0,2)' may hold commas of their own.
    for entry in re.split(r",(?![^(]*\))", gres):
        entry = re.sub(r"\(.*?\)", "", entry).strip()
        parts = entry.split(":")
        if parts[0] != "gpu":
            continue
        count = parts[-1] if len(parts) > 1 else "1"
        if _GRES_COUNT.match(count):
            total += int(count)
        elif len(parts) == 2:  # 'gpu:a100': a type with no count, one GPU
            total += 1
        else:
            raise ValueError(f"cannot read the GPU count of GRES {gres!r}")
    return total


def parse_sinfo(text: str, partition: str, account: str | None = None, default_nodes: int | None = None) -> Partition:
    """The partition from `sinfo -h -p P -N -o "%N|%c|%G|%T"`'s output; ClusterError naming a line it cannot read,
    or saying the partition is unknown when sinfo listed no node."""
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|")]
        if len(parts) != 4:
            raise ClusterError(f"sinfo printed {line!r}, not 'node|cpus|gres|state': is this Slurm's sinfo?")
        name, cpus, gres, state = parts
        if not name:
            raise ClusterError(f"sinfo printed a line without a node name: {line!r}")
        # A summarised count reads '2+' (several node sizes): its leading number is the smallest node's.
        cpu_count = re.match(r"\d+", cpus)
        try:
            if cpu_count is None:
                raise ValueError(f"cannot read the CPU count {cpus!r}")
            node = Node(name, int(cpu_count.group()), gres_gpus(gres), state)
        except ValueError as exc:
            raise ClusterError(f"sinfo's line for node {name!r} could not be read ({exc}): {line!r}") from exc
        nodes.setdefault(name, node)  # a node listed twice (two partitions' lines) counts once
    if not nodes:
        raise ClusterError(
            f"Slurm lists no node in partition {partition!r}: check its name with `sinfo -s` and start the runner "
            "with --partition set to one of them"
        )
    return Partition(partition, account, tuple(nodes.values()), default_nodes)


def read_partition(partition: str, account: str | None = None, *, default_nodes: int | None = None,
                   env: Mapping[str, str] | None = None) -> Partition:  # fmt: skip
    """Ask sinfo for `partition`'s nodes; ClusterError (a message saying what to do) when that fails."""
    argv = ["sinfo", "-h", "-p", partition, "-N", "-o", SINFO_FORMAT]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S,
                              env=dict(env) if env is not None else None)  # fmt: skip
    except FileNotFoundError as exc:
        raise ClusterError(
            "sinfo is not installed or not on PATH: run the runner where the Slurm commands work"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"sinfo did not answer within {SINFO_TIMEOUT_S:g} s: is slurmctld up?") from exc
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise ClusterError(f"sinfo could not read partition {partition!r}: {said}")
    return parse_sinfo(proc.stdout, partition, account, default_nodes)


def partition_or_error(partition: str, account: str | None = None, *, default_nodes: int | None = None,
                       env: Mapping[str, str] | None = None) -> Partition:  # fmt: skip
    """read_partition, with a failure kept as the partition's `error` (what the runner publishes: the page
    then says why the partition's nodes are unknown)."""
    try:
        return read_partition(partition, account, default_nodes=default_nodes, env=env)
    except ClusterError as exc:
        return Partition(partition, account, (), default_nodes, error=str(exc))


# ---- what a spec needs of its target ---------------------------------------------------------
def nodes_of(spec: RunSpec) -> int | None:
    return getattr(spec, "nodes", None)


def gpu_count_on(spec: RunSpec, partition: Partition) -> int:
    """The GPUs a run of `spec` gets on the partition: its nodes x GPUs per node (what device checks assume)."""
    return nodes_for(spec, partition.default_nodes, partition.gpus_per_node) * partition.gpus_per_node


def placement_problems(spec: RunSpec, partition: Partition | None, where: str = "this machine") -> list[SpecProblem]:
    """What keeps `spec` from running on its target, each naming its field and the fix.

    partition: the target's Slurm partition, None for a machine's runner (`where` names it). On a partition:
    the nodes asked for exist there, nodes x GPUs per node = world size and tensor parallelism stays inside
    a node (layout_problems). Elsewhere: `nodes` must be empty.
    """
    nodes = nodes_of(spec)
    if partition is None:
        if nodes is not None:
            return [SpecProblem("nodes", f"nodes only apply to a Slurm partition: leave it empty for {where}")]
        return []
    if nodes is not None and nodes < 1:
        return []  # the spec's own validation says it must be at least 1
    count = nodes_for(spec, partition.default_nodes, partition.gpus_per_node)
    problems: list[SpecProblem] = []
    if partition.nodes and count > partition.node_count:
        problems.append(SpecProblem("nodes", f"must be <= the partition's nodes: {partition.name} has "
                                             f"{partition.node_count}, the run asks for {count}; choose "
                                             f"{partition.node_count} or fewer"))  # fmt: skip
    problems += layout_problems(spec, count, partition.gpus_per_node)
    return problems
