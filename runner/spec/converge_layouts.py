"""The convergence check's runs and the bounds its loss curves are judged by (torch-free; runner/analysis/converge.py
submits, waits and reports; the Compare page queues the same runs through runner.api.submit_converge).

Every chosen strategy (default: each registered one) trains at its smallest layout -- the self-test's, two
ranks per degree it uses (runner/spec/selftest_layouts.py) -- for the same steps on the same data, seed,
model, batch and learning rate. Each curve is compared step by step with the single device's: the relative
deviation |loss - single| / single (runner/job/metrics.py curve_deviation), judged in two parts (BOUNDS):
its largest over an early window of steps, and its largest over the whole curve.

Why two parts, from the arithmetic and from measurement (bench/RESULTS.md, "Convergence on real text": the
tiny model on the standard library's sources, batch 8 x 64, AdamW lr 3e-3, 300 steps):
- A correct strategy computes the same sums as the single device in another order: data parallelism
  averages two half-batch gradients, tensor parallelism all-reduces partial matmul sums, a pipeline adds
  its microbatches' gradients. Each reordering changes a float32 result by a few units of its last place
  (u = 2^-24 = 6e-8), and step 0's losses agree to 4e-8..1e-7 as measured; the layer split, which reorders
  nothing, matches bit for bit.
- AdamW then amplifies the difference. Its update lr * m / (sqrt(v) + eps) is normalised per weight: a
  gradient component within rounding of zero moves its weight by up to lr either way (on the first step
  the update is lr * sign(g)), far more than rounding, and every weight that differs changes the next
  gradients. The deviation grows geometrically, about tenfold every 20 steps here: below 1.1e-5 for the
  first 30 steps, 1e-4 passed between step 40 (3D) and 83 (the pipeline), up to 5e-3 by step 100, where it
  stops growing at 1.4e-2..2.2e-2 over 300 steps: the two runs have become different trainings of the same
  model on the same batches, and their losses on a batch differ by about a percent.
- So float32 is held to 1e-4 over its first 30 steps, ten times the largest measured there (tensor
  parallelism's and 3D's, whose all-reduced partial sums reorder the most). Over the whole curve it is held
  to 5e-2: amplified rounding reaches 2.2e-2 at most, and a training that drifts away (a loss that stays
  higher, a divergence) goes beyond it.
- What a loss curve cannot see: a loss is one number over the whole model. The final LayerNorm's weight 1%
  off on the last stage moves it by 1.7e-3 within 4 steps and fails (tests/test_converge.py), but one MLP
  weight 1% off moves it by 6.5e-5, inside the bound; and AdamW's update barely changes when a gradient is
  scaled as a whole (an average forgotten over the replicas). So every run of the check also verifies its
  first step against the single-device reference (runner/job/verify.py: gradients to 1e-5 in float32),
  and a failed verify fails its row: verify judges the step exactly, the curve the training.
- bf16-mixed rounds every matmul's inputs to bf16 (u = 2^-8 = 3.9e-3), and tensor parallelism also
  rounds its partial sums to bf16 before adding them, so the same amplification starts 2^16 times higher:
  the median deviation over the first 20 steps measured 2.6e-5..4.6e-4, the largest up to 4.2e-3 -- and
  at this learning rate bf16 training has loss spikes: one step's loss jumps by 17-24% and is back the next
  step (step 13 of a data-parallel run at seed 1, step 20 of its single-device baseline, step 24 of the
  tensor-parallel runs at seed 0), in the baseline as often as in the others. A largest deviation would
  judge those spikes, so bf16-mixed is held to a median of 5e-3 over its first 20 steps, ten times the
  largest median measured: a mistake shifts every step, a spike one. Its whole curve is reported, not
  judged: past the window, bf16's rounding makes correct curves wander apart by several percent (held-out
  losses 0.2% to 10% from the baseline's after 100 steps at seed 0; the data-parallel run that ended 10%
  above it at seed 0 ended 0.6% below it at seed 1).
- bfloat16 (weights stored in bf16 too) rounds every update as well; not measured here, it is held to
  twice bf16-mixed's median, 1e-2, in proportion to verify's one-step loss bounds of the two.
The windows and bounds are the check's defaults' (the tiny model at lr 3e-3): a larger learning rate or
model amplifies sooner, so a check of those starts from these measurements, not from a promise.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, replace

from runner.job.metrics import CurveDeviation, curve_deviation, relative_deviations
from runner.spec.run_spec import RunSpec
from runner.spec.selftest_layouts import layouts
from runner.spec.strategies import strategy_names

CONVERGE_TAG = "converge"
BASELINE = "single"
# The check's defaults: the tiny model on this Python's sources, long enough for the loss to fall well below
# ln 256 (bench/bench_converge.py measures how far) and for rounding differences to grow as they will.
DEFAULTS = RunSpec(model="tiny", workload="train", data="stdlib", batch=8, seq=64, steps=100, warmup=0, lr=3e-3,
                   eval_every=25, seed=0, time_limit_s=900.0)  # fmt: skip


@dataclass(frozen=True)
class Bound:
    """The relative deviation a curve may have from the single device's over its first `early_steps` steps (its
    largest, or with `early_median` its median), and its largest over the whole curve (None: not judged)."""

    early_steps: int
    early: float
    whole: float | None
    early_median: bool = False


BOUNDS: dict[str, Bound] = {
    "float32": Bound(early_steps=30, early=1e-4, whole=5e-2),
    "bf16-mixed": Bound(early_steps=20, early=5e-3, whole=None, early_median=True),
    "bfloat16": Bound(early_steps=20, early=1e-2, whole=None, early_median=True),
}


def bound_text(dtype: str) -> str:
    b = bound_of(dtype)
    whole = f"{b.whole:.0e} over the whole curve" if b.whole is not None else "the rest reported, not judged"
    early = f"a median of {b.early:.0e}" if b.early_median else f"{b.early:.0e}"
    return f"{dtype}: {early} over the first {b.early_steps} steps, {whole} (runner/spec/converge_layouts.py)"


def converge_specs(strategies: list[str] | None = None, device: str = "cpu", gpus: int = 0,
                   base: RunSpec = DEFAULTS, tag: str = CONVERGE_TAG) -> list[tuple[RunSpec | None, str]]:  # fmt: skip
    """(spec, label) per strategy, single first; spec None (the label says why) where the devices cannot hold the
    layout; ValueError naming an unknown strategy. A layout that needs more GPUs than present drops data
    parallelism first, as the self-test's do."""
    names = strategy_names()
    chosen = list(names) if not strategies else list(dict.fromkeys(strategies))
    unknown = [s for s in chosen if s not in names]
    if unknown:
        raise ValueError(f"no strategy {', '.join(unknown)}; choose among {', '.join(names)}")
    if BASELINE not in chosen:
        chosen.insert(0, BASELINE)
    first: dict[str, tuple[RunSpec, str, str | None]] = {}
    for spec, label, reason in layouts(gpus, device, options=False):
        first.setdefault(spec.strategy, (spec, label, reason))  # the default schedule: the first of its variants
    degrees = ("tp", "pp", "dp", "microbatches", "schedule", "virtual_stages", "tp_style")
    out = []
    for name in sorted(chosen, key=lambda n: (n != BASELINE, names.index(n))):
        layout, label, reason = first[name]
        if reason is not None:
            out.append((None, f"{label} skipped ({reason})"))
            continue
        spec = replace(base, strategy=name, device=device, verify=True, tags=(CONVERGE_TAG, tag),
                       **{d: getattr(layout, d) for d in degrees})  # fmt: skip
        out.append((spec, label))
    return out


def bound_of(dtype: str) -> Bound:
    return BOUNDS.get(dtype, BOUNDS["bfloat16"])


@dataclass(frozen=True)
class Judgement:
    """A curve against the single device's: its deviation over the early window (`early_judged`: the largest,
    or for bf16 the median), its largest overall, and the verdict."""

    early: CurveDeviation
    early_judged: float
    whole: CurveDeviation
    verdict: str  # pass | fail | no curve


def judge(baseline: Mapping[int, float | None], curve: Mapping[int, float | None], dtype: str) -> Judgement:
    """'pass' when the curve stays within the dtype's bounds, 'fail' beyond one, 'no curve' when the two share
    no step."""
    b = bound_of(dtype)
    window = {s: v for s, v in baseline.items() if s < b.early_steps}
    early, whole = curve_deviation(window, curve), curve_deviation(baseline, curve)
    per_step = list(relative_deviations(window, curve).values())
    judged = (statistics.median(per_step) if b.early_median else early.largest) if per_step else 0.0
    if not whole.steps:
        return Judgement(early, judged, whole, "no curve")
    within = judged <= b.early and (b.whole is None or whole.largest <= b.whole)
    return Judgement(early, judged, whole, "pass" if within else "fail")
