"""Deterministic synthetic token batches: every rank can rebuild the same global batch from (seed, step)."""

from __future__ import annotations

import torch


def synthetic_batch(vocab_size: int, batch: int, seq: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape [batch, seq]; targets are the inputs shifted by one token."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
