"""Where a submitted run goes and what it needs there (torch-free): the target host's devices as its runner's
lease publishes them (or, for this machine without a live runner, as they are probed here), the Slurm
partition a runner serves, and every problem of a spec on that target. runner/api.py's submit calls it before
anything is stored."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from runner.service.cluster import Partition, gpu_count_on, placement_problems
from runner.service.device_probe import detect_devices
from runner.spec.run_spec import RunSpec
from runner.spec.validation import validate_spec
from storage import hosts as host_rows
from storage.hosts import ANY_HOST

HOST_GPUS: Any = object()  # submit's default gpu_count: the target host's, as its runner reports it


def target_gpus(engine: Engine, run_on: str | None, probe: bool = False) -> tuple[int | None, str | None]:
    """(the GPU count a submission is validated against, the target's sentence why it has no GPU): the target
    host's as its live runner reports them (this machine's by default), or for any host the best-equipped live
    one's. Without a live runner: (None, None), device checks skipped, unless `probe` and the target is this
    machine, whose devices are then read here exactly as its runner will read them."""
    live = [h for h in host_rows.hosts(engine) if h["alive"]]
    if run_on == ANY_HOST:
        return max((len(h["gpus"]) for h in live), default=None), None
    host = next((h for h in live if h["host"] == (run_on or host_rows.this_host())), None)
    if host is not None:
        return len(host["gpus"]), host["gpu_note"] or None
    if probe and run_on in (None, host_rows.this_host()):
        report = detect_devices()
        return len(report.gpus), report.no_gpu_reason()
    return None, None


def target_partition(engine: Engine, run_on: str | None) -> tuple[Partition | None, bool]:
    """(the Slurm partition the target host's runner published, whether the target is known): the host's
    last lease, alive or not, since a Slurm runner restarting still serves the same partition. This machine
    without a lease counts as a machine (its runner, which `submit --wait` starts, is a local one); (None,
    False) for another host whose runner never reported (nothing to judge `nodes` by)."""
    if run_on == ANY_HOST:
        return None, True
    here = run_on in (None, host_rows.this_host())
    lease = host_rows.runner_status(engine, run_on or host_rows.this_host())
    if lease is None:
        return None, here
    return (Partition.from_dict(lease["cluster"]) if lease.get("cluster") else None), True


def target_problems(engine: Engine, spec: RunSpec, run_on: str | None) -> list[Any]:
    """What keeps `spec` from running on the target beyond its own rules: on a Slurm partition its nodes and
    the layout (nodes x GPUs per node = world size, tensor parallelism inside a node), elsewhere an empty
    `nodes` (runner.service.cluster.placement_problems)."""
    partition, known = target_partition(engine, run_on)
    if not known:
        return []
    where = "any host" if run_on == ANY_HOST else "this machine" if run_on in (None, host_rows.this_host()) else f"host {run_on}"
    return placement_problems(spec, partition, where)


def problems_on_target(engine: Engine, spec: RunSpec, run_on: str | None, gpu_count: int | None) -> list:
    """Every problem of `spec` on its target: its own rules against `gpu_count` GPUs (HOST_GPUS: the target's
    own, a partition's nodes x GPUs or the host's, with the host's words for why it has none), then the target's."""
    note = None
    cuda = spec.device == "cuda"
    if gpu_count is HOST_GPUS:
        partition, _ = target_partition(engine, run_on)
        gpu_count, note = (gpu_count_on(spec, partition), None) if partition else target_gpus(engine, run_on, cuda)
    elif gpu_count == 0 and cuda and target_partition(engine, run_on)[0] is None:
        note = target_gpus(engine, run_on)[1]  # the target's own words for why it has none
    problems = validate_spec(spec, gpu_count=gpu_count, no_gpu_reason=note)
    return problems + [p for p in target_problems(engine, spec, run_on) if p not in problems]
