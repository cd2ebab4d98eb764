"""The planner's memory model against hand-computed cases and the papers' own numbers (no torch)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from runner.gpt.config import PRESETS, count_parameters
from runner.planner.byte_counts import (
    checkpointed_layer_bytes,
    full_parameters,
    lab_layer_activation_bytes,
    layer_activation_bytes,
    rank_parameters,
    zero_paper_bytes,
)
from runner.planner.devices import preset
from runner.planner.layouts import GUIDE_175B_LAYOUT, GUIDE_175B_WORK, evaluate
from runner.planner.memory import backward_points, in_flight, layout_memory, rank_memory
from runner.planner.models import MODELS, GiB, Layout, Workload

TINY = PRESETS["tiny"]  # 4 layers, 4 heads, width 64, vocabulary 512, 128 positions


def test_gpt2_124m_parameters_exact():
    # GPT-2 small as published in Hugging Face's gpt2 checkpoint: 124,439,808 with the head tied
    assert full_parameters(MODELS["gpt2"]) == 124_439_808
    assert count_parameters(MODELS["gpt2"]) == 124_439_808  # the model's own count agrees


def test_gpt3_175b_is_175b():
    # Brown et al. 2020 table 2.1: 175.0B; ours (GPT-2 shape, learned positions of 2048) 174.6B
    assert full_parameters(MODELS["gpt3-175b"]) == pytest.approx(175.0e9, rel=0.005)
    assert full_parameters(MODELS["gpt3-13b"]) == pytest.approx(13.0e9, rel=0.02)


@pytest.mark.parametrize(
    ("model", "published"), [("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496)]
)  # the released checkpoints' safetensors, summed: 8.03B and 70.6B
def test_llama_parameters_exact(model, published):
    assert full_parameters(MODELS[model]) == published


def test_llama_rank_parameters_with_key_value_heads_split_and_copied_by_hand():
    # llama-3.1-8b (h 4096, 32 heads of 128, 8 key/value heads, SwiGLU 14336, untied vocabulary 128256), no biases.
    cfg, h, f, V = MODELS["llama-3.1-8b"], 4096, 14336, 128256
    norms = 2 * h
    # tp 8 splits the key/value heads: a rank has 4 query heads and 1 key/value head; tp 16 copies each to 2 ranks:
    # 2 query heads and still 1 key/value head (128 rows of K and of V)
    for tp, q_rows in ((8, 512), (16, 256)):
        c_attn = (q_rows + 2 * 128) * h
        block = norms + c_attn + h * h // tp + 2 * (f // tp) * h + (f // tp) * h
        first = rank_parameters(cfg, Layout(tp=tp, pp=2), 0)
        last = rank_parameters(cfg, Layout(tp=tp, pp=2), 1)
        assert first.total == V // tp * h + 16 * block  # no positions: rotary
        assert last.total == 16 * block + h + V // tp * h  # the final RMSNorm and the untied head's rows
        assert (first.outer_tensors, last.outer_tensors) == (1, 2)


def test_llama_blocks_saved_values_and_kv_cache_by_hand():
    # llama-tiny (h 64, 4 heads of 16, 2 key/value heads, SwiGLU 176) per token of a block, float32 and tp 1:
    # x and x*rsqrt of both RMSNorms (4 x 64) and the c_attn and c_fc inputs (2 x 64) whole; the rotated q (64) and
    # k (32), v's copy (32), the attention output (64), c_fc's output (352), silu(gate) and the product (176 each):
    # 896 (c_attn's output is freed once its heads are read)
    cfg = PRESETS["llama-tiny"]
    assert lab_layer_activation_bytes(4, 2, 64, cfg=cfg) == 8 * (6 * 64 + 896) * 4
    # tp 4 copies the 2 key/value heads: q 16, one head's k and v 16 each, SwiGLU 44 wide
    assert lab_layer_activation_bytes(4, 2, 64, tp=4, cfg=cfg) == 8 * (6 * 64 + (16 + 16 + 16 + 16 + 4 * 44)) * 4
    # generate keeps K and V of the 2 key/value heads (32 wide), not of 4: half GPT-2 tiny's cache at the same width
    w = Workload(workload="generate", batch=2, seq=10, new_tokens=6)
    assert rank_memory(cfg, Layout(), w, 0).kv_cache_bytes == 2 * 4 * 2 * (10 + 5) * 32 * 4
    assert rank_memory(cfg, Layout(tp=4), w, 0).kv_cache_bytes == 2 * 4 * 2 * (10 + 5) * 16 * 4


def test_tensor_parallel_rank_parameters_by_hand():
    # tiny over tp 2, Megatron style, counted one tensor at a time:
    h, V, P = 64, 512, 128
    ln = 2 * (h + h)  # ln_1, ln_2 whole
    c_attn = (3 * h * h + 3 * h) // 2
    attn_proj = h * h // 2 + h  # row-parallel weight split, bias whole
    c_fc = (4 * h * h + 4 * h) // 2
    mlp_proj = 4 * h * h // 2 + h
    block = ln + c_attn + attn_proj + c_fc + mlp_proj
    assert block == 25184
    expect = V // 2 * h + P * h + 4 * block + 2 * h
    assert rank_parameters(TINY, Layout(tp=2), 0).total == expect == 125440


def test_vocabulary_padding_and_pipeline_head():
    # gpt2's 50257 rows over tp 4: 12565 rows a rank (50260 padded); pp 2: the last stage holds the tied head
    # again as its own lm_head, plus the final LayerNorm
    cfg, h = MODELS["gpt2"], 768
    first = rank_parameters(cfg, Layout(tp=4, pp=2), 0)
    last = rank_parameters(cfg, Layout(tp=4, pp=2), 1)
    block = 2 * 2 * h + (3 * h * h + 3 * h) // 4 + h * h // 4 + h + (4 * h * h + 4 * h) // 4 + 4 * h * h // 4 + h
    assert first.total == 12565 * h + 1024 * h + 6 * block
    assert last.total == 6 * block + 2 * h + 12565 * h


def test_adam_state_by_hand():
    # float32 AdamW: exp_avg + exp_avg_sq, 4 bytes each a parameter, and a 4-byte step per tensor:
    # gpt2 has 12 blocks x 12 tensors + wte, wpe, ln_f.weight, ln_f.bias = 148 tensors
    m = rank_memory(MODELS["gpt2"], Layout(), Workload(batch=1, seq=8), 0)
    assert m.param_bytes == 4 * 124_439_808
    assert m.grad_bytes == 4 * 124_439_808
    assert m.optimizer_bytes == 8 * 124_439_808 + 4 * 148
    # pure bfloat16: everything in 2 bytes (AdamW's moments follow the parameter's dtype)
    bf = rank_memory(MODELS["gpt2"], Layout(), Workload(batch=1, seq=8, dtype="bfloat16"), 0)
    assert bf.optimizer_bytes == 4 * 124_439_808 + 4 * 148
    # bf16-mixed keeps float32 master weights: the model states are float32's
    mixed = rank_memory(MODELS["gpt2"], Layout(), Workload(batch=1, seq=8, dtype="bf16-mixed"), 0)
    assert mixed.states_bytes == m.states_bytes
    # inference keeps no gradients or optimizer state
    fwd = rank_memory(MODELS["gpt2"], Layout(), Workload(workload="forward", batch=1, seq=8), 0)
    assert fwd.grad_bytes == fwd.optimizer_bytes == 0


def test_zero_paper_figure_1():
    # Rajbhandari et al. 2020, figure 1: 7.5B parameters, Nd = 64, K = 12:
    # baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.88 GB
    psi = 7.5e9
    assert zero_paper_bytes(psi, 64, 0) / 1e9 == pytest.approx(120, abs=0.05)
    assert zero_paper_bytes(psi, 64, 1) / 1e9 == pytest.approx(31.4, abs=0.05)
    assert zero_paper_bytes(psi, 64, 2) / 1e9 == pytest.approx(16.6, abs=0.1)
    assert zero_paper_bytes(psi, 64, 3) / 1e9 == pytest.approx(1.88, abs=0.01)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_by_hand(stage):
    # gpt2 over dp 8, float32: 13 units (12 blocks of 7,087,872 and the outer 38,597,376 + 786,432 + 1,536)
    psi, dp = 124_439_808, 8
    block, outer = 12 * 768 * 768 + 13 * 768, 50257 * 768 + 1024 * 768 + 2 * 768
    assert 12 * block + outer == psi
    shards = 12 * -(-block // dp) + -(-outer // dp)  # ceil: each unit padded to a multiple of dp
    m = rank_memory(MODELS["gpt2"], Layout(dp=dp, zero_stage=stage), Workload(batch=8, seq=8), 0)
    params = {1: 4 * psi, 2: 4 * psi, 3: 4 * shards}[stage]
    grads = {1: 4 * psi, 2: 4 * shards, 3: 4 * shards}[stage]
    assert (m.param_bytes, m.grad_bytes, m.optimizer_bytes) == (params, grads, 8 * shards + 4 * 13)
    # the paper's shape with our widths (4 + 4 + 8 bytes, master = the parameter): 8Psi + 8Psi/Nd,
    # 4Psi + 12Psi/Nd, 16Psi/Nd, up to the padding (< 1 element a unit)
    paper_shape = {1: 8 * psi + 8 * psi / dp, 2: 4 * psi + 12 * psi / dp, 3: 16 * psi / dp}[stage]
    assert m.states_bytes == pytest.approx(paper_shape, abs=16 * 13 + 4 * 13)


def test_korthikanti_activations_small_case():
    # s = 4, b = 2, h = 8, a = 2: sbh = 64
    assert layer_activation_bytes(4, 2, 8, 2) == 64 * (34 + 5 * 2 * 4 / 8)  # 2496
    assert layer_activation_bytes(4, 2, 8, 2) == 2496
    assert layer_activation_bytes(4, 2, 8, 2, tp=2) == 64 * (10 + 24 / 2 + 5 * 2 * 4 / (8 * 2))  # 1568
    assert layer_activation_bytes(4, 2, 8, 2, tp=2, sequence_parallel=True) == 2496 / 2
    assert checkpointed_layer_bytes(4, 2, 8) == 128  # 2sbh
    assert checkpointed_layer_bytes(4, 2, 8, tp=2, sequence_parallel=True) == 64


def test_korthikanti_gpt3_175b_layer():
    # Korthikanti et al. section 4.1 / table 2 for GPT-3 175B (s 2048, b 1, h 12288, a 96), t = 8:
    # sbh(10 + 24/8 + 5*96*2048/(12288*8)) = sbh * 23 bytes; with sequence parallelism sbh * 34 + 80 / 8
    sbh = 2048 * 12288
    assert layer_activation_bytes(2048, 1, 12288, 96, tp=8) == pytest.approx(sbh * 23)
    assert layer_activation_bytes(2048, 1, 12288, 96, tp=8, sequence_parallel=True) == pytest.approx(sbh * 114 / 8)


def test_our_blocks_saved_values_by_hand():
    # s 4, b 2, h 8 (sbh 64): float32 2 LN inputs + c_attn, c_fc inputs + 12 split values = 16 x 4 bytes
    assert lab_layer_activation_bytes(4, 2, 8) == 64 * 16 * 4
    assert lab_layer_activation_bytes(4, 2, 8, tp=2) == 64 * (4 * 4 + 12 * 4 / 2)
    assert lab_layer_activation_bytes(4, 2, 8, tp=2, sequence_parallel=True) == 64 * 16 * 4 / 2
    # bf16-mixed: float32 residual stream (LayerNorm inputs), bf16 matmul inputs and outputs: 8 + 4 + 24
    assert lab_layer_activation_bytes(4, 2, 8, residual=4, compute=2) == 64 * 36
    # at 16 bits it is Korthikanti's 34 without the scores' 5as/h and the two dropout masks' sbh bytes each
    assert lab_layer_activation_bytes(4, 2, 8, residual=2, compute=2) == layer_activation_bytes(4, 2, 8, 2) - 64 * 7


def test_microbatches_in_flight():
    assert [in_flight("1f1b", 4, 8, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight("1f1b", 4, 2, 0) == 2  # fewer microbatches than stages
    assert in_flight("gpipe", 4, 8, 3) == 8
    assert [in_flight("zb-h1", 4, 8, r) for r in range(4)] == [4, 4, 4, 4]  # W passes r behind: p on every rank
    # interleaved, p 4, v 2: Korthikanti eq. 5, L(1 + (p-1)/(p v)) layers' worth on rank 0, in units of
    # the rank's L/p layers: p (1 + (p-1)/(p v)) = 5.5
    assert in_flight("interleaved-1f1b", 4, 8, 0, v=2) == pytest.approx(4 * (1 + 3 / 8))


def test_activations_of_a_1f1b_stage_by_hand():
    # tiny, pp 2, batch 8, m 4 (b 2), seq 16, float32 (4-byte activations: twice the paper's 16-bit)
    naive = Workload(batch=8, seq=16, microbatches=4, schedule="1f1b", attention="naive")
    m0 = rank_memory(TINY, Layout(pp=2), naive, 0)
    per_layer = 16 * 2 * 64 * (34 + 5 * 4 * 16 / 64) * 2
    assert m0.in_flight == 2 and m0.microbatch_size == 2
    assert m0.activation_bytes == int(2 * 2 * per_layer)  # 2 microbatches x 2 layers
    # our fused attention keeps no s x s scores: 16 float32 values per s*b*h a layer
    sdpa = rank_memory(TINY, Layout(pp=2), Workload(batch=8, seq=16, microbatches=4), 0)
    assert sdpa.activation_bytes == 2 * 2 * 16 * 16 * 2 * 64 * 4
    # its peak is B1 (1F1B: F0 F1 B0 F2 B1 ...), 2 microbatches held and the gradients made by B0; beyond those, the
    # two microbatches' stage outputs the engine keeps for their backward (2 x 32 tokens x 64), and at the top
    # block's start the gradient arriving (32 x 64), c_proj's input gradient (32 x 256) and its weight's fresh
    # gradient (256 x 64), all float32
    assert sdpa.transient_bytes == (2 * 32 * 64 + 32 * 64 + 32 * 256 + 256 * 64) * 4
    ck = rank_memory(TINY, Layout(pp=2), Workload(batch=8, seq=16, microbatches=4, checkpoint="blocks"), 0)
    assert ck.activation_bytes == int(2 * 2 * (2 * 16 * 2 * 64) * 2)  # 2sbh a layer, 4 bytes
    every2 = rank_memory(TINY, Layout(pp=2), Workload(batch=8, seq=16, microbatches=4, checkpoint="every-2"), 0)
    assert every2.activation_bytes == 2 * (16 * 16 * 2 * 64 * 4 + 2 * 16 * 2 * 64 * 2)  # layer 1 checkpointed
    # the last stage also keeps, per microbatch (1 in flight there), the final LayerNorm's input and the head's
    # input (float32 s b h each) and cross entropy's float32 log-softmax, b s V
    last = rank_memory(TINY, Layout(pp=2), Workload(batch=8, seq=16, microbatches=4), 1)
    assert last.activation_bytes == 2 * 16 * 16 * 2 * 64 * 4 + 2 * 16 * 2 * 64 * 4 + 2 * 16 * 512 * 4
    # checkpointed, the head's share is most of what the last stage keeps
    last_ck = rank_memory(TINY, Layout(pp=2), Workload(batch=8, seq=16, microbatches=4, checkpoint="blocks"), 1)
    assert last_ck.activation_bytes == 2 * 16 * 2 * 64 * 4 + 2 * 16 * 2 * 64 * 4 + 2 * 16 * 512 * 4


def test_an_interleaved_rank_holds_the_heads_share_only_for_its_last_chunks_microbatches():
    """p = 2, v = 2, m = 4, rank 1 (it holds virtual stages 1 and 3, the head in chunk 1). Its forwards, in the
    engine's order (runner/job/schedule_ops.py interleaved_ops): F0.0 F0.1 F1.0 B1.0 F1.1 B1.1 F0.2 B0.0 F0.3 ...:
    at its fullest it holds two microbatches of chunk 0 and one of chunk 1, or three of chunk 0 -- never two of
    the head's chunk, which a count of chunk-microbatches times an average chunk would assume."""
    held = {pt.held for pt in backward_points("interleaved-1f1b", 2, 4, 1, 2)}
    assert {(2, 1), (3, 0)} <= held and max(x[1] for x in held) == 1
    work = Workload(batch=8, seq=16, microbatches=4, schedule="interleaved-1f1b", virtual_stages=2)
    layer = 16 * 16 * 2 * 64 * 4  # one float32 layer (each chunk holds one of the 4 layers), microbatch of 2
    head = 2 * 16 * 2 * 64 * 4 + 2 * 16 * 512 * 4
    assert rank_memory(TINY, Layout(pp=2), work, 1).activation_bytes == 3 * layer + head
    for schedule, v in (("1f1b", 1), ("gpipe", 1), ("zb-h1", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 3)):
        for p, m in ((2, 4), (4, 8), (3, 6), (4, 2)):
            if schedule == "interleaved-1f1b" and m % p:
                continue
            for r in range(p):  # the replay counts what the closed forms of in_flight say
                most = max(sum(pt.held) for pt in backward_points(schedule, p, m, r, v))
                assert most == in_flight(schedule, p, m, r, v) * v, (schedule, p, m, r, v)


def test_adamw_step_temporaries_and_the_peak_by_hand():
    """TINY (4 layers, width 64, vocabulary 512, MLP 256), one rank: foreach AdamW's temporary is every parameter
    again; the for-loop one two copies of the largest tensor (the 512 x 64 embedding); under ZeRO the rank's shards.
    The step runs after the backward freed the activations: the peak takes the larger of the two, not their sum."""
    work = Workload(batch=8, seq=16)
    foreach = rank_memory(TINY, Layout(), work, 0)
    psi = foreach.param_count
    assert foreach.optimizer_step_bytes == psi * 4
    loop = rank_memory(TINY, Layout(), replace(work, adamw="for-loop"), 0)
    assert loop.optimizer_step_bytes == 2 * 512 * 64 * 4
    # one rank, one microbatch: the peak is its first backward's start, before any gradient exists
    during = loop.activation_bytes + loop.transient_bytes
    assert during > loop.grad_bytes + loop.optimizer_step_bytes
    assert loop.total == loop.param_bytes + loop.optimizer_bytes + during
    small_batch = rank_memory(TINY, Layout(), Workload(batch=1, seq=4, checkpoint="blocks"), 0)
    assert small_batch.total == small_batch.states_bytes + small_batch.optimizer_step_bytes  # the step's is larger
    assert small_batch.peak_at.startswith("AdamW's step")
    zero1 = rank_memory(TINY, Layout(dp=2, zero_stage=1), work, 0)
    block = 12 * 64 * 64 + 13 * 64
    outer = 512 * 64 + TINY.block_size * 64 + 2 * 64
    assert zero1.optimizer_step_bytes == (4 * math.ceil(block / 2) + math.ceil(outer / 2)) * 4


def test_kv_cache_by_hand():
    w = Workload(workload="generate", batch=2, seq=10, new_tokens=6)
    m = rank_memory(TINY, Layout(), w, 0)
    # K and V, 4 layers, b 2, 15 positions (the prompt's 10 and 5 of the 6 tokens: the last is picked, never
    # cached), h, fp32
    assert m.kv_cache_bytes == 2 * 4 * 2 * (10 + 5) * 64 * 4
    assert rank_memory(TINY, Layout(tp=2), w, 0).kv_cache_bytes == m.kv_cache_bytes // 2
    # its peak, the larger of: the prompt's pass (10 positions cached, a block's working set of 3 + 8 values a token)
    # and the last token's (the whole cache, one layer's keys copied by torch.cat)
    prompt = 2 * 4 * 2 * 10 * 64 * 4 + 10 * 2 * 64 * 11 * 4
    last = m.kv_cache_bytes + 2 * 15 * 64 * 4
    assert m.total == m.param_bytes + max(prompt, last)
    # forward: the loss over every sequence's logits -- the logits and the log-softmax, b s V float32 each
    f = rank_memory(TINY, Layout(), Workload(workload="forward", batch=2, seq=10), 0)
    assert f.total == f.param_bytes + 2 * 2 * 10 * 512 * 4 and f.peak_at.startswith("forward: the loss")


def test_guide_175b_layout_fits_on_80_gib_and_one_gpu_does_not():
    cfg, h100 = MODELS["gpt3-175b"], preset("h100-80gb", 512, 8)
    guide = evaluate(cfg, GUIDE_175B_LAYOUT, GUIDE_175B_WORK, h100)
    assert guide.feasible, guide.reasons
    assert guide.memory is not None and 40 * GiB < guide.memory.total < 78 * GiB
    # by hand: 174.6B / (4 x 8) parameters a rank ~ 5.6e9, 4 bytes each for weights and gradients
    assert guide.memory.param_bytes == pytest.approx(4 * 5.6e9, rel=0.02)
    one = evaluate(cfg, Layout(), GUIDE_175B_WORK, h100)
    assert not one.feasible
    assert one.reasons[0].startswith("needs ") and "GiB per GPU, you have 78.6 GiB" in one.reasons[0]
    unsharded = evaluate(cfg, Layout(tp=4, pp=8, dp=16), GUIDE_175B_WORK, h100)
    assert not unsharded.feasible and "GiB per GPU" in unsharded.reasons[0]


def test_worst_rank_is_reported():
    w = Workload(batch=8, seq=16, microbatches=4)
    worst = layout_memory(TINY, Layout(pp=2), w)
    assert worst.total == max(rank_memory(TINY, Layout(pp=2), w, r).total for r in range(2))


def test_the_peak_falls_where_the_schedule_puts_it_by_hand():
    """TINY, batch 8, seq 16, float32 (4 bytes), width 64, vocabulary 512. zero_grad(set_to_none=True) frees the
    gradients at each step's start: a rank holds them only from the end of its first backward pass."""
    layer = 16 * 16 * 64 * 4  # one layer's saved values per sequence
    head = 2 * 16 * 64 * 4 + 16 * 512 * 4  # final LayerNorm and head inputs, log-softmax, per sequence
    logits = 16 * 512 * 4  # per sequence
    # one rank: all 8 sequences' activations and cross entropy's two transient logit tensors, no gradient yet
    one = rank_memory(TINY, Layout(), Workload(batch=8, seq=16), 0)
    assert one.total == one.param_bytes + one.optimizer_bytes + 8 * (4 * layer + head) + 2 * 8 * logits
    assert one.peak_at == "the first backward pass (no gradients yet): cross entropy's backward"
    # GPipe, stage 0 of 2 (2 layers), 4 microbatches of 2 sequences (32 tokens). Each microbatch held also keeps
    # its stage output (32 x 64 floats) for its backward.
    gpipe = Workload(batch=8, seq=16, microbatches=4, schedule="gpipe")
    g0 = rank_memory(TINY, Layout(pp=2), gpipe, 0)
    per_micro = 2 * 2 * layer + 32 * 64 * 4
    top = (32 * 64 + 32 * 256 + 256 * 64) * 4  # a block's backward starts: gradient in, c_proj's input's and weight's
    # B0 finds 4 microbatches and no gradient. Its largest moment is its end, the embedding's backward: B0's own
    # microbatch is freed, both blocks' gradients are made (2 x 49,984 floats), and the embedding's fresh gradient
    # (512 x 64) and the gradient arriving at it (32 x 64) exist.
    first = 3 * per_micro + (2 * (12 * 64 * 64 + 13 * 64) + 512 * 64 + 32 * 64) * 4
    # B1 finds 3 microbatches and the gradients; its largest moment is the top block's start
    second = 3 * per_micro + g0.grad_bytes + top
    assert second > first
    assert g0.total == g0.param_bytes + g0.optimizer_bytes + second
    assert g0.peak_at == "a backward pass after the first (gradients held): a block's backward start"
    # ZB-H1's last stage (F0 B0 F1 B1 W0 F2 B2 W1 ...): W runs a microbatch behind B, so W1 finds the records B1
    # and B2 left for it -- per token 7h + 4h values a layer (2 layers), the head's logits and the final LayerNorm's
    # output -- beside two microbatches in flight (less cross entropy's log-softmax, freed at B's end), the
    # gradients and the head weight's fresh gradient (512 x 64), the largest W computes
    zb = rank_memory(TINY, Layout(pp=2), Workload(batch=8, seq=16, microbatches=4, schedule="zb-h1"), 1)
    records = 2 * 16 * (2 * 11 * 64 + 512 + 64) * 4  # one microbatch of 2 sequences
    held = 2 * (2 * 2 * layer + 2 * head) - 2 * 2 * logits
    with_grads = zb.grad_bytes + 512 * 64 * 4
    assert zb.total == zb.param_bytes + zb.optimizer_bytes + held + 2 * records + with_grads
    assert zb.peak_at == "a backward pass after the first (gradients held): a weight's fresh gradient"


def test_the_embeddings_backward_can_set_the_peak_by_hand():
    """TINY, dp 2 with ZeRO-1, batch 2 (one sequence a rank) of 4 tokens: the activations are small, so the peak
    falls at the backward's end. The head's weight is the embedding's: its gradient waits in autograd's input buffer
    for the embedding's and the two are summed out of place -- three 512 x 64 gradients at once, beside the
    positions' fresh one (128 x 64) and the gradient arriving (4 x 64); ZeRO-1 has by then flattened every block's
    gradients into its unit for the all-reduce, a second copy of them. That is more than the very end, where every
    gradient is there twice (the parameters' own and the flattened)."""
    m = rank_memory(TINY, Layout(dp=2, zero_stage=1), Workload(batch=2, seq=4), 0)
    blocks = 4 * (12 * 64 * 64 + 13 * 64)
    end = (2 * blocks + 2 * 64 + 3 * 512 * 64 + 128 * 64 + 4 * 64) * 4
    assert end > 2 * m.grad_bytes
    assert m.total == m.param_bytes + m.optimizer_bytes + end
    assert m.peak_at == "the first backward pass (no gradients yet): the embeddings' backward at its end"
    # plain data parallelism fills its all-reduce buckets in no per-block order: no flattened copy is counted there
    # before the end, which then sets the peak
    dp = rank_memory(TINY, Layout(dp=2), Workload(batch=2, seq=4), 0)
    assert dp.total == dp.param_bytes + dp.optimizer_bytes + 2 * dp.grad_bytes
    assert dp.peak_at == "the gradients' all-reduce at the backward's end"


def test_zero3_peak_by_hand():
    """ZeRO-3 over dp 2, TINY, batch 8 (4 sequences of 16 a rank: 64 tokens), float32. The outer unit stays
    gathered through the step (512 x 64 + 128 x 64 + 2 x 64 floats); while a block runs, that block and the
    prefetched next one (49,984 floats each). The peak is a block's reduce-scatter in the backward: the blocks'
    activations (the head's are gone), the head's gradient waiting for the embedding's (512 x 64), and three of a
    unit's gradients (the parameters', their flattened copy, the previous unit's in flight) less the activations
    of the block whose backward has ended. Gloo adds two of a block's size: it all-gathers the prefetched block
    into a buffer of its own, and copies a reduce-scatter's input."""
    work = Workload(batch=8, seq=16)
    nccl = rank_memory(TINY, Layout(dp=2, zero_stage=3), work, 0)
    block, outer = 12 * 64 * 64 + 13 * 64, 512 * 64 + 128 * 64 + 2 * 64
    layer = 16 * 64 * 64 * 4  # one layer's saved bytes: 16 float32 values per token and width
    peak = nccl.param_bytes + nccl.optimizer_bytes + 4 * layer - layer + (512 * 64 + outer + 2 * block + 3 * block) * 4
    assert nccl.total == peak
    assert nccl.peak_at == "the first backward pass (no gradients yet): a unit's reduce-scatter"
    gloo = rank_memory(TINY, Layout(dp=2, zero_stage=3), replace(work, backend="gloo"), 0)
    assert gloo.total == peak + 2 * block * 4


def test_inference_holds_autocasts_copies_and_the_sends_in_flight_by_hand():
    """Forward, TINY, a pipeline of 2 with 4 microbatches of 2 sequences of 16 (32 tokens), bf16-mixed. Stage 0
    peaks in its last block on its last microbatch: the block's working set (3 + 8 values of width 64 a token, in
    bfloat16), autocast's bfloat16 copies of both its blocks' matmul weights and biases (cached until GPT.forward
    returns: parameters require grad even under no_grad), and the three earlier microbatches' hidden states
    (float32), sent but not yet received by stage 1."""
    w = Workload(workload="forward", batch=8, seq=16, microbatches=4, dtype="bf16-mixed")
    m = rank_memory(TINY, Layout(pp=2), w, 0)
    matmul = 12 * 64 * 64 + 9 * 64  # c_attn, both c_proj and c_fc: weights and biases (LayerNorms are not cast)
    assert m.total == m.param_bytes + 32 * 64 * 11 * 2 + 2 * 2 * matmul + 3 * 32 * 64 * 4
    assert m.peak_at == "forward: a block's working set"
