"""Activation checkpointing of transformer blocks: the policy, its application, and what it saves and costs.

Policy (`--checkpoint`): "none"; "blocks", every block; "every-K", every K-th block counting the
model's global layer ids from 1 (layers K-1, 2K-1, ... 0-based), as torchtitan's layer-wise
`selective_ac_option=K` does, so a pipeline stage checkpoints exactly the layers the whole model would.
"blocks" is "every-1".

How: `apply_activation_checkpointing` marks the chosen blocks of a GPT (runner/gpt/model.py) with a
runner; GPT.forward then calls `torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)`
for them whenever autograd records (training) and no KV cache is in use. The block itself is not
wrapped in another module, so every parameter keeps its reference name `transformer.h.<i>.…`
(torchtitan's checkpoint_wrapper renames them), and the checkpointed function is the block's
`__call__`, so module hooks run again when the block is recomputed, as with checkpoint_wrapper.
Non-reentrant checkpointing (the one PyTorch recommends) saves only the block's inputs; every tensor
the block's operations would save for backward is dropped and recomputed, from those inputs, when
backward first needs one of them. It restores the autocast state of the forward for the recompute
(bf16-mixed recomputes in bf16, although backward runs outside autocast) and, with
`preserve_rng_state` (on: the default), the CPU and CUDA generators' states, so a block with dropout
would draw the same masks; this GPT has no dropout, so recomputed values are bitwise those of the
forward and gradients equal those without checkpointing.

What the run reports (`CheckpointMeter.figures()`, in the rank's strategy figures):
- `activation_bytes_saved_per_microbatch`: bytes of the tensors that autograd asked to save inside
  the checkpointed blocks during one microbatch's forward, which checkpointing dropped instead. They are
  counted as they are offered: for the first forward of each block and input shape, a saved-tensors hook
  is pushed *inside* checkpoint's own, counts each tensor's storage once (parameters and the block's
  input, which are kept anyway, excluded) and hands the tensor on to checkpoint's hook. Those storages
  are held until the block's forward returns, so a freed one's address cannot be reused by the next
  and merged with it; that is one block's worth of activations, the same a recompute needs anyway.
  This is the memory the engine's own count of saved bytes (runner/gpt/pipeline.py) no longer sees;
  tests/test_checkpointing.py checks it against an independent count of a plain and a checkpointed
  forward.
- `activation_bytes_saved_peak`: the most such bytes dropped at one moment of a timed step (a
  block's forward adds its bytes, its first recompute in backward takes them back), i.e. with m
  microbatches in flight, how much less the stage holds at its fullest. Under zb-h1 a block's
  recomputed tensors are freed again after the input-gradient pass and rebuilt for the weight-gradient
  pass, while a plain run would hold the weights' inputs until then: that saving is not added, so the
  figure is a lower bound there. (The process's measured peak falls by less than this figure when the
  peak moves into backward, where the gradients and one block's recompute are allocated.)
- `recompute_s`: seconds spent re-running checkpointed forwards inside backward, over the timed steps
  (the same span as comm_s and compute_s), between marks of the rank's StepClock
  (runner/gpt/timing.py). On CUDA those marks are events recorded on the current stream of the
  autograd thread that runs the recompute, which is the stream the forward ran on, so the interval is
  device time of the recomputed kernels, read at the step's one synchronize. A recompute that
  PyTorch stops early (once every tensor backward needs is rebuilt) ends its interval there.
- `recompute_calls` (a block is recomputed once per backward pass that reaches it: once per microbatch
  with GPipe/1F1B/interleaved; under zb-h1 once for B plus once per weight-gradient autograd call),
  `checkpointed_blocks`, `checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from runner.gpt.comm import CommStats
from runner.gpt.timing import StepClock

__all__ = ["CheckpointMeter", "apply_activation_checkpointing", "checkpointed_layers", "policy_every"]


def policy_every(policy: str) -> int:
    """0 for "none", 1 for "blocks", K for "every-K"; ValueError otherwise."""
    if policy == "none":
        return 0
    if policy == "blocks":
        return 1
    head, _, k = policy.partition("-")
    if head == "every" and k.isdigit() and int(k) >= 1:
        return int(k)
    raise ValueError(f"checkpoint {policy!r} is not none, blocks or every-K (K >= 1)")


def checkpointed_layers(layer_ids: list[int], every: int) -> list[int]:
    """Which of `layer_ids` (global, 0-based) a policy of `every` checkpoints: the K-th, 2K-th, ... layer."""
    if every <= 0:
        return []
    return [i for i in layer_ids if (i + 1) % every == 0]


class CheckpointMeter:
    """Counts what checkpointing drops and what recomputing costs on one rank (module docstring).

    `stats` is the rank's CommStats: recompute time and the peak are only booked while it counts
    (the timed steps), like every other timed figure."""

    def __init__(self, policy: str, clock: StepClock | None = None, stats: CommStats | None = None):
        self.policy = policy
        self.clock = clock or StepClock()
        self.stats = stats
        self.layers: list[int] = []
        self._recompute_s = 0.0
        self.recompute_calls = 0
        self._dropped_by_shape: dict[tuple, int] = {}  # (layer, input shape, autocast) -> bytes one forward drops
        self.bytes_per_microbatch: dict[int, int] = {}  # layer -> bytes of its latest forward
        self.live_bytes = 0
        self.peak_bytes = 0

    @property
    def counting(self) -> bool:
        return self.stats is None or self.stats.counting

    @property
    def recompute_s(self) -> float:
        """Seconds of recompute booked so far; resolves the clock's pending intervals (on CUDA read it at
        the end of a step, where the job resolves anyway)."""
        self.clock.resolve()
        return self._recompute_s

    def _add_recompute(self, start: float, end: float) -> None:
        self._recompute_s += end - start

    def run(self, layer: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`block(x)` under non-reentrant checkpointing, metered: the first call of the function is the
        forward, the second (inside backward) the recompute."""
        calls = 0
        key = (layer, tuple(x.shape), x.dtype, torch.is_autocast_enabled(x.device.type))

        def function(inp: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return self._forward(key, layer, block, inp)
            # A backward in two passes (zb-h1: input gradients, then weight gradients, each its own
            # autograd call over the retained graph) recomputes once per pass; the dropped bytes come
            # back with the first.
            return self._recompute(key, block, inp, first=calls == 2)

        return checkpoint(function, x, use_reentrant=False)

    def _forward(self, key: tuple, layer: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if key in self._dropped_by_shape:
            out = block(x)
        else:
            with _counting_dropped(block, x) as dropped:
                out = block(x)
            self._dropped_by_shape[key] = sum(dropped.values())
        nbytes = self._dropped_by_shape[key]
        self.bytes_per_microbatch[layer] = nbytes
        self.live_bytes += nbytes
        if self.counting:
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    def _recompute(self, key: tuple, block: nn.Module, x: torch.Tensor, first: bool) -> torch.Tensor:
        if first:
            self.live_bytes -= self._dropped_by_shape.get(key, 0)
        if not self.counting:
            return block(x)
        self.recompute_calls += 1
        start = self.clock.mark()
        try:
            return block(x)
        finally:  # PyTorch may stop a recompute early by raising once backward has what it needs
            self.clock.add(start, self.clock.mark(), self._add_recompute)

    def figures(self) -> dict:
        return {
            "checkpoint": self.policy,
            "checkpointed_blocks": len(self.layers),
            "activation_bytes_saved_per_microbatch": sum(self.bytes_per_microbatch.values()),
            "activation_bytes_saved_peak": self.peak_bytes,
            "recompute_s": self.recompute_s,
            "recompute_calls": self.recompute_calls,
        }


@contextmanager
def _counting_dropped(block: nn.Module, x: torch.Tensor) -> Iterator[dict[int, int]]:
    """Inside checkpoint's forward: count the storages autograd offers to save (checkpoint drops them),
    passing each on to checkpoint's own hook. Parameters and the input are kept anyway: not counted."""
    # checkpoint's own (pack, unpack), the innermost pair: PyTorch has no public accessor for it (this one
    # is private; tests/test_checkpointing.py checks the count it gives against an independent one).
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is None:  # not inside a checkpoint: nothing would be dropped
        yield {}
        return
    inner_pack, inner_unpack = top
    kept = {p.untyped_storage().data_ptr() for p in block.parameters()} | {x.untyped_storage().data_ptr()}
    dropped: dict[int, int] = {}
    alive: list[torch.UntypedStorage] = []  # so a freed storage's address is not reused meanwhile

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in kept and storage.data_ptr() not in dropped:
            dropped[storage.data_ptr()] = storage.nbytes()
            alive.append(storage)
        return inner_pack(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
        yield dropped
    alive.clear()


BlockRunner = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def apply_activation_checkpointing(model: nn.Module, every: int, meter: CheckpointMeter) -> list[int]:
    """Mark the blocks of `model` (a GPT, possibly cut to a stage) that policy `every` checkpoints;
    GPT.forward runs them through `meter.run` when it trains. Returns their layer ids."""
    blocks: nn.ModuleDict = model.transformer.h
    chosen = checkpointed_layers(sorted(int(i) for i in blocks.keys()), every)
    for i in chosen:
        blocks[str(i)].checkpoint_runner = _runner(meter, i)
    meter.layers = sorted(meter.layers + chosen)  # a rank with several chunks (interleaved) adds each one's
    return chosen


def _runner(meter: CheckpointMeter, layer: int) -> BlockRunner:
    return lambda block, x: meter.run(layer, block, x)
