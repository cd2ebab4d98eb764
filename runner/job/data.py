"""The global batches of a run: every rank rebuilds the same batch from (seed, step), whatever the data.

`synthetic_batch`: uniformly random tokens, drawn exactly as every earlier version drew them (a run's
batches and verify results stay comparable across versions). `Batches` gives a run its batches from its
spec's `data` (runner/job/corpus.py): synthetic ones, or windows of seq + 1 tokens of a corpus's training
split at offsets drawn from (seed, step); the held-out batches are fixed windows spread evenly over the
held-out split, the same at every evaluation and for every seed, so eval losses of runs on one corpus compare.
The corpus stays memory-mapped: a batch copies its batch x (seq + 1) tokens, nothing more.

Seeds may be of any size (a spec's seed is an unbounded Python int): a value torch's generator cannot take
is folded deterministically into one it can (see `fold_seed`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from runner.job import corpus

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


EVAL_BATCHES = 4  # held-out batches per evaluation: 4 x batch windows of seq + 1 tokens


class Batches:
    """A run's batches: `train(step)` (also step -1 for verify and the steps after the timed ones) and
    `held_out()`, from the spec's data; every rank holding one gets the same tensors."""

    def __init__(self, data: str, weights: str | None, vocab_size: int, batch: int, seq: int, seed: int):
        self.source = corpus.resolve(data, weights)
        self.vocab_size, self.batch, self.seq, self.seed = vocab_size, batch, seq, seed
        self.train_ids = self.val_ids = None
        if self.source.kind != corpus.SYNTHETIC:
            self.train_ids, self.val_ids = corpus.open_splits(self.source)

    @classmethod
    def of(cls, spec) -> Batches:
        return cls(spec.data, spec.weights, spec.model_config().vocab_size, spec.batch, spec.seq, spec.seed)

    def train(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape [batch, seq] for `step`: the same on every rank."""
        if self.train_ids is None:
            return synthetic_batch(self.vocab_size, self.batch, self.seq, self.seed, step)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, step))
        starts = torch.randint(0, len(self.train_ids) - self.seq, (self.batch,), generator=gen)
        return self._windows(self.train_ids, starts.tolist())

    def held_out(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """EVAL_BATCHES batches of windows spread evenly over the held-out split; [] without one."""
        if self.val_ids is None or len(self.val_ids) <= self.seq:
            return []
        n = EVAL_BATCHES * self.batch
        starts = np.linspace(0, len(self.val_ids) - self.seq - 1, n).round().astype(np.int64).tolist()
        return [self._windows(self.val_ids, starts[i : i + self.batch]) for i in range(0, n, self.batch)]

    def prompt(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row the prompt's ids (a generate run's --prompt); targets are the inputs (nothing scores them)."""
        ids = torch.tensor(corpus.encode(self.source, text), dtype=torch.long).expand(self.batch, -1).contiguous()
        return ids, ids.clone()

    def _windows(self, ids: np.ndarray, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(ids[s : s + self.seq + 1], dtype=np.int64) for s in starts])
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
