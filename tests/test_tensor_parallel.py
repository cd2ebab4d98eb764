"""Strategy 'tensor' on real gloo ranks: every workload and style matches the reference; collectives counted exactly.

Tolerances (float32): logits, loss and gradients within 1e-5 (all-reduce sums partial products in another
order than one matmul, so differences are ~1e-7); weights after one AdamW step within 5e-5, i.e. 5% of one
step at lr 1e-3, because Adam's first step is lr * g / |g| and so magnifies the relative error of the
smallest gradients.
"""

from __future__ import annotations

import pytest

from runner.gpt.tensor_parallel import padded_vocab
from tests.jobs import run_torchrun

pytestmark = pytest.mark.slow

TOL, WEIGHT_TOL = 1e-5, 5e-5
B, S, H, L, V = 4, 32, 64, 4, 512  # the tiny preset


def spec(**kw) -> dict:
    return {"strategy": "tensor", "model": "tiny", "batch": B, "seq": S, "steps": 2, "warmup": 1, "verify": True, **kw}


def assert_matches(result: dict, workload: str) -> None:
    v = result["verify"]
    if workload == "generate":
        assert v["tokens_equal"] is True
        return
    assert v["logits_max_abs_diff"] <= TOL and v["loss_abs_diff"] <= TOL
    if workload == "train":
        assert v["grads_max_abs_diff"] <= TOL
        assert v["weights_max_abs_diff"] <= WEIGHT_TOL


@pytest.mark.parametrize("style", ["megatron", "gather"])
@pytest.mark.parametrize("tp", [2, 4])
def test_train_matches_reference(tmp_path, tp, style):
    result = run_torchrun(spec(tp=tp, tp_style=style, workload="train"), tmp_path)
    assert_matches(result, "train")
    assert [r["tp"] for r in result["ranks"]] == list(range(tp))


@pytest.mark.parametrize(("tp", "style"), [(2, "megatron"), (4, "megatron"), (2, "gather")])
@pytest.mark.parametrize("workload", ["forward", "generate"])
def test_forward_and_greedy_generation_match_reference(tmp_path, tp, style, workload):
    assert_matches(run_torchrun(spec(tp=tp, tp_style=style, workload=workload, new_tokens=6), tmp_path), workload)


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_train_matches_reference(tmp_path, tp):
    assert_matches(run_torchrun(spec(tp=tp, sequence_parallel=True, workload="train"), tmp_path), "train")


def test_vocab_parallel_loss_on_a_vocabulary_that_is_not_a_multiple_of_tp(tmp_path):
    dims = {"model": "custom", "n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 509, "block_size": 64}
    assert padded_vocab(509, 4) == 512  # 3 padding rows on the last rank, masked out of the softmax
    result = run_torchrun(spec(tp=4, workload="train", **dims), tmp_path)
    assert_matches(result, "train")
    gen = run_torchrun(spec(tp=4, workload="generate", new_tokens=5, **dims), tmp_path / "gen")
    assert_matches(gen, "generate")


def test_megatron_train_all_reduce_bytes_equal_the_theory(tmp_path):
    """Per layer: 2 all-reduces of b*s*h forward (attention and MLP outputs) and 2 backward (their inputs).
    Around the layers: the embedding's forward all-reduce, the LM head input's backward all-reduce, and
    the vocab-parallel loss's 3 all-reduces of one float per token (max, sum of exponentials, target logit).
    No all-gather at all: the loss never needs full logits."""
    steps = 2
    result = run_torchrun(spec(tp=2, workload="train", steps=steps, verify=False), tmp_path)
    act = B * S * H * 4
    per_step_calls = 4 * L + 2 + 3
    per_step_bytes = 4 * L * act + 2 * act + 3 * B * S * 4
    for r in result["ranks"]:
        assert r["comm_calls"]["all_reduce"] == steps * per_step_calls
        assert r["comm_bytes"]["all_reduce"] == steps * per_step_bytes
        assert r["comm_bytes"]["all_gather"] == 0 and r["comm_bytes"]["send"] == 0


def test_sequence_parallel_replaces_each_all_reduce_by_reduce_scatter_and_all_gather(tmp_path):
    steps, tp = 2, 2
    result = run_torchrun(spec(tp=tp, sequence_parallel=True, workload="train", steps=steps, verify=False), tmp_path)
    act = B * S * H * 4
    for r in result["ranks"]:
        # Forward: embedding + 2 per layer reduce-scatters (payload: the full partial tensor handed in);
        # backward: 2 per layer + the LM head input's reduce-scatter.
        assert r["comm_calls"]["reduce_scatter"] == steps * (1 + 2 * L + 2 * L + 1)
        assert r["comm_bytes"]["reduce_scatter"] == steps * (1 + 4 * L + 1) * act
        # All-gathers take this rank's sequence shard (act / tp): 2 per layer forward, 2 backward, the LM
        # head input forward, the embedding output's gradient backward, and the position embedding's
        # gradient backward ([1, s/tp, h]).
        assert r["comm_bytes"]["all_gather"] == steps * ((4 * L + 2) * act // tp + S // tp * H * 4)


def test_sharded_parameters_shrink_as_one_over_tp(tmp_path):
    sizes = {}
    for tp in (2, 4):
        result = run_torchrun(spec(tp=tp, workload="forward", steps=1, verify=False), tmp_path / str(tp))
        sizes[tp] = result["ranks"][0]["param_count"]
    # Replicated on every rank: positions, LayerNorms, row-parallel biases (c_proj of attention and MLP).
    replicated = 128 * H + L * (4 * H + 2 * H) + 2 * H
    full = 241024
    for tp, count in sizes.items():
        assert count - replicated == (full - replicated) // tp
