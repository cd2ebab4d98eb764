"""When two runs measured the same work: the model as built, the workload, batch, sequence and new tokens (what
their throughput can be ranked on), and beyond it their data, seed and learning rate (what makes one loss curve
another's). Compare (ui/alike.py, ui/compare_sets.py) and api.best_runs ask here. Torch-free.
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
