"""What Compare says about runs that did not do the same work (runner.analysis.same_work decides which): the words
for what differs, whether the chosen runs trained alike (the convergence bound's verdict), and which loss curves are
not held against the baseline's, and what "Best of each strategy" left out. Pure functions of RunSpecs and get_run() dicts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner.analysis.same_work import CURVE_FIELDS, TRAINING_FIELDS, work_differences
from runner.spec.run_spec import RunSpec

if TYPE_CHECKING:
    from runner.api import BestRuns


def difference_text(a: RunSpec, b: RunSpec, name: str) -> str:
    """'workload train / forward'; a model by its name, and by what differs in it as built ('model tiny:
    vocab_size 50304 / 256' where the data's vocabulary sized one of them)."""
    if name != "model":
        return f"{name} {getattr(a, name)} / {getattr(b, name)}"
    ca, cb = a.model_config().to_dict(), b.model_config().to_dict()
    dims = [f"{k} {ca[k]} / {cb.get(k)}" for k in ca if ca[k] != cb.get(k)][:3]
    named = f"model {a.model}" if a.model == b.model else f"model {a.model} / {b.model}"
    return f"{named}: {', '.join(dims)}" if dims else named


def shared_training(runs: list[dict]) -> str | None:
    """The dtype of runs that trained the same model on the same data, seed, batch and learning rate -- whose
    curves the convergence bound judges (runner/spec/converge_layouts.py) -- else None."""
    specs = [RunSpec.from_dict(r["spec"]) for r in runs]
    alike = all(not work_differences(specs[0], s, TRAINING_FIELDS) for s in specs[1:])
    return specs[0].dtype if alike and specs[0].workload == "train" else None


def unlike_baseline(runs: list[dict], baseline: int | None, fields: tuple[str, ...] = CURVE_FIELDS) -> dict[int, str]:
    """Runs that cannot be held against the baseline, each with what differs ('data stdlib / synthetic'): with
    CURVE_FIELDS their loss curves (a deviation from another model's or another data's curve measures nothing),
    with WORK_FIELDS their figures (a ratio to a run of another batch measures the batch)."""
    base = next((r for r in runs if r["id"] == baseline), None)
    if base is None:
        return {}
    spec = RunSpec.from_dict(base["spec"])
    out = {}
    for run in runs:
        other = RunSpec.from_dict(run["spec"])
        if differ := work_differences(spec, other, fields):
            out[run["id"]] = ", ".join(difference_text(spec, other, name) for name in differ)
    return out


def best_note(picked: BestRuns) -> str:
    """What "Best of each strategy" picked among, and the strategies it left out for having run other work."""
    text = f"The fastest run of each strategy among those that did run #{picked.work_of}'s work (the newest)."
    by_fields: dict[str, list[str]] = {}
    for strategy, fields in picked.left_out.items():
        by_fields.setdefault(", ".join(fields), []).append(strategy)
    for fields, strategies in by_fields.items():
        text += f" Left out, their runs differ in {fields}: {', '.join(strategies)}."
    return text
