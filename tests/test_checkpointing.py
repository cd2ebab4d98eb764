"""Activation checkpointing: which blocks a policy picks, gradients unchanged, the bytes it drops and the
recompute it costs, checked against independent counts; and a real pipeline run verified with it.

The independent count is the one the pipeline engine uses (a saved-tensors hook summing the distinct
storages autograd keeps for backward, parameters excluded), taken around the whole model's forward with
and without checkpointing: its difference is what checkpointing dropped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from runner.gpt.checkpointing import (
    CheckpointMeter,
    apply_activation_checkpointing,
    checkpointed_layers,
    policy_every,
)
from runner.gpt.comm import CommStats
from runner.gpt.model import GPT, PRESETS, cut_stage
from runner.gpt.precision import precision_of
from runner.job.data import synthetic_batch
from tests.jobs import run_torchrun

CONFIG = PRESETS["tiny"]  # 4 layers, d=64


def batch(rows: int = 4, seq: int = 32, step: int = 0):
    return synthetic_batch(CONFIG.vocab_size, rows, seq, seed=0, step=step)


def checkpointed(policy: str, counting: bool = True, model: GPT | None = None) -> tuple[GPT, CheckpointMeter]:
    model = model if model is not None else GPT(CONFIG, seed=0)
    meter = CheckpointMeter(policy, stats=CommStats(counting=counting))
    apply_activation_checkpointing(model, policy_every(policy), meter)
    return model, meter


def kept_bytes(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct non-parameter storages autograd keeps for backward during a forward + loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages.setdefault(s.data_ptr(), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, targets)
    return sum(storages.values()), loss


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ---- policy -----------------------------------------------------------------------------------


def test_policy_names_parse_and_pick_every_kth_global_layer():
    assert [policy_every(p) for p in ("none", "blocks", "every-1", "every-3")] == [0, 1, 1, 3]
    for bad in ("every-0", "every-", "every-x", "all", "every-2.5"):
        with pytest.raises(ValueError, match="none, blocks or every-K"):
            policy_every(bad)
    layers = list(range(8))
    assert checkpointed_layers(layers, 0) == []
    assert checkpointed_layers(layers, 1) == layers
    assert checkpointed_layers(layers, 2) == [1, 3, 5, 7]  # the 2nd, 4th, ... layer, as torchtitan counts
    assert checkpointed_layers(layers, 3) == [2, 5]
    # A pipeline stage holding layers 4..7 checkpoints the same global layers the whole model would.
    assert checkpointed_layers([4, 5, 6, 7], 3) == [5]


def test_apply_marks_only_the_chosen_blocks_of_a_stage_and_keeps_parameter_names():
    model = cut_stage(GPT(CONFIG, seed=0), 2, 4, has_embed=False, has_head=True)
    names = [n for n, _ in model.named_parameters()]
    _, meter = checkpointed("every-2", model=model)
    assert meter.layers == [3]
    assert [i for i, b in model.transformer.h.items() if b.checkpoint_runner is not None] == ["3"]
    assert [n for n, _ in model.named_parameters()] == names  # reference names unchanged


# ---- numerics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["blocks", "every-2"])
@pytest.mark.parametrize("dtype", ["float32", "bf16-mixed"])
def test_gradients_with_checkpointing_equal_those_without(policy, dtype):
    precision = precision_of(dtype)
    idx, targets = batch()
    plain = GPT(CONFIG, seed=0)
    plain.compute_context = precision.compute_context("cpu")
    model, meter = checkpointed(policy, model=copy.deepcopy(plain))
    _, loss_plain = plain(idx, targets)
    loss_plain.backward()
    _, loss = model(idx, targets)
    loss.backward()
    # No dropout, and checkpoint restores the forward's autocast state for the recompute: the same
    # kernels on the same inputs, so the same bits (bf16-mixed recomputes in bf16 too).
    assert torch.equal(loss, loss_plain)
    mine, theirs = grads(model), grads(plain)
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-6, msg=name)
    assert meter.recompute_calls == len(meter.layers)  # one recompute per checkpointed block


def test_inference_without_autograd_or_with_a_kv_cache_does_not_checkpoint():
    idx, _ = batch()
    plain = GPT(CONFIG, seed=0)
    model, meter = checkpointed("blocks", model=copy.deepcopy(plain))
    with torch.no_grad():
        assert torch.equal(model(idx), plain(idx))
    assert torch.equal(model.generate(idx[:, :8], 4), plain.generate(idx[:, :8], 4))
    assert meter.figures()["activation_bytes_saved_per_microbatch"] == 0 and meter.recompute_calls == 0


# ---- what it saves and costs -------------------------------------------------------------------


def test_dropped_bytes_equal_the_independent_difference_of_kept_bytes():
    idx, targets = batch()
    plain_bytes, _ = kept_bytes(GPT(CONFIG, seed=0), idx, targets)
    saved = {}
    for policy in ("blocks", "every-2"):
        model, meter = checkpointed(policy)
        ckpt_bytes, loss = kept_bytes(model, idx, targets)
        saved[policy] = meter.figures()["activation_bytes_saved_per_microbatch"]
        assert 0 < ckpt_bytes < plain_bytes
        # What the meter says it dropped is exactly what autograd no longer keeps.
        assert saved[policy] == plain_bytes - ckpt_bytes
        loss.backward()
    # Equal blocks: checkpointing every second block of four drops half of what checkpointing all does.
    assert saved["every-2"] * 2 == saved["blocks"]
    # Per block at least the MLP's hidden activations (two [rows, seq, 4d] float32 tensors: c_fc's
    # output and GELU's) -- a floor from the shapes alone.
    rows, seq, d = idx.shape[0], idx.shape[1], CONFIG.n_embd
    assert saved["blocks"] >= CONFIG.n_layer * 2 * rows * seq * 4 * d * 4


def test_peak_counts_microbatches_in_flight_and_recompute_time_only_while_counting():
    model, meter = checkpointed("blocks")
    per_mb = None
    losses = []
    for i in range(3):  # three microbatches' forwards in flight (GPipe), then their backwards
        idx, targets = batch(rows=2, step=i)
        losses.append(model(idx, targets)[1])
        per_mb = meter.figures()["activation_bytes_saved_per_microbatch"]
    for loss in reversed(losses):
        loss.backward()
    figures = meter.figures()
    assert figures["activation_bytes_saved_peak"] == 3 * per_mb > 0
    assert meter.live_bytes == 0  # every dropped byte was recomputed, once
    assert figures["recompute_calls"] == 3 * CONFIG.n_layer and figures["recompute_s"] > 0
    assert figures["checkpoint"] == "blocks" and figures["checkpointed_blocks"] == CONFIG.n_layer

    quiet, quiet_meter = checkpointed("blocks", counting=False)  # warm-up / verify: not booked
    quiet(*batch())[1].backward()
    assert quiet_meter.recompute_s == 0 and quiet_meter.recompute_calls == 0 and quiet_meter.peak_bytes == 0


def test_recompute_time_is_a_share_of_backward_time():
    """The recompute re-runs each block's forward inside backward: its time is less than backward's and
    of the order of a forward's (a forward of the same blocks, timed alone, for scale)."""
    import time

    idx, targets = batch(rows=8, seq=64)
    model, meter = checkpointed("blocks")
    rounds = []  # (recompute, backward) seconds; the quickest round is least disturbed by other processes
    for _ in range(3):
        model.zero_grad()
        before = meter.recompute_s
        _, loss = model(idx, targets)
        start = time.perf_counter()
        loss.backward()
        backward_s = time.perf_counter() - start
        rounds.append((meter.recompute_s - before, backward_s))
    recompute_s, backward_s = min(rounds)
    forwards = []  # the quickest of three as well: one forward timed alone may meet a busy core that the rounds missed
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model(idx)
            forwards.append(time.perf_counter() - start)
    forward_s = min(forwards)
    assert 0 < recompute_s < backward_s
    assert recompute_s < 5 * forward_s


# ---- a real multi-rank run --------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_with_checkpointed_blocks_verifies_and_reports_what_it_saved(tmp_path):
    spec = dict(strategy="pipeline", pp=2, microbatches=2, schedule="gpipe", model="tiny", workload="train",
                batch=4, seq=32, steps=2, warmup=1, verify=True)  # fmt: skip
    plain = run_torchrun({**spec, "verify": False}, tmp_path / "plain")
    ckpt = run_torchrun({**spec, "checkpoint": "blocks"}, tmp_path / "ckpt")
    verify = ckpt["verify"]
    assert verify["passed"] is True and verify["dtype"] == "float32", verify
    assert verify["grads_max_rel_diff"] <= 1e-5 and verify["loss_rel_diff"] <= 1e-5
    for r_plain, r in zip(plain["ranks"], ckpt["ranks"], strict=True):
        # result.json carries each rank's strategy figures (ParallelGPT.figures()) beside the common ones.
        assert r["checkpoint"] == "blocks" and r["checkpointed_blocks"] == 2  # two of the four layers a stage
        # The engine's own count of what autograd kept at the peak fell by exactly what the meter dropped.
        assert r["activation_bytes_saved_peak"] > 0
        assert r_plain["peak_activation_bytes"] - r["peak_activation_bytes"] == r["activation_bytes_saved_peak"]
        assert r["activation_bytes_saved_peak"] == 2 * r["activation_bytes_saved_per_microbatch"]  # GPipe: m
        # One recompute per block, microbatch and timed step, inside the stage's compute time.
        assert r["recompute_calls"] == 2 * 2 * 2
        assert 0 < r["recompute_s"] < r["compute_s"]
    assert ckpt["ranks"][0]["precision"] == "float32"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("schedule", "extra", "policy", "blocks"),
    [("zb-h1", {}, "every-2", [1, 1]), ("interleaved-1f1b", {"virtual_stages": 2}, "blocks", [2, 2])],
)
def test_split_and_interleaved_schedules_verify_with_checkpointing(tmp_path, schedule, extra, policy, blocks):
    """zb-h1 runs backward as two autograd passes over a retained graph (input gradients, then weights);
    interleaving gives a rank two model chunks. Both recompute correctly: the float32 bound holds."""
    m, steps = 2, 1
    result = run_torchrun(dict(strategy="pipeline", pp=2, microbatches=m, schedule=schedule, model="tiny",
                               workload="train", batch=4, seq=16, steps=steps, warmup=0, verify=True,
                               checkpoint=policy, **extra), tmp_path)  # fmt: skip
    verify = result["verify"]
    assert verify["passed"] is True and verify["grads_max_rel_diff"] <= 1e-5, verify
    for r, n_blocks in zip(result["ranks"], blocks, strict=True):
        assert r["checkpointed_blocks"] == n_blocks and r["activation_bytes_saved_peak"] > 0
        if schedule == "zb-h1" and r["pp"] == 1:  # the last stage splits its backward: B and W each recompute
            assert r["recompute_calls"] > n_blocks * m * steps
        else:
            assert r["recompute_calls"] == n_blocks * m * steps
