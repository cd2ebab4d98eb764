"""When two runs can be held against each other: the work they measured (model as built, workload, batch, sequence,
new tokens) for their throughput, and beyond it their data, seed and learning rate for their loss curves; and the
words that say what differs. Compare's verdicts (ui/compare_sets.py) and loss table (ui/compare.py) both ask here.
Pure functions of RunSpecs and get_run() dicts.
"""

from __future__ import annotations

from runner.spec.run_spec import RunSpec

# What two runs must share for one's figure to be held against the other's: the work measured (tokens/s), and
# beyond it what makes one loss curve another's (its data, seed and learning rate).
WORK_FIELDS = ("model", "workload", "batch", "seq", "new_tokens")
CURVE_FIELDS = ("model", "workload", "batch", "seq", "data", "seed", "lr")
TRAINING_FIELDS = (*CURVE_FIELDS, "dtype")


def work_differences(a: RunSpec, b: RunSpec, fields: tuple[str, ...] = WORK_FIELDS) -> list[str]:
    """The fields among `fields` in which specs a and b differ: the model as built (its dimensions, whatever its
    name), new tokens only where both generate."""
    out = []
    for name in fields:
        if name == "model":
            same = a.model_config() == b.model_config()
        elif name == "new_tokens":
            same = not (a.workload == b.workload == "generate") or a.new_tokens == b.new_tokens
        else:
            same = getattr(a, name) == getattr(b, name)
        if not same:
            out.append(name)
    return out


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


def unlike_curves(runs: list[dict], baseline: int | None) -> dict[int, str]:
    """Runs whose loss curve cannot be held against the baseline's, each with what differs ('data stdlib /
    synthetic'): a
    deviation from another model's or another data's curve measures nothing."""
    base = next((r for r in runs if r["id"] == baseline), None)
    if base is None:
        return {}
    spec = RunSpec.from_dict(base["spec"])
    out = {}
    for run in runs:
        other = RunSpec.from_dict(run["spec"])
        if differ := work_differences(spec, other, CURVE_FIELDS):
            out[run["id"]] = ", ".join(difference_text(spec, other, name) for name in differ)
    return out
