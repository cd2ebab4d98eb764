"""The run page's simulated timeline: a measured pipeline run's own mean pass and transfer times run through its
schedule alone (runner/planner/simulate.py), drawn with the same chart as the measured timeline, and the two
bubbles side by side -- what the schedule alone gives against what the machine took.

Owns the choice of which runs get one (pipeline stages > 1, training, finished, every virtual stage seen in
the spans), the pairing of the measured last step with the simulated one on a shared time axis, and the
caption's words. pages/history.py only lays it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import altair as alt
import pandas as pd

from runner.job.metrics import step_number
from runner.planner.simulate import Simulation, simulate_from_spans, spans_bubble
from runner.spec.run_spec import RunSpec
from ui import charts
from ui.format import human_duration
from ui.run_detail import built_model


@dataclass
class TimelinePair:
    """The measured last step, the same step simulated, and the caption comparing their bubbles."""

    step: int
    measured: pd.DataFrame
    simulated: pd.DataFrame
    sim: Simulation
    spans_bubble: float  # the measured timeline's idle share, counted the simulator's way
    caption: str


def pipeline_shape(spec: dict[str, Any]) -> tuple[str, int, int, int] | None:
    """(schedule, p, m, v) of a run whose spans a schedule made: a pipeline that trains; None otherwise."""
    try:
        info = RunSpec.from_dict(spec).strategy_info
    except (TypeError, ValueError):  # a spec this version cannot read has no schedule to simulate
        return None
    p = int(spec.get("pp") or 1)
    if info is None or not info.uses("schedule") or p < 2 or spec.get("workload", "train") != "train":
        return None
    return spec.get("schedule") or "1f1b", p, int(spec.get("microbatches") or 1), int(spec.get("virtual_stages") or 1)


def _ms_list(values: list[float]) -> str:
    return " / ".join(f"{x * 1e3:.1f}" for x in values)


def timeline_pair(spans: pd.DataFrame, spec: dict[str, Any], result: dict[str, Any] | None) -> TimelinePair | None:
    """The measured and simulated timelines of a finished pipeline run, or None where there is nothing to
    simulate (not a training pipeline, or spans missing for a virtual stage)."""
    shape = pipeline_shape(spec)
    if shape is None or not len(spans):
        return None
    schedule, p, m, v = shape
    seen = set(spans.loc[spans["phase"] == "forward", "stage"].astype(int))
    if seen != set(range(p * v)):
        return None
    step = int(spans["step"].max())
    sim = simulate_from_spans(spans, schedule, p, m, v)
    measured_bubble = spans_bubble(spans)
    inputs = sim.inputs
    times = (
        f"forward {_ms_list(inputs['forward'])} ms, backward {_ms_list(inputs['backward'])} ms"
        + (f", weight {_ms_list(inputs['weight'])} ms" if schedule == "zb-h1" else "")
        + f" per stage; transfer {inputs['transfer'] * 1e3:.2f} ms (median of {inputs['transfer_samples']} receives)"
    )
    job = (result or {}).get("bubble_fraction")
    built = built_model(spec)  # only a tied head's two copies are summed
    tied = ", the tied-embedding sum" if built is not None and built.tie_head else ""
    job_text = (
        f"; the job's own figure, whose step also holds the optimizer{tied} and the end-of-step barrier, is "
        f"{job:.1%}"
        if job is not None
        else ""
    )
    caption = (
        f"Simulated from this run's own mean pass times ({times}): the {schedule} schedule alone takes "
        f"{human_duration(sim.step_time)} and idles {sim.bubble_mean:.1%} of it "
        f"(per stage {', '.join(f'{b:.1%}' for b in sim.bubble)}); the machine's timeline idles "
        f"{measured_bubble:.1%} between its passes{job_text}."
    )
    return TimelinePair(step, spans[spans["step"] == step], sim.spans, sim, measured_bubble, caption)


def timeline_pair_charts(pair: TimelinePair) -> tuple[alt.LayerChart, alt.LayerChart]:
    """Measured and simulated, drawn by the same chart function on one time axis (both span 0 to the later end).
    Two charts, not a vconcat: a concatenation keeps its own width, so it ran past the page and hid its legend."""
    ends = [float(s["end"].max()) * 1e3 for s in (pair.measured, pair.simulated) if len(s)]
    axis = (0.0, max(ends, default=1.0))
    measured = charts.timeline_chart(
        pair.measured,
        title=f"Pipeline timeline, step {step_number(pair.step)}, measured (stage x microbatch; grey: waiting for a neighbour)",
        window_ms=axis,
    )
    simulated = charts.timeline_chart(
        pair.simulated, title="Simulated: the schedule alone, on this run's mean pass and transfer times", window_ms=axis
    )
    return measured, simulated


def simulated_chart(sim: Simulation, title: str | None = None) -> alt.LayerChart:
    """A simulated step alone (the planner's predicted timeline), drawn as a measured one is."""
    name = sim.schedule + (f", v = {sim.v}" if sim.v > 1 else "")
    default = f"Simulated {name}: p = {sim.p}, m = {sim.m}, step {human_duration(sim.step_time)}, bubble {sim.bubble_mean:.1%}"
    return charts.timeline_chart(sim.spans, title=title or default)


# A stage's bars stay readable up to about this many microbatches across the chart's width.
WINDOW_MICROBATCHES = 16


def timeline_window(sim: Simulation) -> float | None:
    """How many ms of a simulated step to draw at once, or None to draw it whole: a window of about
    WINDOW_MICROBATCHES microbatches' passes on a stage (the step holds m + p - 1 such slots under 1F1B's timing),
    when the step has more (pp 16 with 192 microbatches would be 6,000 bars too thin to see)."""
    slots = sim.m * sim.v + sim.p - 1
    if sim.m * sim.v <= WINDOW_MICROBATCHES or sim.step_time <= 0:
        return None
    return sim.step_time * 1e3 * WINDOW_MICROBATCHES / slots


def windowed_chart(sim: Simulation, start_ms: float) -> alt.LayerChart:
    """The simulated step from `start_ms` over one window (timeline_window), titled with where it is."""
    width = timeline_window(sim)
    if width is None:
        return simulated_chart(sim)
    total = sim.step_time * 1e3
    lo = max(0.0, min(start_ms, total - width))
    name = sim.schedule + (f", v = {sim.v}" if sim.v > 1 else "")
    title = (f"Simulated {name}: p = {sim.p}, m = {sim.m}, step {human_duration(sim.step_time)}, bubble "
             f"{sim.bubble_mean:.1%} -- {lo:.4g} to {lo + width:.4g} ms shown")  # fmt: skip
    return charts.timeline_chart(sim.spans, title=title, window_ms=(lo, lo + width))


def beside_the_table(sim: Simulation, step: Any) -> str:
    """Why the simulated step is shorter than the plan's: the timeline draws the passes, messages and bubble of equal
    stages; the plan's step (a StepTime) also counts what runs beside no pass, named with its share."""
    parts = [("tensor-parallel collectives", step.tp_comm_s), ("the exposed data-parallel reduction", step.dp_comm_s),
             ("the optimizer step", step.optimizer_s)]  # fmt: skip
    named = [f"{name} {human_duration(s)}" for name, s in parts if s > 0]
    text = f"The timeline's step is {human_duration(sim.step_time)}: passes, messages and the bubble."
    if named:
        text += f" The table's {human_duration(step.total)} also counts " + ", ".join(named) + "."
    return text
