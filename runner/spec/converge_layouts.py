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

from dataclasses import replace

from runner.spec.run_spec import RunSpec
from runner.spec.selftest_layouts import layouts
from runner.spec.strategies import strategy_names

CONVERGE_TAG = "converge"
BASELINE = "single"
# The check's defaults: the tiny model on this Python's sources, long enough for the loss to fall well below
# ln 256 (bench/bench_converge.py measures how far) and for rounding differences to grow as they will.
DEFAULTS = RunSpec(model="tiny", workload="train", data="stdlib", batch=8, seq=64, steps=100, warmup=0, lr=3e-3,
                   eval_every=25, seed=0, time_limit_s=900.0)  # fmt: skip

BOUNDS: dict[str, float] = {"float32": 1e-4, "bf16-mixed": 3e-2, "bfloat16": 5e-2}
BOUNDS_NOTE = {
    "float32": "float32, 1e-4 relative: see the module docstring of runner/spec/converge_layouts.py",
    "bf16-mixed": "bf16-mixed, 3e-2 relative: see the module docstring of runner/spec/converge_layouts.py",
    "bfloat16": "bfloat16, 5e-2 relative: see the module docstring of runner/spec/converge_layouts.py",
}


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


def bound_of(dtype: str) -> float:
    return BOUNDS.get(dtype, BOUNDS["bfloat16"])


def verdict(largest: float | None, dtype: str) -> str:
    """'pass' when the curve stays within the dtype's bound, 'fail' beyond it, 'no curve' without one."""
    if largest is None:
        return "no curve"
    return "pass" if largest <= bound_of(dtype) else "fail"
