"""The launch form as data: which fields a strategy uses, and form values -> RunSpec + per-field problems."""

from __future__ import annotations

from typing import Any

from runner.spec import MODEL_DIMS, RunSpec, SpecError, SpecProblem, cpu_oversubscription

# Degrees and options each strategy uses; the form disables the rest and sends their neutral value.
USES: dict[str, set[str]] = {
    "single": set(),
    "layer": {"pp"},
    "tensor": {"tp", "tp_style", "sequence_parallel"},
    "pipeline": {"pp", "microbatches", "schedule"},
    "data": {"dp"},
    "3d": {"tp", "pp", "dp", "microbatches", "schedule", "tp_style", "sequence_parallel"},
}
NEUTRAL: dict[str, Any] = {"tp": 1, "pp": 1, "dp": 1, "microbatches": 1, "sequence_parallel": False}

STRATEGY_HELP = {
    "single": "the whole model on one device: the reference every other strategy is checked against",
    "layer": "consecutive layers per rank, whole batch at a time (the guide's 'model parallelism')",
    "tensor": "every layer's heads and MLP columns split over tp ranks (Megatron)",
    "pipeline": "stages of layers fed with microbatches, GPipe or 1F1B schedule",
    "data": "dp replicas on slices of the batch, gradients all-reduced",
    "3d": "tensor x pipeline x data on one device mesh",
}


def uses(strategy: str, field: str) -> bool:
    return field in USES.get(strategy, set())


def spec_from_form(values: dict[str, Any]) -> tuple[RunSpec | None, list[SpecProblem]]:
    """Form values -> (spec, problems). Fields the strategy does not use are set neutral, so they never nag."""
    strategy = values.get("strategy", "single")
    gpu_count = values.get("_gpu_count")
    data = {k: v for k, v in values.items() if v is not None and not k.startswith("_")}
    for name, neutral in NEUTRAL.items():
        if not uses(strategy, name):
            data[name] = neutral
    if data.get("model") != "custom":
        for dim in MODEL_DIMS:
            data.pop(dim, None)
    if isinstance(data.get("tags"), str):
        data["tags"] = [t.strip() for t in data["tags"].split(",") if t.strip()]
    if data.get("weights") == "":
        data["weights"] = None
    try:
        spec = RunSpec.from_dict(data)
    except SpecError as exc:
        return None, exc.problems
    return spec, spec.validate(gpu_count=gpu_count)


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
