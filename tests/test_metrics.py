"""Run figures against independent facts: GPT-2 124M's FLOPs counted by hand, the decode passes generate
really runs, and device peaks matched by exact model and form factor."""

from __future__ import annotations

import pytest
import torch

from runner.gpt.config import PRESETS
from runner.gpt.model import GPT
from runner.job.metrics import device_peak_flops, matmul_parameters, model_flops
from runner.spec.run_spec import RunSpec

GPT2 = PRESETS["gpt2"]


def test_gpt2_124m_parameters_without_positions():
    # Hugging Face GPT2LMHeadModel: 124,439,808 parameters (tied head); positions are 1024 x 768 of them.
    assert matmul_parameters(GPT2) == 124_439_808 - 1024 * 768 == 123_653_376


def test_gpt2_124m_training_flops_by_hand():
    # PaLM: 6N + 12*l*h*s per token = 6 * 123,653,376 + 12 * 12 * 768 * 1024 = 855,166,464; times 1024 tokens.
    assert model_flops(GPT2, "train", batch=1, seq=1024) == 875_690_459_136
    assert model_flops(GPT2, "forward", batch=1, seq=1024) == 875_690_459_136 // 3


def test_gpt2_124m_generate_flops_by_hand():
    # Prompt of 8 tokens, 3 new: a prefill of 8 tokens (context 8), then 2 decode passes (contexts 9 and 10).
    # 2N = 247,306,752; 4*l*h = 36,864 per position of context.
    prefill = 8 * (247_306_752 + 36_864 * 8)
    decode = (247_306_752 + 36_864 * 9) + (247_306_752 + 36_864 * 10)
    assert prefill + decode == 2_476_127_232
    assert model_flops(GPT2, "generate", batch=1, seq=8, new_tokens=3) == 2_476_127_232


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_forward_flops_are_what_the_model_multiplies(preset):
    """2N + 4*l*h*s a token against torch's own count of the forward's matmuls (FlopCounterMode; attention through
    SDPA's math kernel, whose full s x s products the formula counts too): N leaves out the embeddings that are only
    looked up -- learned positions, and an untied head's token embedding -- and grouped-query attention's fewer
    key/value heads change no attention FLOP (every query head attends). What is left is PaLM's convention: N
    counts the norms' and biases' vectors as parameters, whose work is elementwise, not a matmul."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from runner.gpt.config import parameter_shapes

    cfg = PRESETS[preset]
    model = GPT(cfg, seed=0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(2, 16, dtype=torch.long))
    vectors = sum(s[0] for s in parameter_shapes(cfg).values() if len(s) == 1)
    assert counter.get_total_flops() == model_flops(cfg, "forward", batch=2, seq=16) - 2 * 32 * vectors


def test_generate_runs_one_prefill_and_new_tokens_minus_one_decode_passes():
    """The FLOP count's pass structure is what the model really does: count forward calls of a tiny GPT."""
    spec = RunSpec(model="tiny", workload="generate", batch=2, seq=8, new_tokens=5)
    model = GPT(spec.model_config(), seed=0)
    widths: list[int] = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: widths.append(args[0].shape[1]), with_kwargs=True)
    out = model.generate(torch.zeros(2, 8, dtype=torch.long), 5)
    assert out.shape == (2, 8 + 5)
    assert widths == [8, 1, 1, 1, 1]  # prefill of the prompt, then new_tokens - 1 single-token passes


@pytest.mark.parametrize(
    ("name", "dtype", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),  # SXM5
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H100 NVL", "bfloat16", 835e12),
        ("NVIDIA H100 80GB HBM3", "float32", 67e12),
        ("NVIDIA H200", "bfloat16", 989e12),
        ("NVIDIA H200 NVL", "bfloat16", 835e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100 80GB PCIe", "float32", 19.5e12),
        ("NVIDIA L40S", "bfloat16", 362e12),
        ("NVIDIA L4", "bfloat16", 121e12),
        ("NVIDIA GeForce RTX 4090", "bfloat16", 165.2e12),
    ],
)
def test_device_peaks_by_model_and_form_factor(name, dtype, peak):
    assert device_peak_flops(name, dtype) == peak


@pytest.mark.parametrize("name", ["NVIDIA L40", "NVIDIA GeForce RTX 3090", "NVIDIA H100", "Tesla V100-SXM2-16GB"])
def test_unknown_devices_get_no_peak_rather_than_a_wrong_one(name):
    # A bare "H100" does not say its form factor (SXM 989 vs PCIe 756 TFLOP/s): no MFU rather than a guess.
    assert device_peak_flops(name, "bfloat16") is None


def test_spearman_rank_correlation_by_hand():
    from runner.job.metrics import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0  # any increasing pairing
    assert spearman([1, 2, 3, 4], [9, 4, 1, 0]) == -1.0
    # ranks (1, 2, 3, 4) against (1, 3, 2, 4): 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # a tie takes the average rank: (1, 2.5, 2.5, 4) against (1, 2, 3, 4): Pearson of the ranks, 0.9487
    assert spearman([1, 2, 2, 4], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
