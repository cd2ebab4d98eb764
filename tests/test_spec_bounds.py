"""Upper bounds in RunSpec.validate: ranks against this machine's cores, memory against its RAM, and a checkpoint's
whole layout (depth, context, layer shapes) against the chosen model, each refused naming the field and the limit."""

from __future__ import annotations

import json
import struct

import psutil

from runner.spec.estimates import host_memory_estimate
from runner.spec.run_spec import RunSpec, usable_cores
from runner.spec.validation import CPU_RANKS_PER_CORE, validate_spec


def test_more_cpu_ranks_than_the_cores_can_time_slice_are_refused_naming_the_degree():
    limit = CPU_RANKS_PER_CORE * usable_cores()
    if limit + 1 > 64:
        return  # a machine this large hits the 64-rank limit first
    n = limit + 1
    problems = validate_spec(RunSpec(strategy="data", dp=n, batch=n, device="cpu"), gpu_count=0)
    assert [p.field for p in problems] == ["dp"]
    assert f"{n} CPU ranks on {usable_cores()} core" in problems[0].message and str(limit) in problems[0].message
    assert validate_spec(RunSpec(strategy="data", dp=limit, batch=limit, device="cpu"), gpu_count=0) == []


def test_a_run_that_cannot_fit_in_this_machines_memory_is_refused_with_both_sizes():
    spec = RunSpec(strategy="single", model="gpt2-xl", batch=32, seq=1024, device="cpu")
    assert host_memory_estimate(spec) > psutil.virtual_memory().total
    (problem,) = validate_spec(spec, gpu_count=0)
    assert problem.field == "batch"
    total = f"{psutil.virtual_memory().total / 2**30:.1f} GiB"
    assert "batch 32 x seq 1024" in problem.message and total in problem.message
    # The same model with a small batch fits, and the estimate grows with the batch.
    small = RunSpec(strategy="single", model="tiny", batch=8, seq=64, device="cpu")
    assert validate_spec(small, gpu_count=0) == [] and host_memory_estimate(small) < host_memory_estimate(spec)


def gpt2_header(path, n_layer: int, positions: int = 1024, width: int = 768) -> None:
    """A safetensors file's header with GPT-2 tensor names and shapes (validate reads only the header)."""
    shapes = {"wte.weight": [50257, width], "wpe.weight": [positions, width]}
    for i in range(n_layer):
        shapes[f"h.{i}.attn.c_attn.weight"] = [width, 3 * width]
        shapes[f"h.{i}.mlp.c_fc.weight"] = [width, 4 * width]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_a_checkpoint_of_another_depth_or_context_is_refused_before_queueing(tmp_path):
    distil = tmp_path / "distilgpt2.safetensors"
    gpt2_header(distil, n_layer=6)  # distilgpt2: gpt2's vocabulary and width, half the layers
    (problem,) = validate_spec(RunSpec(model="gpt2", weights=str(distil)))
    assert problem.field == "weights" and "has 6 layers but the gpt2 model has 12" in problem.message
    short = tmp_path / "short-context.safetensors"
    gpt2_header(short, n_layer=12, positions=512)
    (problem,) = validate_spec(RunSpec(model="gpt2", weights=str(short)))
    assert "512 positions" in problem.message and "block_size 1024" in problem.message
    full = tmp_path / "gpt2.safetensors"
    gpt2_header(full, n_layer=12)
    assert validate_spec(RunSpec(model="gpt2", weights=str(full))) == []
