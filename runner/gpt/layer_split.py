"""'Model parallelism' as the guide draws it: consecutive layers per rank, the whole batch at once.

Rank s runs layers [s*L/p, (s+1)*L/p): it receives the activations of the whole batch from rank
s-1, runs its layers and sends the result on; backward walks the chain in reverse. That is a
pipeline with a single microbatch, so it runs on the pipeline engine with m = 1: only one rank is
busy at a time, and its measured bubble, (p-1)/p in theory, is what microbatching removes. With
p = 1 it is the single-device model, which is how strategy 'single' runs.
"""

from __future__ import annotations

from runner.gpt.pipeline import PipelineGPT
from runner.spec import RunSpec


class LayerSplitGPT(PipelineGPT):
    def microbatches(self, spec: RunSpec) -> int:
        return 1
