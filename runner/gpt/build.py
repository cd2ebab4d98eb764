"""Building one rank's part of the parallel GPT for a spec: every strategy is the same composition.

    GPT on the meta device (shapes only)
    -> tensor parallelism applied by the plan, if tp > 1        (runner/gpt/tp_plan.py)
    -> cut to this rank's pipeline stage, or its v chunks       (runner/gpt/pipeline.py cut_chunks)
    -> values by name, on the device in the dtype               (runner/gpt/model.py materialize)
    -> the forward's precision: autocast under bf16-mixed,      (runner/gpt/precision.py)
       float32 masters in the optimizer under bf16-master
    -> activation checkpointing of the policy's blocks          (runner/gpt/checkpointing.py)
    -> the pipeline engine over it, m microbatches              (runner/gpt/pipeline.py)
    -> data parallelism around it, if dp > 1, ZeRO if asked     (runner/gpt/data_parallel.py, zero.py)

'single' is all of it with every degree 1, 'layer' pp stages with one microbatch, 'tensor' tp ranks
with one stage, 'pipeline' stages with microbatches, 'data' dp replicas, '3d' everything: the spec's
degrees and options (unused ones are 1 / off) say which steps do anything. Precision and
checkpointing report their figures through the engine (`PipelineGPT.figure_sources`).
"""

from __future__ import annotations

import torch

from runner.gpt.checkpointing import CheckpointMeter, apply_activation_checkpointing, policy_every
from runner.gpt.data_parallel import DataParallelGPT
from runner.gpt.mesh import Mesh
from runner.gpt.model import GPT, WholeVocabulary, materialize
from runner.gpt.pipeline import PipelineGPT, cut_chunks
from runner.gpt.precision import PrecisionFigures, precision_of
from runner.gpt.strategy import ParallelGPT
from runner.gpt.tp_plan import apply_tensor_parallel
from runner.spec.run_spec import RunSpec


def build_parallel_gpt(spec: RunSpec, mesh: Mesh, device: torch.device, dtype: torch.dtype) -> ParallelGPT:
    """This rank's shard of the GPT for `spec` on `mesh`, with the three workloads on it."""
    config = spec.model_config()
    with torch.device("meta"):
        model = GPT(config)
    output = WholeVocabulary()
    if mesh.tp_size > 1:
        output = apply_tensor_parallel(model, mesh.tp, spec.tp_style, spec.sequence_parallel)
    stage, n_stages = mesh.coord.pp, mesh.pp_size
    chunks = cut_chunks(model, n_stages, stage, spec.virtual_stages)  # rank r holds virtual stages r, r+p, ...
    precision = precision_of(spec.dtype)
    every = policy_every(spec.checkpoint)
    meter = CheckpointMeter(spec.checkpoint, mesh.clock, mesh.stats) if every else None
    lazy = spec.zero_stage == 3 and mesh.dp_size > 1  # ZeRO-3 makes each parameter itself and keeps its shard
    for chunk in chunks:
        if not lazy:
            materialize(chunk, spec.seed, device=device, dtype=dtype)
        chunk.compute_context = precision.compute_context(device.type)
        if meter is not None:
            apply_activation_checkpointing(chunk, every, meter)
    engine = PipelineGPT(chunks, output, mesh, device, dtype, microbatches=spec.microbatches,
                         schedule=spec.schedule, workload=spec.workload)  # fmt: skip
    engine.master_dtype = precision.master_dtype
    reduce_dtype = torch.float32 if spec.reduce_fp32 else None
    built = (DataParallelGPT(engine, mesh, zero_stage=spec.zero_stage, seed=spec.seed, reduce_dtype=reduce_dtype)
             if mesh.dp_size > 1 else engine)  # fmt: skip
    # After ZeRO-3 gave the parameters their values (it swaps them in, which would drop hooks set before).
    engine.figure_sources.append(PrecisionFigures(precision, engine.parameters()))
    if meter is not None:
        engine.figure_sources.append(meter)
    if mesh.tp_size > 1:  # how the key/value heads lie over the tp ranks
        engine.figure_sources.append(output)
    return built
