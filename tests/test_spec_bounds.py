"""Upper bounds in RunSpec.validate: ranks against this machine's cores, memory against its RAM, and a checkpoint's
whole layout (depth, context, layer shapes) against the chosen model, each refused naming the field and the limit."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

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


def test_a_run_that_cannot_fit_in_this_machines_memory_is_refused_naming_what_would_fit(monkeypatch):
    """The machine's memory is set between the run's need and what its least batch and seq need (each from
    host_memory_estimate), so the verdict follows from the two estimates on any machine: above the least, lowering
    batch or seq is the fix; below it only a smaller model is. The sentence names what the workload holds."""
    from runner.spec import validation

    spec = RunSpec(strategy="single", model="gpt2-medium", batch=32, seq=1024, device="cpu")
    need = host_memory_estimate(spec)
    least = host_memory_estimate(RunSpec(strategy="single", model="gpt2-medium", batch=1, seq=1, new_tokens=1,
                                         device="cpu"))  # fmt: skip
    assert least < need
    monkeypatch.setattr(validation, "_host_memory_bytes", lambda: (least + need) // 2)
    (problem,) = validate_spec(spec, gpu_count=0)
    assert problem.field == "batch" and "lower batch or seq" in problem.message
    assert "weights, gradients, optimizer state and the activations of batch 32 x seq 1024" in problem.message
    assert f"this machine has {(least + need) // 2 / 2**30:.1f} GiB" in problem.message
    forward = replace(spec, workload="forward")
    least_forward = host_memory_estimate(replace(forward, batch=1, seq=1))
    monkeypatch.setattr(validation, "_host_memory_bytes", lambda: least_forward // 2)
    (problem,) = validate_spec(forward, gpu_count=0)
    assert problem.field == "model" and "use a smaller model: even at the least batch and seq it needs" in problem.message
    assert "(weights and the activations of batch 32" in problem.message  # a forward pass holds no optimizer state
    # The same model with a small batch fits, and the estimate grows with the batch.
    monkeypatch.undo()
    small = RunSpec(strategy="single", model="tiny", batch=8, seq=64, device="cpu")
    assert validate_spec(small, gpu_count=0) == [] and host_memory_estimate(small) < need


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
