"""Deterministic synthetic token batches: every rank can rebuild the same global batch from (seed, step).

Seeds may be of any size (a spec's seed is an unbounded Python int): a value torch's generator cannot take
is folded deterministically into one it can (see `generator_seed`).
"""

from __future__ import annotations

import hashlib

import torch

# torch.Generator.manual_seed accepts exactly this range (it raises "Overflow when unpacking long" outside).
TORCH_SEED_MIN, TORCH_SEED_MAX = -(2**63), 2**64 - 1


def fold_seed(value: int, salt: str = "") -> int:
    """`value` itself where torch's generator takes it, else a stable 64-bit hash of it (and `salt`).

    Values torch takes are kept unchanged so every seed that worked before keeps its exact batches and
    weights; only values that used to raise are hashed, the same on every rank, process and machine.
    """
    if TORCH_SEED_MIN <= value <= TORCH_SEED_MAX and not salt:
        return value
    digest = hashlib.sha256(f"{value}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def batch_seed(seed: int, step: int) -> int:
    """The generator seed of (seed, step)'s batch: seed * 1_000_003 + step as before while it fits torch's
    range; past it (seed around 2**44 and more), a hash of the pair so that every step still differs."""
    value = seed * 1_000_003 + step
    if TORCH_SEED_MIN <= value <= TORCH_SEED_MAX:
        return value
    return fold_seed(seed, salt=f"step {step}")


def synthetic_batch(vocab_size: int, batch: int, seq: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of shape [batch, seq]; targets are the inputs shifted by one token."""
    gen = torch.Generator().manual_seed(batch_seed(seed, step))
    tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
