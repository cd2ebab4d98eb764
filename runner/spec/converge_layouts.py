"""The convergence check's runs and the bound each loss curve is judged by (torch-free; runner/converge.py
submits, waits and reports, the Compare page queues the same runs through runner.api.submit_converge).

Every chosen strategy (default: each registered one) trains at its smallest layout -- the self-test's, two
ranks per degree it uses (runner/spec/selftest_layouts.py) -- for the same steps on the same data, seed,
model, batch and learning rate, with no warm-up difference (every step trains and is recorded). A
strategy's curve is then compared step by step with the single-device run's: the largest relative
deviation |loss - single| / single over the steps (runner/job/metrics.py curve_deviation) against BOUNDS.

BOUNDS_NOTE says why each bound is what it is; bench/RESULTS.md ("Convergence on real text") has the
measurements it rests on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from runner.job.metrics import CurveDeviation, curve_deviation
from runner.spec.run_spec import RunSpec
from runner.spec.selftest_layouts import layouts
from runner.spec.strategies import strategy_names

CONVERGE_TAG = "converge"
BASELINE = "single"
# The check's defaults: the tiny model on this Python's sources, long enough for the loss to fall well below
# ln 256 (bench/bench_converge.py measures how far) and for rounding differences to grow as they will.
DEFAULTS = RunSpec(model="tiny", workload="train", data="stdlib", batch=8, seq=64, steps=100, warmup=0, lr=3e-3,
                   eval_every=25, seed=0, time_limit_s=900.0)  # fmt: skip

EARLY_STEPS = 30  # the window where a correct strategy still agrees to rounding (module docstring)


@dataclass(frozen=True)
class Bound:
    """The largest relative deviation a curve may have from the single device's: over its first EARLY_STEPS
    steps, and over all of them."""

    early: float
    whole: float


BOUNDS: dict[str, Bound] = {
    "float32": Bound(early=1e-4, whole=2e-2),
    "bf16-mixed": Bound(early=3e-2, whole=5e-2),
    "bfloat16": Bound(early=5e-2, whole=1e-1),
}


def bound_text(dtype: str) -> str:
    b = bound_of(dtype)
    return (f"{dtype}: {b.early:.0e} over the first {EARLY_STEPS} steps, {b.whole:.0e} over the whole curve "
            "(runner/spec/converge_layouts.py says why)")  # fmt: skip


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
        spec = replace(base, strategy=name, device=device, verify=False, tags=(CONVERGE_TAG, tag),
                       **{d: getattr(layout, d) for d in degrees})  # fmt: skip
        out.append((spec, label))
    return out


def bound_of(dtype: str) -> Bound:
    return BOUNDS.get(dtype, BOUNDS["bfloat16"])


@dataclass(frozen=True)
class Judgement:
    """A curve against the single device's: its largest deviation early and overall, and the verdict."""

    early: CurveDeviation
    whole: CurveDeviation
    verdict: str  # pass | fail | no curve


def judge(baseline: Mapping[int, float | None], curve: Mapping[int, float | None], dtype: str) -> Judgement:
    """'pass' when the curve stays within both of the dtype's bounds, 'fail' beyond either, 'no curve' when the
    two share no step."""
    early = curve_deviation({s: v for s, v in baseline.items() if s < EARLY_STEPS}, curve)
    whole = curve_deviation(baseline, curve)
    if not whole.steps:
        return Judgement(early, whole, "no curve")
    b = bound_of(dtype)
    return Judgement(early, whole, "pass" if early.largest <= b.early and whole.largest <= b.whole else "fail")
