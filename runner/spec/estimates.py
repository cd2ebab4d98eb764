"""Memory estimates for a spec, before anything runs: per-rank parameters and optimizer state, and host RAM.

The launch page shows `memory_estimate`; validation refuses a CPU run whose `host_memory_estimate` exceeds
the machine's memory. Both come from the planner's memory model (runner/planner/memory.py, the one model of
what a rank holds: exact parameters per stage and tp shard, AdamW state, ZeRO sharding, Korthikanti
activations of the microbatches in flight, logits, KV cache). No torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.planner.memory import spec_host_bytes, spec_rank_memory

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
    """Bytes a CPU run needs over all its ranks: each rank's predicted bytes plus a process baseline."""
    return spec_host_bytes(spec, RANK_BASELINE_BYTES)
