"""Building one rank's part of the parallel GPT for a spec: every strategy is the same composition.

    GPT on the meta device (shapes only)
    -> tensor parallelism applied by the plan, if tp > 1        (runner/gpt/tp_plan.py)
    -> cut to this rank's pipeline stage                        (runner/gpt/model.py cut_stage)
    -> values by name, on the device in the dtype               (runner/gpt/model.py materialize)
    -> the pipeline engine over it, m microbatches              (runner/gpt/pipeline.py)
    -> data parallelism around it, if dp > 1                    (runner/gpt/data_parallel.py)

'single' is all of it with every degree 1, 'layer' pp stages with one microbatch, 'tensor' tp ranks
with one stage, 'pipeline' stages with microbatches, 'data' dp replicas, '3d' everything: the spec's
degrees and options (unused ones are 1 / off) say which steps do anything.
"""

from __future__ import annotations

import torch

from runner.gpt.data_parallel import DataParallelGPT
from runner.gpt.mesh import Mesh
from runner.gpt.model import GPT, WholeVocabulary, cut_stage, materialize
from runner.gpt.pipeline import PipelineGPT, stage_layers
from runner.gpt.strategy import ParallelGPT
from runner.gpt.tp_plan import apply_tensor_parallel
from runner.spec import RunSpec


def build_parallel_gpt(spec: RunSpec, mesh: Mesh, device: torch.device, dtype: torch.dtype) -> ParallelGPT:
    """This rank's shard of the GPT for `spec` on `mesh`, with the three workloads on it."""
    config = spec.model_config()
    with torch.device("meta"):
        model = GPT(config)
    output = WholeVocabulary()
    if mesh.tp_size > 1:
        output = apply_tensor_parallel(model, mesh.tp, spec.tp_style, spec.sequence_parallel)
    stage, n_stages = mesh.coord.pp, mesh.pp_size
    first, last = stage_layers(config.n_layer, n_stages, stage)
    cut_stage(model, first, last, has_embed=stage == 0, has_head=stage == n_stages - 1)
    materialize(model, spec.seed, device=device, dtype=dtype)
    engine = PipelineGPT(model, output, mesh, device, dtype, microbatches=spec.microbatches,
                         schedule=spec.schedule, workload=spec.workload)  # fmt: skip
    return DataParallelGPT(engine, mesh) if mesh.dp_size > 1 else engine
