"""RunSpec validation: every problem is reported at once, names its field and says how to fix it."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.spec.estimates import memory_estimate
from runner.spec.run_spec import (
    STRATEGIES,
    RunSpec,
    SpecError,
    SpecProblem,
)
from runner.spec.strategies import NEUTRAL, ParallelDims, get_strategy
from runner.spec.validation import validate_spec


def fields_of(problems: list[SpecProblem]) -> set[str]:
    return {p.field for p in problems}


def test_defaults_are_valid():
    assert validate_spec(RunSpec(), gpu_count=0) == []


def test_layer_split_that_does_not_divide_the_layers_names_pp_and_the_choices():
    (problem,) = validate_spec(RunSpec(strategy="layer", pp=3))
    assert problem.field == "pp"
    assert problem.message == (
        "splitting the layers over 3 ranks needs n_layer divisible by 3; the tiny model has 4 layers, so use pp in 1, 2, 4"
    )


def test_every_problem_is_reported_at_once():
    problems = validate_spec(RunSpec(batch=0, steps=0, seq=-1, workload="sing"))
    assert fields_of(problems) == {"batch", "steps", "seq", "workload"}
    assert all(p.message for p in problems)
    # a refused rotary base does not hide the key/value heads' problem, which it has no part in
    custom = RunSpec(model="custom", n_layer=4, n_head=4, n_embd=64, vocab_size=512, block_size=128, family="llama",
                     n_kv_head=3, rope_theta=-5.0)  # fmt: skip
    assert fields_of(validate_spec(custom)) == {"rope_theta", "n_kv_head"}


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"strategy": "zero"}, "strategy", "choose one of single, layer"),
        ({"model": "gpt5"}, "model", "is not a preset"),
        ({"strategy": "layer", "pp": 1}, "pp", "at least 2 ranks"),
        (
            {"strategy": "single", "tp": 2},
            "tp",
            "does not use tp; set tp to 1 or pick a strategy that uses it (tensor, 3d)",
        ),
        ({"strategy": "tensor", "tp": 1}, "tp", "needs at least 2 ranks in tp (got 1); set tp to 2 or more"),
        ({"strategy": "pipeline", "pp": 1}, "pp", "needs at least 2 ranks in pp"),
        ({"strategy": "data", "dp": 1}, "dp", "needs at least 2 ranks in dp"),
        ({"strategy": "3d", "pp": 2, "sequence_parallel": True}, "sequence_parallel", "needs tp 2 or more (got 1)"),
        ({"strategy": "data", "dp": 2, "sequence_parallel": True}, "sequence_parallel", "does not use sequence_parallel"),
        (
            {"strategy": "tensor", "tp": 2, "tp_style": "gather", "sequence_parallel": True},
            "sequence_parallel",
            "works only with tp_style 'megatron'",
        ),
        ({"strategy": "tensor", "tp": 2, "sequence_parallel": True, "seq": 63}, "seq", "seq divisible by tp 2"),
        ({"strategy": "3d", "pp": 3}, "pp", "needs n_layer divisible by 3"),
        ({"strategy": "3d", "tp": 3}, "tp", "needs n_head divisible by 3"),
        ({"seq": 200}, "seq", "exceeds the model's block_size 128"),
        ({"workload": "generate", "seq": 120, "new_tokens": 16}, "seq", "plus 16 new tokens"),
        ({"strategy": "data", "dp": 3, "batch": 8}, "batch", "divisible by dp 3"),
        (
            {"strategy": "layer", "pp": 2, "microbatches": 4},
            "microbatches",
            "does not use microbatches; set microbatches to 1",
        ),
        ({"device": "cuda"}, "device", "no NVIDIA GPU is visible"),
        ({"model": "custom", "n_layer": 2}, "n_head", "a custom model needs n_head"),
        (
            {"model": "custom", "n_layer": 2, "n_head": 3, "n_embd": 8, "vocab_size": 16, "block_size": 8},
            "n_head",
            "divisible by n_head 3",
        ),
        ({"weights": "/nonexistent/gpt2.safetensors"}, "weights", "no file at"),
        ({"lr": 0.0}, "lr", "positive number"),
        ({"time_limit_s": -1.0}, "time_limit_s", "positive number of seconds"),
        ({"tags": ("",)}, "tags", "1 to 64 characters"),
        ({"strategy": "data", "dp": 2, "zero_stage": 4}, "zero_stage", "must be one of 0, 1, 2, 3"),
        ({"strategy": "data", "dp": 2, "zero_stage": 2, "workload": "forward"}, "zero_stage", "workload to train"),
        ({"strategy": "3d", "pp": 2, "zero_stage": 1}, "zero_stage", "set dp to 2 or more"),
        ({"strategy": "pipeline", "pp": 2, "zero_stage": 1}, "zero_stage", "does not use zero_stage"),
        ({"checkpoint": "every"}, "checkpoint", "every-K with K a whole number"),
        ({"checkpoint": "every-0"}, "checkpoint", "every-K with K a whole number"),
        ({"checkpoint": "blocks", "workload": "generate"}, "checkpoint", "has no backward"),
        ({"strategy": "pipeline", "pp": 2, "virtual_stages": 2}, "virtual_stages", "schedule to interleaved-1f1b"),
        (
            {"strategy": "pipeline", "pp": 2, "microbatches": 2, "schedule": "interleaved-1f1b"},
            "virtual_stages",
            "at least 2 model chunks",
        ),
        (
            {"strategy": "pipeline", "pp": 2, "microbatches": 2, "schedule": "interleaved-1f1b", "virtual_stages": 4},
            "virtual_stages",
            "8 chunks must divide the model's 4 layers",
        ),
        (
            {"strategy": "pipeline", "pp": 2, "microbatches": 1, "schedule": "interleaved-1f1b", "virtual_stages": 2},
            "microbatches",
            "multiple of 2 microbatches",
        ),
        (
            {"strategy": "3d", "microbatches": 2, "schedule": "interleaved-1f1b", "virtual_stages": 2},
            "schedule",
            "set pp to 2 or more",
        ),
        ({"nodes": 0}, "nodes", "at least 1"),
        ({"model": "llama-tiny", "n_kv_head": 3}, "n_kv_head", "must divide n_head 4"),
        ({"model": "llama-tiny", "n_kv_head": 0}, "n_kv_head", "at least 1"),
        ({"model": "llama-tiny", "n_head": 64}, "n_head", "head dimension n_embd / n_head must be even"),
        ({"model": "tiny", "rope_theta": 5e5}, "rope_theta", "learned positions"),
        ({"model": "llama-tiny", "rope_theta": -1.0}, "rope_theta", "positive number"),
        ({"model": "llama-tiny", "family": "t5"}, "family", "is not a family"),
        (
            {
                "model": "custom",
                "family": "llama",
                "n_layer": 2,
                "n_head": 6,
                "n_kv_head": 2,
                "n_embd": 96,
                "vocab_size": 64,
                "block_size": 32,
                "strategy": "tensor",
                "tp": 3,
            },
            "tp",
            "use tp in 1, 2, 6",
        ),  # fmt: skip
        ({"model": "checkpoint"}, "weights", "set weights to that folder"),
        ({"model": "llama-tiny", "weights": "/nope/model.safetensors"}, "weights", "give the Hugging Face folder"),
    ],
)
def test_bad_specs_name_the_field(changes, field, fragment):
    problems = validate_spec(RunSpec(**changes), gpu_count=0)
    assert field in fields_of(problems), problems
    assert any(fragment in p.message for p in problems if p.field == field), problems


def test_a_cuda_run_times_no_first_step_a_cpu_run_may():
    # auto on a host with GPUs becomes cuda: refused the same; on CPU (no GPU) the first step may be timed.
    for device in ("cuda", "auto"):
        (problem,) = validate_spec(RunSpec(strategy="data", dp=2, device=device, warmup=0), gpu_count=2)
        assert problem.field == "warmup" and problem.message.startswith("is 0 but on CUDA the first step pays")
    assert validate_spec(RunSpec(strategy="data", dp=2, device="auto", warmup=0), gpu_count=0) == []
    assert validate_spec(RunSpec(strategy="data", dp=2, device="cuda", warmup=1), gpu_count=2) == []


def test_cuda_with_too_few_gpus_says_how_many_are_needed():
    problems = validate_spec(RunSpec(strategy="data", dp=4, batch=8, device="cuda"), gpu_count=2)
    assert [p.message for p in problems if p.field == "device"] == [
        "4 ranks need 4 GPUs but 2 are visible; lower the degrees or choose 'cpu'"
    ]


def test_auto_device_picks_cuda_only_when_enough_gpus():
    spec = RunSpec(strategy="data", dp=2, batch=8)
    assert spec.resolved_device(0) == "cpu"
    assert spec.resolved_device(1) == "cpu"
    assert spec.resolved_device(2) == "cuda"


def test_world_size_and_degrees_per_strategy():
    assert RunSpec(strategy="single").world_size == 1
    assert RunSpec(strategy="layer", pp=4).world_size == 4
    assert RunSpec(strategy="3d", tp=2, pp=2, dp=2).world_size == 8
    assert RunSpec(strategy="layer", pp=4).degrees == ParallelDims(tp=1, pp=4, dp=1)
    assert tuple(RunSpec(strategy="layer", pp=4).degrees) == (1, 4, 1)
    # Degrees a strategy does not use count as 1, and an unknown strategy is one rank (validate refuses it).
    assert tuple(RunSpec(strategy="data", tp=3, pp=5, dp=2).degrees) == (1, 1, 2)
    assert RunSpec(strategy="bogus", tp=2).world_size == 1


def test_json_round_trip():
    spec = RunSpec(strategy="layer", pp=2, tags=("a", "b"), weights=None)
    assert RunSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ("[1, 2]", "spec", "must be a JSON object"),
        ("{not json", "spec", "is not valid JSON"),
        ('{"tp": "2"}', "tp", "whole number"),
        ('{"tp": 2.5}', "tp", "whole number"),
        ('{"tp": true}', "tp", "whole number"),
        ('{"verify": "yes"}', "verify", "true or false"),
        ('{"colour": "red"}', "colour", "is not a spec field"),
        ('{"lr": "fast"}', "lr", "must be a number"),
        ('{"tags": [1]}', "tags", "list of strings"),
    ],
)
def test_malformed_json_is_refused_with_the_field(data, field, fragment):
    with pytest.raises(SpecError) as err:
        RunSpec.from_json(data)
    assert any(p.field == field and fragment in p.message for p in err.value.problems), err.value.problems


def test_weights_that_are_not_a_checkpoint_are_refused(tmp_path):
    junk = tmp_path / "weights.safetensors"
    junk.write_bytes(b"not a checkpoint")
    (problem,) = validate_spec(RunSpec(weights=str(junk)))
    assert problem.field == "weights" and "not a readable GPT-2 checkpoint" in problem.message


def test_memory_estimate_shrinks_with_the_split():
    one = memory_estimate(RunSpec(strategy="single", model="gpt2"))
    two = memory_estimate(RunSpec(strategy="layer", pp=2, model="gpt2"))
    assert two["param_bytes"] < one["param_bytes"]
    # AdamW: two float32 moments a parameter, and a float32 step counter a tensor (GPT-2: 12 tensors in each of
    # 12 blocks, plus wte, wpe and ln_f's weight and bias; the head is tied to wte).
    assert one["optimizer_bytes"] == 2 * one["param_bytes"] + 4 * (12 * 12 + 4)


# ---- property-based: validation never crashes, and what it accepts is runnable -----------------
spec_values = st.fixed_dictionaries(
    {},
    optional={
        "strategy": st.sampled_from([*STRATEGIES, "bogus"]),
        "tp": st.integers(-2, 9),
        "pp": st.integers(-2, 9),
        "dp": st.integers(-2, 9),
        "microbatches": st.integers(-1, 17),
        "schedule": st.sampled_from(["gpipe", "1f1b", "zigzag"]),
        "tp_style": st.sampled_from(["megatron", "gather", "ring"]),
        "sequence_parallel": st.booleans(),
        "model": st.sampled_from(["tiny", "small", "gpt2", "custom", "nope"]),
        "n_layer": st.none() | st.integers(-1, 13),
        "n_head": st.none() | st.integers(-1, 13),
        "n_embd": st.none() | st.integers(-1, 130),
        "vocab_size": st.none() | st.integers(-1, 600),
        "block_size": st.none() | st.integers(-1, 300),
        "workload": st.sampled_from(["forward", "generate", "train", "serve"]),
        "batch": st.integers(-1, 33),
        "seq": st.integers(-1, 300),
        "new_tokens": st.integers(-1, 40),
        "steps": st.integers(-1, 5),
        "warmup": st.integers(-1, 3),
        "device": st.sampled_from(["auto", "cpu", "cuda", "tpu"]),
        "dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
        "verify": st.booleans(),
        "lr": st.floats(allow_nan=True, allow_infinity=True),
        "time_limit_s": st.floats(allow_nan=True, allow_infinity=True),
        "tags": st.lists(st.text(max_size=70), max_size=3),
        "seed": st.integers(-1, 2**31),
    },
)


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=spec_values, gpus=st.sampled_from([None, 0, 1, 8]))
def test_any_spec_is_accepted_or_refused_with_messages(data, gpus):
    spec = RunSpec.from_json(json.dumps(data))  # through JSON, as the CLI and the runner read it
    problems = validate_spec(spec, gpu_count=gpus)
    for p in problems:
        assert isinstance(p, SpecProblem) and p.field and p.message
    if problems:
        return
    # Accepted means runnable: a registered strategy whose degrees fit the model and batch.
    cfg = spec.model_config()
    tp, pp, dp = spec.degrees
    strategy = get_strategy(spec.strategy)  # a registered strategy
    assert spec.world_size == tp * pp * dp >= 1
    for name, neutral in NEUTRAL.items():  # what the strategy does not use is neutral; what it uses, at its minimum
        assert strategy.uses(name) or getattr(spec, name) == neutral, name
    for name, least in strategy.min_degree.items():
        assert getattr(spec.degrees, name) == getattr(spec, name) >= least
    if spec.sequence_parallel:
        assert spec.strategy == "tensor" and spec.tp_style == "megatron" and spec.seq % spec.tp == 0
    assert cfg.n_embd % cfg.n_head == 0 and cfg.n_layer % pp == 0 and cfg.n_head % tp == 0
    assert spec.batch % dp == 0
    if spec.uses_microbatches:
        assert (spec.batch // dp) % spec.microbatches == 0
    assert spec.seq + (spec.new_tokens if spec.workload == "generate" else 0) <= cfg.block_size


@pytest.mark.parametrize(
    "changes",
    [
        {"strategy": "data", "dp": 2, "zero_stage": 3},
        {"strategy": "3d", "tp": 2, "pp": 2, "dp": 2, "microbatches": 2, "zero_stage": 1},
        {"strategy": "pipeline", "pp": 2, "microbatches": 4, "schedule": "interleaved-1f1b", "virtual_stages": 2},
        {"strategy": "pipeline", "pp": 2, "microbatches": 4, "schedule": "zb-h1"},
        {"checkpoint": "every-2"},
        {"dtype": "bf16-mixed"},
        {"nodes": 2},
    ],
)
def test_the_new_options_are_accepted_where_they_apply(changes):
    assert validate_spec(RunSpec(**changes), gpu_count=0) == []


def test_checkpoint_policy_reads_as_every_how_many_blocks():
    assert [RunSpec(checkpoint=c).checkpoint_every for c in ("none", "blocks", "every-1", "every-3")] == [0, 1, 1, 3]
    with pytest.raises(ValueError):
        _ = RunSpec(checkpoint="every-x").checkpoint_every


@pytest.mark.parametrize(("tp", "kv"), [(2, 2), (4, 2), (4, 4), (4, 1)])
def test_key_value_heads_split_or_copied_over_tp_are_accepted(tp, kv):
    spec = RunSpec(strategy="tensor", tp=tp, model="llama-tiny", n_kv_head=kv)
    assert validate_spec(spec, gpu_count=0) == []


def test_family_and_parts_override_the_preset():
    cfg = RunSpec(
        model="tiny", family="llama", n_kv_head=2, ffn_hidden=96, rope_theta=1e6, tie_head=False
    ).model_config()
    assert (cfg.family, cfg.bias, cfg.kv_heads, cfg.d_ff, cfg.rope_theta, cfg.tie_head) == (
        "llama", False, 2, 96, 1e6, False)  # fmt: skip
    assert RunSpec(model="llama-tiny", family="gpt2").model_config().bias  # GPT-2's biases come with its family
    assert RunSpec.from_dict({"tie_head": None, "family": None}).model_config() == RunSpec().model_config()
