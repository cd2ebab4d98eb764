"""The losses a rank process reports: the run's training loss every step and its held-out loss.

Only output ranks hold a loss (the last pipeline stage's, every tensor-parallel rank of it, every data
replica), so rank 0, which writes the step events, learns it from them: one all-reduce over the world of
[loss x weight, weight] in float64, where exactly the ranks that count contribute. A training loss is
already the global batch's on every output rank (data parallelism averages it over the replicas), so the
output rank at tp 0 and dp 0 alone contributes and the value arrives unchanged (one non-zero term). A
held-out loss is each replica's mean over its rows, so the output ranks at tp 0 contribute theirs weighted
by their rows. Both run after the step's clock has stopped, with the clock and the communication counters
off: no timed figure includes them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runner.gpt.strategy import ParallelGPT


def world_mean(model: ParallelGPT, value: float, weight: float) -> float | None:
    """sum(value x weight) / sum(weight) over the ranks that contribute (weight > 0); None if none did."""
    t = torch.tensor([value * weight if weight else 0.0, weight], dtype=torch.float64, device=model.device)
    dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1].item() > 0 else None


def global_loss(model: ParallelGPT, workload: str, loss: float | None, batch: int) -> float | None:
    """The step's loss over the global batch, on every rank (rank 0 reports it): training's as it is, a
    forward pass's (each replica's mean over its rows) weighted by those rows."""
    c = model.mesh.coord
    if workload == "train":
        counts = loss is not None and c.tp == 0 and c.dp == 0
        return world_mean(model, loss if counts else 0.0, 1.0 if counts else 0.0)
    counts = loss is not None and c.tp == 0
    return world_mean(model, loss if counts else 0.0, float(_rows(model, batch)) if counts else 0.0)


def _rows(model: ParallelGPT, batch: int) -> int:
    return len(range(*model.batch_rows(batch).indices(batch)))


def forward_loss(model: ParallelGPT, idx: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Cross entropy of the model's logits on this rank's rows (output ranks), no autograd; None elsewhere."""
    logits = model.forward_logits(idx)
    if logits is None:
        return None
    rows = model.batch_rows(idx.shape[0])
    return F.cross_entropy(logits.float().flatten(0, 1), targets[rows].flatten()).item()


@torch.no_grad()
def held_out_loss(model: ParallelGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """The mean loss over the held-out batches, the same on every rank; None without any."""
    if not batches:
        return None
    clock, stats = model.mesh.clock, model.mesh.stats
    enabled, counting = clock.enabled, stats.counting
    clock.enabled, stats.counting = False, False  # no marks, spans or counted bytes from the evaluation
    try:
        total, rows = 0.0, 0
        for idx, targets in batches:
            loss = forward_loss(model, idx.to(model.device), targets.to(model.device))
            if loss is not None:
                n = _rows(model, idx.shape[0])
                total, rows = total + loss * n, rows + n
        c = model.mesh.coord
        counts = rows > 0 and c.tp == 0
        return world_mean(model, total / rows if counts else 0.0, float(rows) if counts else 0.0)
    finally:
        clock.enabled, stats.counting = enabled, counting
        model.take_spans()
