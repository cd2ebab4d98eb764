"""The launch form as data: which fields a strategy uses, and form values -> RunSpec + per-field problems.

What a strategy uses, its help and the neutral value of the fields it does not use all come from the
strategy registry (runner/spec/strategies), the same facts the spec validates against. The problems include
the target's (`_target`, a ui.hosts.Target): on a Slurm partition its nodes and the layout rules, elsewhere
that `nodes` stays empty, the same checks api.submit makes. Also what the Repeat field's K runs can tell.
"""

from __future__ import annotations

from typing import Any

from runner.analysis.stats import LEVEL, median_interval, runs_needed, runs_needed_each
from runner.job import corpus
from runner.spec.run_spec import MODEL_FIELDS, RunSpec, SpecError, SpecProblem, cpu_oversubscription
from runner.spec.strategies import NEUTRAL, get_strategy, strategy_names
from runner.spec.validation import validate_spec


def __getattr__(name: str) -> Any:
    """`STRATEGY_HELP`: {strategy name: one-line help}, read from the registry each time."""
    if name == "STRATEGY_HELP":
        return {n: get_strategy(n).help for n in strategy_names()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def uses(strategy: str, field: str) -> bool:
    """Whether the form enables `field` for `strategy`: exactly when the registry says the strategy uses it."""
    try:
        return get_strategy(strategy).uses(field)
    except ValueError:
        return False


def spec_from_form(values: dict[str, Any]) -> tuple[RunSpec | None, list[SpecProblem]]:
    """Form values -> (spec, problems). Fields the strategy does not use are set neutral, so they never nag.

    `_target` (a ui.hosts.Target) judges the spec against where it runs: a Slurm partition's GPUs are nodes x
    GPUs per node, and its placement problems (runner.service.cluster) are added. Without a target `_gpu_count` is the
    GPU count the device checks assume. Tags as "a, b" and an empty weights path are read by
    RunSpec.from_dict itself."""
    strategy = values.get("strategy", "single")
    gpu_count = values.get("_gpu_count")
    target = values.get("_target")
    data = {k: v for k, v in values.items() if v is not None and not k.startswith("_")}
    for name, neutral in NEUTRAL.items():
        if not uses(strategy, name):
            data[name] = neutral
    if data.get("model") != "custom":
        for dim in MODEL_FIELDS:
            data.pop(dim, None)
    if data.get("prompt"):  # every row is the prompt: its tokens are the sequence
        data["seq"] = prompt_seq(data) or data.get("seq")
    try:
        spec = RunSpec.from_dict(data)
    except SpecError as exc:  # the other fields are still judged (each unreadable one as if left at its default)
        unread = {p.field for p in exc.problems}
        try:
            rest = RunSpec.from_dict({k: v for k, v in data.items() if k not in unread})
        except SpecError:
            return None, exc.problems
        return None, exc.problems + [p for p in validate_spec(rest, gpu_count=gpu_count) if p.field not in unread]
    if target is None:
        return spec, validate_spec(spec, gpu_count=gpu_count)
    problems = validate_spec(spec, gpu_count=target.gpus_for(spec), no_gpu_reason=target.gpu_note)
    return spec, problems + [p for p in target.problems(spec) if p not in problems]


def prompt_seq(values: dict[str, Any]) -> int | None:
    """The seq a prompted generate run takes: the prompt's tokens in the data's tokenization (None: unreadable)."""
    return corpus.prompt_length(str(values.get("data") or "synthetic"), values.get("weights") or None,
                                str(values.get("prompt") or ""))  # fmt: skip


def problems_by_field(problems: list[SpecProblem]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p.field, []).append(p.message)
    return out


def oversubscription_warning(spec: RunSpec, gpu_count: int | None, cores: int | None = None) -> str | None:
    """The warning before launching a CPU run with more ranks than cores; None for GPU runs.

    With the runner not reporting yet (gpu_count None) an 'auto' run's device is unknown, so only an explicit
    'cpu' run is judged then. `cores` defaults to the usable cores of the machine serving this page, which is
    the runner's own in the usual set-up (app and runner on one host).
    """
    if gpu_count is None and spec.device != "cpu":
        return None
    if spec.resolved_device(gpu_count or 0) != "cpu":
        return None
    return cpu_oversubscription(spec.world_size, cores)


def repeat_note(repeat: int) -> str | None:
    """What `repeat` runs of one spec can tell on Compare (runner.analysis.stats' method), under the Repeat field; None for 1."""
    if repeat <= 1:
        return None
    confidence = median_interval(range(repeat)).confidence
    median = f"the median's interval has {confidence:.0%} confidence"
    if confidence < LEVEL:
        median = f"{median} (their min..max; {runs_needed()} runs reach {LEVEL:.0%})"
    each = runs_needed_each()
    other = (f"against another spec run as often, a difference can be resolved at {LEVEL:.0%}" if repeat >= each
             else f"against another spec, {each} runs of each are needed to resolve a difference at {LEVEL:.0%}")  # fmt: skip
    return f"One comparison set of {repeat} runs, run one at a time: {median}; {other}."
