"""Building one rank's part of the parallel GPT for a spec: the one place a strategy becomes modules."""

from __future__ import annotations

import torch

from runner.gpt.mesh import Mesh
from runner.gpt.strategy import ParallelGPT
from runner.spec import RunSpec


def build_parallel_gpt(spec: RunSpec, mesh: Mesh, device: torch.device, dtype: torch.dtype) -> ParallelGPT:
    """The one place that maps a strategy name to its implementation."""
    if spec.strategy in ("single", "layer"):
        from runner.gpt.layer_split import LayerSplitGPT

        return LayerSplitGPT(spec, mesh, device, dtype)
    if spec.strategy == "3d":
        from runner.gpt.data_parallel import DataParallelGPT
        from runner.gpt.three_d import ThreeDGPT

        return DataParallelGPT(ThreeDGPT(spec, mesh, device, dtype), mesh)
    if spec.strategy == "data":
        from runner.gpt.data_parallel import DataParallelGPT
        from runner.gpt.layer_split import LayerSplitGPT

        return DataParallelGPT(LayerSplitGPT(spec, mesh, device, dtype), mesh)
    if spec.strategy == "tensor":
        from runner.gpt.tensor_parallel import TensorParallelGPT

        return TensorParallelGPT(spec, mesh, device, dtype)
    if spec.strategy == "pipeline":
        from runner.gpt.pipeline import PipelineGPT

        return PipelineGPT(spec, mesh, device, dtype)
    raise NotImplementedError(f"strategy {spec.strategy!r} is not implemented in this build")
