"""Where a run goes: the hosts of a team database and the Launch page's "Run on" choice, as plain data.

Every machine serving the database runs its own runner (one lease per host, see runner.api.hosts).
A run targets this machine (the default: jobs run where they were launched), another host whose runner
is alive, a Slurm partition (a runner started with `serve --backend slurm` publishes its partition's
nodes, CPUs and GPUs, read with sinfo, in its lease), or any host with the devices it needs. The form is
validated against the target's devices, not against the machine serving the page: on a partition, its
nodes x GPUs per node and the rule that tensor parallelism stays inside a node (runner.service.cluster).

Logs live in two places: the run folder on the host that ran it, and bounded tails in the database;
runner.service.logs reads them (`log_source` decides which one) and `where_text` says which one a page shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.api import ANY_HOST
from runner.service.cluster import Partition, gpu_count_on, placement_problems
from runner.service.logs import LogText, log_source, without_profiler_noise
from runner.spec.run_spec import RunSpec, SpecProblem
from ui.format import human_age, human_bytes

HERE = ""  # the choice "this machine": api.submit's default, LAB_HOST or the host name


@dataclass(frozen=True)
class Target:
    """One option of "Run on": what it says, what api.submit gets, and the GPU count validation uses."""

    key: str  # HERE, a host name or ANY_HOST
    label: str
    run_on: str | None  # api.submit(run_on=...): None for this machine
    gpu_count: int | None  # None: not known (no live runner reports it), device checks are skipped
    partition: Partition | None = None  # a Slurm runner's partition (its nodes as sinfo saw them)
    gpu_note: str | None = None  # its runner's account of its GPUs: why it has none, what it excluded

    @property
    def choice(self) -> str:
        """What the choice box shows: the label up to its first colon, which never changes for one key. The box
        keeps the text of the option it shows when only that option's label changes (the runner reporting its
        devices, a partition's idle count), so the full label goes in a caption under it."""
        return "any host with the devices" if self.key == ANY_HOST else self.label.split(":", 1)[0]

    @property
    def is_slurm(self) -> bool:
        return self.partition is not None

    @property
    def node_count(self) -> int | None:
        return self.partition.node_count if self.partition else None

    @property
    def gpus_per_node(self) -> int | None:
        return self.partition.gpus_per_node if self.partition else None

    @property
    def cpus_per_node(self) -> int | None:
        return self.partition.cpus_per_node if self.partition else None

    @property
    def where(self) -> str:
        """How the "nodes only apply to a Slurm partition" message names this target."""
        return "this machine" if self.key == HERE else "any host" if self.key == ANY_HOST else f"host {self.key}"

    def gpus_for(self, spec: RunSpec | None) -> int | None:
        """The GPUs a run of `spec` gets here: on a partition its nodes x GPUs per node, else the host's."""
        if self.partition is not None and spec is not None:
            return gpu_count_on(spec, self.partition)
        return self.gpu_count

    def problems(self, spec: RunSpec) -> list[SpecProblem]:
        """What keeps `spec` from running on this target beyond the spec's own rules (runner.service.cluster)."""
        return placement_problems(spec, self.partition, self.where)


def partition_of(host: dict[str, Any]) -> Partition | None:
    """A host's published Slurm partition (its lease's `cluster`), None for a machine's runner."""
    cluster = host.get("cluster")
    return Partition.from_dict(cluster) if cluster else None


def partition_text(p: Partition) -> str:
    """'2 nodes x 4 CPUs, no GPUs, 2 idle' or '3 nodes x 64 CPUs, 4 GPUs each, 1 idle' (or why nodes are unknown)."""
    if p.error:
        return f"nodes unknown ({p.error})"
    n = p.node_count
    gpus = f"{p.gpus_per_node} GPU{'s' if p.gpus_per_node != 1 else ''} each" if p.gpus_per_node else "no GPUs"
    down = n - p.usable_count
    return f"{n} node{'s' if n != 1 else ''} x {p.cpus_per_node} CPUs, {gpus}, {p.idle_count} idle" + (
        f", {down} down or drained" if down else ""
    )


def slurm_label(host: dict[str, Any], p: Partition) -> str:
    """'Slurm partition lab (slurm-lab): 2 nodes x 4 CPUs, no GPUs, 2 idle'."""
    return f"Slurm partition {p.name} ({host['host']}): {partition_text(p)}"


def devices_text(host: dict[str, Any]) -> str:
    """'2 GPUs: NVIDIA H100 80GB HBM3 (80.0 GiB each)' or 'CPU only (gloo)'."""
    gpus = host.get("gpus") or []
    if not gpus:
        return "CPU only (gloo)"
    names = sorted({g.get("name") or "GPU" for g in gpus})
    sizes = {g.get("memory_total") for g in gpus}
    size = (
        f" ({human_bytes(sizes.pop())}{' each' if len(gpus) > 1 else ''})"
        if len(sizes) == 1 and None not in sizes
        else ""
    )
    busy = sum(1 for g in gpus if g.get("busy_pids"))
    return f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''}: {', '.join(names)}{size}" + (f", {busy} busy" if busy else "")


def gpu_line(gpu: dict[str, Any]) -> str:
    """One GPU of a runner's lease for the Devices panel: 'GPU 3: **NVIDIA H100 80GB HBM3**, 79.6 GiB', and when
    other users' processes hold it, that it is busy and runs wait for it (runner/service/devices.py)."""
    line = f"GPU {gpu['index']}: **{gpu.get('name') or 'GPU'}**, {human_bytes(gpu.get('memory_total'))}"
    pids = gpu.get("busy_pids") or []
    if pids:
        line += (f" -- busy: pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))} not started by this "
                 "runner; runs wait for it")  # fmt: skip
    return line


def targets(hosts: list[dict[str, Any]], here: str) -> list[Target]:
    """The "Run on" options: this machine first, then every other live host, then any host.

    This machine is always offered (its runner may be starting: the run waits for it); a host whose runner
    is not alive is not, since nothing would run there. "Any host" is validated against the live host with
    the most GPUs: a run some host can place is accepted, and the runner that claims it checks again.
    """
    live = [h for h in hosts if h["alive"]]
    mine = next((h for h in live if h["host"] == here), None)
    out = [
        Target(
            HERE,
            f"this machine ({here}): {devices_text(mine)}" if mine else f"this machine ({here}): runner not reporting",
            None,
            len(mine["gpus"]) if mine else None,
            gpu_note=mine["gpu_note"] if mine else None,
        )
    ]
    for h in live:
        if h["host"] == here and not partition_of(h):
            continue
        p = partition_of(h)
        if p is not None:  # a Slurm runner: its GPUs are the partition's, per run (nodes x GPUs per node)
            out.append(Target(h["host"], slurm_label(h, p), h["host"], p.node_count * p.gpus_per_node, p))
        else:
            out.append(Target(h["host"], f"{h['host']}: {devices_text(h)}", h["host"], len(h["gpus"]),
                              gpu_note=h["gpu_note"]))  # fmt: skip
    # "Any host" means a machine's runner: a partition's GPUs are spread over nodes (validated per partition).
    most = max((len(h["gpus"]) for h in live if not partition_of(h)), default=None)
    out.append(
        Target(
            ANY_HOST,
            f"any host with the devices ({len(live)} live)" if live else "any host with the devices (none live now)",
            ANY_HOST,
            most,
        )
    )
    return out


def target_for(key: str, options: list[Target]) -> Target:
    """The option chosen by key; this machine when the key is gone (its host stopped reporting)."""
    return next((t for t in options if t.key == key), options[0])


def host_lines(hosts: list[dict[str, Any]], here: str) -> tuple[list[str], list[str]]:
    """(live hosts, silent hosts) as markdown lines for the devices panel, this machine marked."""
    live, silent = [], []
    for h in hosts:
        name = f"**{h['host']}**" + (" (this machine)" if h["host"] == here else "")
        p = partition_of(h)
        what = f"Slurm partition {p.name}, {partition_text(p)}" if p else devices_text(h)
        if h["alive"]:
            live.append(f"{name}: {what}, last seen {human_age(h['age_s'])} ago")
        else:
            silent.append(f"{h['host']}: not reporting, last seen {human_age(h['age_s'])} ago")
    return live, silent


def last_lines(logs: list[LogText], lines: int = 5) -> str:
    """The Live page's log tail: the last `lines` lines of each rank's log that has any, under its name, without
    the profiler's lines (runner.service.logs.without_profiler_noise; the log keeps them)."""
    return "\n".join(
        f"--- rank {log.name.removeprefix('rank')}\n"
        + "\n".join(without_profiler_noise(log.text)[0].splitlines()[-lines:])
        for log in logs
        if log.text is not None
    )


def where_text(run: dict[str, Any], stored: dict[str, dict[str, Any]], here: str) -> str:
    """A caption saying where the logs shown come from."""
    host = run.get("runner_host") or run.get("target_host")
    source = log_source(run, stored, here)
    if source == "database":
        cut = any((e.get("size") or 0) > len(e["text"].encode()) for e in stored.values())
        return f"ran on {host or 'another host'}: these are the log tails its runner stored in the database" + (
            " (a long log's latest part only; the whole file is in the run folder on that host)" if cut else ""
        )
    if source == "folder":
        return f"from the run folder {run['run_dir']}" + (f" on {host}" if host and host != here else "")
    return f"no log yet: the run's host ({host}) has not stored any" if host and host != here else "no log yet"


def stored_logs_caption(run: dict[str, Any], stored: dict[str, dict[str, Any]], here: str) -> str | None:
    """where_text for a run whose logs come from the database (it ran on another host); None otherwise."""
    return where_text(run, stored, here) if log_source(run, stored, here) == "database" else None


def placement_text(run: dict[str, Any]) -> str:
    """Who launched a run from where, and where it runs: 'launched by ada on alpha · ran on beta', or for a
    queued run 'aimed at beta' / 'for any host with the devices'."""
    head = f"launched by {run.get('user') or 'unknown'} on {run.get('host') or 'an unrecorded host'}"
    if run.get("runner_host"):
        verb = "runs" if run.get("status") == "running" else "ran"
        return f"{head} · {verb} on {run['runner_host']}"
    if run.get("status") != "queued":
        return head
    return (
        f"{head} · aimed at {run['target_host']}"
        if run.get("target_host")
        else f"{head} · for any host with the devices"
    )


def ran_on(runner_host: str | None, backend: str | None) -> str:
    """History's "ran on" cell: the host whose runner ran it, and "(Slurm)" where that runner submitted it to a
    Slurm cluster (its ranks ran on the cluster's nodes); "" while no runner has taken it."""
    if not runner_host:
        return ""
    return f"{runner_host} (Slurm)" if backend == "slurm" else runner_host
