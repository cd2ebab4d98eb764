"""Test-only job entry: the real `runner.job` with pipeline stages of known durations.

Each stage's forward sleeps F_s and its backward B_s seconds per microbatch (LAB_TEST_STAGE_SECONDS,
"F0,B0;F1,B1;..."), around a tensor that still flows through the real schedules, point-to-point
batches, clock and step loop. So the bubble the job measures can be checked against the one those
durations imply (tests/test_pipeline.py). Launched by tests.jobs.run_torchrun(module=...).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from runner import job
from runner.gpt.pipeline import PipelineGPT

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


def run_stage(self: PipelineGPT, x: torch.Tensor, cache=None, start: int = 0, last_only: bool = False) -> torch.Tensor:
    if self.prev is None:
        x = self.stage.transformer.wte(x)  # token ids -> hidden states that carry a gradient
    forward_s, backward_s = SECONDS[self.stage_id]
    return _Sleep.apply(x, forward_s, backward_s)


PipelineGPT.run_stage = run_stage
PipelineGPT.loss = lambda self, out, targets: out.float().mean()
PipelineGPT.tied_weight = lambda self: None  # only the first stage's embedding is used: nothing to sum

if __name__ == "__main__":
    code = job.main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as runner.job does: no interpreter finalisation under gloo's threads
