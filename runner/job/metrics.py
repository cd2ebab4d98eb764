"""Run-level figures and their definitions: model FLOPs, tokens per step, device peak FLOP/s, percentiles.

Torch-free, so pages, the CLI and tests can use the same definitions the job writes into result.json.

Model FLOPs follow PaLM (Chowdhery et al., 2022, appendix B): a trained token costs 6N + 12·l·h·s
FLOPs, where N counts the parameters that multiply activations (the tied embedding / LM head once,
the learned positions not: they are added, not multiplied), l is the number of layers, h the model
width and s the attention context. The attention term counts QKᵀ and AV over the whole context, as
PaLM does (it does not halve for the causal mask). A forward pass is a third of the training cost:
2N + 4·l·h·s per token. Generation is a prefill of the prompt followed by one decode pass per further
token: `generate(new_tokens)` runs 1 prefill (which yields the first new token) and new_tokens - 1
decode passes of one token each, the j-th of which attends over seq + j positions.

Device peaks are the published dense (no sparsity) tensor/vector figures of the exact model and form
factor. float32 uses the plain FP32 peak because PyTorch leaves TF32 off for matmuls by default
(`torch.backends.cuda.matmul.allow_tf32 = False`); bfloat16 uses the dense BF16 tensor-core peak.
A device not in the table gets no peak, hence no MFU, rather than a wrong one. bf16-mixed runs its
matmuls in bf16 under autocast, so its MFU is against the BF16 peak.

Loss curves compare step by step (`curve_deviation`): the largest of |loss - baseline| / |baseline| over the
steps both runs recorded, the measure the convergence check (runner/analysis/converge.py), Compare and the benchmark
share.

The pipeline bubble each schedule implies (`bubble_fraction_theory`: GPipe/1F1B, interleaved 1F1B, ZB-H1)
states its own assumptions; runner/gpt/schedules.py defines the schedules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from runner.gpt.config import GPTConfig, count_parameters
from runner.service.devices import is_mig_name


def matmul_parameters(cfg: GPTConfig) -> int:
    """N of the FLOP count: every parameter a matmul uses -- all but the embeddings that are only looked up
    (learned positions; the token embedding when the head is a weight of its own; a tied one is the head)."""
    positions = cfg.block_size * cfg.n_embd if cfg.learned_positions else 0
    lookup = 0 if cfg.tie_head else cfg.vocab_size * cfg.n_embd
    return count_parameters(cfg) - positions - lookup


def forward_flops_per_token(cfg: GPTConfig, context: int) -> float:
    """One token through the model once, attending over `context` positions: 2N + 4·l·h·context."""
    return 2 * matmul_parameters(cfg) + 4 * cfg.n_layer * cfg.n_embd * context


def model_flops(cfg: GPTConfig, workload: str, batch: int, seq: int, new_tokens: int = 0) -> float:
    """Model FLOPs of one step of `workload` on a [batch, seq] input (the global batch, all ranks)."""
    if workload == "train":
        return 3 * batch * seq * forward_flops_per_token(cfg, seq)
    if workload == "forward":
        return batch * seq * forward_flops_per_token(cfg, seq)
    if workload == "generate":
        prefill = batch * seq * forward_flops_per_token(cfg, seq)
        decode = sum(batch * forward_flops_per_token(cfg, seq + j) for j in range(1, new_tokens))
        return prefill + decode
    raise ValueError(f"unknown workload {workload!r}")


def model_flops_per_step(spec) -> float:
    """Model FLOPs of one step of a RunSpec."""
    return model_flops(spec.model_config(), spec.workload, spec.batch, spec.seq, spec.new_tokens)


def tokens_per_step(spec) -> int:
    """Tokens a step produces: the whole input for forward and train, the new tokens for generate."""
    return spec.batch * (spec.new_tokens if spec.workload == "generate" else spec.seq)


@dataclass(frozen=True)
class DevicePeak:
    """Published dense peaks of one device model and form factor, in FLOP/s."""

    label: str
    fp32: float
    bf16: float


# Order matters: a more specific form factor comes before the plain name it contains.
# Sources: NVIDIA data sheets (H100/H200 "Tensor Core GPU" datasheets, A100 datasheet, L40S, L4, A10,
# Ada "RTX 4090" whitepaper); the dense figure is half the "with sparsity" one.
_PEAKS: list[tuple[re.Pattern[str], DevicePeak]] = [
    (re.compile(r"\bH100\b.*\bNVL\b"), DevicePeak("H100 NVL", 60e12, 835e12)),
    (re.compile(r"\bH100\b.*\bPCIe\b", re.I), DevicePeak("H100 PCIe", 51e12, 756e12)),
    (re.compile(r"\bH100\b.*(\bSXM|HBM3\b)"), DevicePeak("H100 SXM", 67e12, 989e12)),
    (re.compile(r"\bH200\b.*\bNVL\b"), DevicePeak("H200 NVL", 60e12, 835e12)),
    (re.compile(r"\bH200\b"), DevicePeak("H200 SXM", 67e12, 989e12)),
    (re.compile(r"\bA100\b.*\bPCIe\b", re.I), DevicePeak("A100 PCIe", 19.5e12, 312e12)),
    (re.compile(r"\bA100\b.*\bSXM", re.I), DevicePeak("A100 SXM", 19.5e12, 312e12)),
    (re.compile(r"\bL40S\b"), DevicePeak("L40S", 91.6e12, 362e12)),
    (re.compile(r"\bL4\b"), DevicePeak("L4", 30.3e12, 121e12)),
    (re.compile(r"\bA10\b"), DevicePeak("A10", 31.2e12, 125e12)),
    (re.compile(r"\bRTX 4090\b"), DevicePeak("GeForce RTX 4090", 82.6e12, 165.2e12)),
]


def device_peak(name: str) -> DevicePeak | None:
    """The peak entry for a CUDA device name as torch.cuda.get_device_name() reports it, or None. A MIG instance
    ('NVIDIA A100-SXM4-80GB MIG 3g.40gb') has a share of the GPU's SMs that its profile does not state exactly
    (a 1g slice of an A100 has 14 of the full GPU's 108), so it gets no peak, rather than the whole GPU's."""
    if is_mig_name(name):
        return None
    for pattern, peak in _PEAKS:
        if pattern.search(name):
            return peak
    return None


def device_peak_flops(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of device `name` for dtype 'float32' or 'bfloat16'; None for unknown devices."""
    peak = device_peak(name)
    if peak is None:
        return None
    return peak.bf16 if dtype in ("bfloat16", "bf16-mixed", "bf16-master") else peak.fp32  # mixed: bf16 matmuls


def bubble_fraction_theory(schedule: str, p: int, m: int, v: int = 1) -> float:
    """The idle share of each stage's step by theory, messages costing nothing.

    - gpipe and 1f1b: (p-1)/(m+p-1), with every stage's forward taking t_F and backward t_B: the step lasts
      (m + p - 1)(t_F + t_B) and each stage computes m(t_F + t_B) of it (Huang et al. 2019; the same for 1F1B,
      Narayanan et al. 2021, which only bounds the activations kept).
    - interleaved-1f1b: (p-1)/(v*m + p-1): each chunk's passes take 1/v of a stage's, so the ramp of p - 1
      passes shrinks v-fold against the same m(t_F + t_B) of work (Narayanan et al. 2021, section 2.2:
      bubble time (p-1)(t_F + t_B)/v).
    - zb-h1: (p-1)/(3m + p-1), assuming the forward, the input-gradient pass B and the weight-gradient pass W
      take equal times (t_F = t_B = t_W = t, so 1F1B's whole backward is 2t): the bubble is
      (p-1)(t_F + t_B - t_W) = (p-1)t (Qi et al. 2023, section 3.1), against m(t_F + t_B + t_W) = 3mt of
      work -- a third of 1F1B's (p-1)3t bubble. With W cheaper than that, the bubble grows towards 1F1B's.
    """
    if p <= 1:
        return 0.0
    if schedule == "interleaved-1f1b":
        return (p - 1) / (v * m + p - 1)
    if schedule == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)


def bubble_theory_formula(schedule: str) -> str:
    """The formula bubble_fraction_theory uses for `schedule`, for captions beside the measurement."""
    return {
        "interleaved-1f1b": "(p-1)/(v·m+p-1)",
        "zb-h1": "(p-1)/(3m+p-1), taking F = B = W",
    }.get(schedule, "(p-1)/(m+p-1)")


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation of paired values (ties take their average rank); None under 3 pairs or where
    either side is constant."""
    if len(xs) != len(ys) or len(xs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile q in [0, 1] of a non-empty list."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def step_number(index: int) -> int:
    """The number a step is shown by: steps are stored from index 0 (events, the database, the analyses) and shown
    from 1 (rank logs' "step 1/301", the progress "step 43 of 301", charts, timelines and messages), so the first step
    reads "step 1" everywhere a user sees one."""
    return index + 1


@dataclass(frozen=True)
class CurveDeviation:
    """How far one loss curve strays from a baseline's: the largest relative difference, where, over how many
    steps. `largest` is inf where one curve's loss is not finite (diverged) and the other's is."""

    largest: float
    at_step: int | None
    steps: int


def relative_deviations(baseline: Mapping[int, float | None], other: Mapping[int, float | None]) -> dict[int, float]:
    """|other - baseline| / |baseline| per step both curves hold a loss for (inf where one is not finite and
    the other is, or differs from a zero baseline)."""
    out = {}
    for step in sorted(baseline.keys() & other.keys()):
        b, o = baseline[step], other[step]
        if b is None or o is None:
            continue
        if math.isfinite(b) and math.isfinite(o) and b:
            out[step] = abs(o - b) / abs(b)
        else:
            out[step] = 0.0 if b == o or (math.isnan(b) and math.isnan(o)) else math.inf
    return out


def curve_deviation(baseline: Mapping[int, float | None], other: Mapping[int, float | None]) -> CurveDeviation:
    """The largest of relative_deviations, the first step where it occurs (None where the curves agree exactly:
    no step stands out), and how many steps were compared."""
    per_step = relative_deviations(baseline, other)
    if not per_step:
        return CurveDeviation(0.0, None, 0)
    at = max(per_step, key=lambda k: (per_step[k], -k))
    return CurveDeviation(per_step[at], at if per_step[at] else None, len(per_step))
