"""Memory estimates for a spec, before anything runs: per-rank parameters and optimizer state, and host RAM.

The launch page shows `memory_estimate`; validation refuses a CPU run whose `host_memory_estimate` exceeds
the machine's memory. Both come from the planner's memory model (runner/planner/memory.py, the one model of
what a rank holds: exact parameters per stage and tp shard, AdamW state, ZeRO sharding, Korthikanti
activations of the microbatches in flight, logits, KV cache). No torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.planner.memory import RankMemory, rank_memory
from runner.planner.models import spec_layout, spec_workload

if TYPE_CHECKING:
    from runner.spec.run_spec import RunSpec

RANK_BASELINE_BYTES = 200 * 2**20  # a rank process with torch and its process group, before any tensor


def memory_estimate(spec: RunSpec) -> dict[str, int]:
    """Bytes per rank of parameters, gradients and AdamW state for this split (the rank holding the most
    parameters), and the busiest rank's predicted total."""
    stages = spec_rank_memory(spec)
    top = max(stages, key=lambda m: m.param_bytes)
    return {"param_count": top.param_count, "param_bytes": top.param_bytes, "optimizer_bytes": top.optimizer_bytes,
            "grad_bytes": top.grad_bytes, "total_bytes": max(m.total for m in stages)}  # fmt: skip


def host_memory_estimate(spec: RunSpec) -> int:
    """Bytes a CPU run needs over all its ranks on one host: each rank's predicted bytes plus a process baseline
    (torch and its process group before any tensor)."""
    layout = spec_layout(spec)
    per_stage = spec_rank_memory(spec, "cpu")
    return sum(m.total for m in per_stage) * layout.tp * layout.dp + layout.world_size * RANK_BASELINE_BYTES


def spec_rank_memory(spec: RunSpec, device: str | None = None) -> list[RankMemory]:
    """Predicted bytes of every pipeline stage of a RunSpec (index = pp coordinate; tp and dp peers hold
    the same), on `device` (default: the spec's)."""
    cfg, layout, work = spec.model_config(), spec_layout(spec), spec_workload(spec, device)
    return [rank_memory(cfg, layout, work, r) for r in range(layout.pp)]
