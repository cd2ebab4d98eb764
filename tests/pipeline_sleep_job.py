"""Test-only job entry: the real `runner.job` with pipeline stages of known durations.

Each (virtual) stage's forward sleeps F_s and its backward B_s seconds per microbatch, and where a third
figure W_s is given, the gradient of one of its weights sleeps W_s more (LAB_TEST_STAGE_SECONDS,
"F0,B0[,W0];F1,B1[,W1];...", one entry per virtual stage): a whole backward takes B_s + W_s, ZB-H1's input
pass B_s and its weight pass W_s. A tensor still flows through the real schedules, point-to-point
batches, clock and step loop. So the bubble the job measures can be checked against the one those
durations imply (tests/test_pipeline.py). Launched by tests.jobs.run_torchrun(module=...).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from runner.gpt.pipeline import PipelineGPT
from runner.job import rank as job
from runner.job.resources import MemoryMeter

SECONDS = [tuple(float(x) for x in part.split(",")) for part in os.environ["LAB_TEST_STAGE_SECONDS"].split(";")]


class _Sleep(torch.autograd.Function):
    """Identity that takes a fixed time forward and another backward (sleeping: no core needed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        ctx.backward_s = backward_s
        time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        time.sleep(ctx.backward_s)
        return grad, None, None


def run_stage(
    self: PipelineGPT, x: torch.Tensor, cache=None, start: int = 0, last_only: bool = False, chunk: int = 0
) -> torch.Tensor:
    j = self.virtual_stage(chunk)
    if j == 0:
        x = self.chunks[0].transformer.wte(x)  # token ids -> hidden states that carry a gradient
    forward_s, backward_s, *weight_s = SECONDS[j]
    y = _Sleep.apply(x, forward_s, backward_s)
    if weight_s:  # a branch to one weight whose gradient takes W_s: a split backward's W pass runs it
        weight = next(iter(self.chunks[chunk].transformer.h.values())).ln_1.weight
        y = y + 0 * _Sleep.apply(weight, 0.0, weight_s[0])
    return y


PipelineGPT.run_stage = run_stage
# The bubble tests read no memory figure: skip the tensor peak's two untimed steps after the timed ones, which
# here would only sleep through the durations twice more (the time goes into longer durations instead).
MemoryMeter.tensor_peak = lambda self, step: None
PipelineGPT.loss = lambda self, out, targets: out.float().mean()
PipelineGPT.tied_weight = lambda self: None  # only the first stage's embedding is used: nothing to sum

if __name__ == "__main__":
    code = job.main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as runner.job does: no interpreter finalisation under gloo's threads
