"""Memory estimates for a spec, before anything runs: per-rank parameters and optimizer state, and host RAM.

The launch page shows `memory_estimate`; validation refuses a CPU run whose `host_memory_estimate` exceeds
the machine's memory. Plain arithmetic on the model config and the degrees: no torch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from runner.gpt.config import count_parameters

if TYPE_CHECKING:
    from runner.spec import RunSpec

RANK_BASELINE_BYTES = 200 * 2**20  # a rank process with torch and its process group, before any tensor


def memory_estimate(spec: RunSpec) -> dict[str, int]:
    """Bytes per rank of parameters and AdamW state for this split (largest rank)."""
    cfg = spec.model_config()
    tp, pp, _ = spec.degrees
    bytes_per = 2 if spec.dtype == "bfloat16" else 4
    h = cfg.n_embd
    layer_params = count_parameters(replace(cfg, n_layer=1)) - count_parameters(replace(cfg, n_layer=0))
    embed = cfg.vocab_size * h + cfg.block_size * h
    # Sharded: the big matrices split over tp; LayerNorms and row-parallel biases are replicated.
    layer_share = layer_params // tp + 8 * h
    first_stage = embed // tp + (cfg.n_layer // pp) * layer_share + 2 * h
    params = first_stage if pp > 1 else count_parameters(cfg) // tp + (8 * h * cfg.n_layer if tp > 1 else 0)
    optimizer = 2 * params * 4 if spec.workload == "train" else 0
    return {"param_count": params, "param_bytes": params * bytes_per, "optimizer_bytes": optimizer}


def host_memory_estimate(spec: RunSpec) -> int:
    """Bytes a CPU run needs over all its ranks, estimated: process baseline, weights, gradients and
    AdamW state of the largest rank, activations saved for backward (Korthikanti et al. 2022: 34*s*b*h plus
    5*a*s^2*b per layer at 16 bits, doubled at 32) and the logits with their gradient."""
    cfg = spec.model_config()
    tp, pp, dp = spec.degrees
    mem = memory_estimate(spec)
    width = 2 if spec.dtype == "bfloat16" else 4
    train = spec.workload == "train"
    per_rank = RANK_BASELINE_BYTES + mem["param_bytes"] * (2 if train else 1) + mem["optimizer_bytes"]
    rows = max(1, spec.batch // dp)
    seq = spec.seq + (spec.new_tokens if spec.workload == "generate" else 0)
    per_layer = (34 * seq * rows * cfg.n_embd + 5 * cfg.n_head * seq * seq * rows) * width // 2 // tp
    layers = cfg.n_layer // pp if train else 1  # inference keeps one layer's activations at a time
    logits = rows * seq * cfg.vocab_size * 4 // tp * (2 if train else 1)
    return spec.world_size * (per_rank + layers * per_layer + logits)
