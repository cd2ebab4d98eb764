"""The pipeline schedule simulator (issue 15, item 2): what a schedule alone gives, from pass and transfer times.

It owns one thing: executing, with durations instead of tensors, exactly the per-rank operation lists the
real engine runs (`schedule_ops(schedule, m, p, rank, v)`, H-pipe's generator, which
runner/gpt/pipeline.py walks op by op). Nothing here is a bubble formula; the formulas
(runner/gpt/schedules.py bubble_fraction_theory) are what the tests hold this against.

The model, as the engine behaves:
- rank r holds chunks c = 0..v-1, chunk c being virtual stage s = c*p + r; it runs its list in order, one
  operation at a time (one compute stream; a CPU rank has one core);
- F(s, i) needs F(s-1, i) (its activations) -- plus the transfer time when stage s-1 sits on another rank;
- B(s, i) needs B(s+1, i) (the gradient of its output; plus the transfer time), the last stage's B needs its
  own F(s, i) only;
- W(s, i) (ZB-H1's weight-gradient pass) needs its own B(s, i); nobody waits for a W.
An operation starts when its rank is free and its inputs have arrived, so the simulated timeline is the
earliest one the schedule allows. Idle gaps before an operation are drawn as `recv_wait` spans, as the
engine records its blocked receives, and the bubble of a rank is its idle share of the step: the step
lasts until the last rank's last operation ends (the job's end-of-step barrier makes every rank wait for
it), as runner/job/rank.py measures `bubble_fraction` = idle seconds / step seconds.

One coupling of the engine is not modelled: it exchanges each message in a batch at a lockstep tick shared
by sender and receiver (runner/job/schedule_ops.py lockstep_plan), so a sender whose link does not buffer would
wait there for its receiver; here a message leaves when its pass ends and the sender goes on. Where the
real sends do wait, the measured bubble comes out above the simulated one (bench/bench_simulator.py measures
how far on CPU).

Everything not in the schedule is left out on purpose: the optimizer step, the tied-embedding gradient sum
between the first and last stage, Python between operations and the cost of posting a send. That is the
point of `simulate_from_spans`: a measured run's own mean pass durations, run through the schedule alone,
set against what the machine took.

Torch-free (the Streamlit app and the planner import it): the op lists come from runner/job/schedule_ops.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from runner.job.schedule_ops import schedule_ops, splits_backward  # the engine's own lists, torch-free

SPAN_COLUMNS = ["step", "rank", "stage", "microbatch", "phase", "start", "end"]
PHASES = {"F": "forward", "B": "backward", "W": "weight"}  # the engine's span phase per op kind
KINDS = {phase: kind for kind, phase in PHASES.items()}


@dataclass
class Simulation:
    """A simulated step: its spans (storage.series.timeline_spans columns), step time and idle share per rank."""

    schedule: str
    p: int
    m: int
    v: int
    step_time: float
    busy: list[float]  # per pipeline rank: seconds computing
    spans: pd.DataFrame
    inputs: dict[str, Any] = field(default_factory=dict)  # the durations it ran with, for the page to state

    @property
    def bubble(self) -> list[float]:
        """Per pipeline rank: the share of the step it stood idle."""
        if self.step_time <= 0:
            return [0.0] * self.p
        return [1.0 - b / self.step_time for b in self.busy]

    @property
    def bubble_mean(self) -> float:
        """Mean over ranks, as the job's run-level `bubble_fraction` averages its stages."""
        return statistics.fmean(self.bubble)


def _per_stage(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * n
    out = [float(x) for x in value]
    if len(out) != n:
        raise ValueError(f"{name}: need one time per virtual stage ({n}), got {len(out)}")
    return out


def simulate(
    schedule: str,
    p: int,
    m: int,
    forward: float | Sequence[float],
    backward: float | Sequence[float],
    weight: float | Sequence[float] = 0.0,
    transfer: float = 0.0,
    v: int = 1,
    ranks: Sequence[int] | None = None,
    step: int = 0,
) -> Simulation:
    """Run `schedule` for p ranks, m microbatches and v chunks per rank with these seconds per pass.

    forward, backward, weight: one number for every virtual stage, or one per virtual stage s = c*p + r
    (p*v of them). `backward` is the whole backward, or for zb-h1 the input-gradient pass B and `weight` the
    weight-gradient pass W (ignored elsewhere). `transfer`: seconds a message takes from the end of the
    sender's pass until the receiver may start, between different ranks. `ranks`: the global rank to write
    for each pipeline rank (default r itself), so simulated lanes match a measured run's.
    """
    n = p * v
    f, b = _per_stage(forward, n, "forward"), _per_stage(backward, n, "backward")
    w = _per_stage(weight, n, "weight") if splits_backward(schedule) else [0.0] * n
    dur = {"F": f, "B": b, "W": w}
    lists = [schedule_ops(schedule, m, p, r, v) for r in range(p)]
    names = list(ranks) if ranks is not None else list(range(p))
    last = n - 1

    def needs(kind: str, s: int, i: int) -> list[tuple[str, int, int]]:
        if kind == "F":
            return [("F", s - 1, i)] if s > 0 else []
        if kind == "B":
            return [("F", s, i)] + ([("B", s + 1, i)] if s < last else [])
        return [("B", s, i)]

    done: dict[tuple[str, int, int], float] = {}
    free, busy, pos = [0.0] * p, [0.0] * p, [0] * p
    rows: list[dict[str, Any]] = []
    remaining = sum(len(ops) for ops in lists)
    while remaining:
        progressed = False
        for r in range(p):
            while pos[r] < len(lists[r]):
                op = lists[r][pos[r]]
                s, i = op.chunk * p + r, op.microbatch
                deps = needs(op.kind, s, i)
                if any(d not in done for d in deps):
                    break  # its input is not computed yet: another rank must move first
                # A message from another rank arrives `transfer` after its pass ends; one from this rank's
                # own earlier pass (the last stage's F before its B, a W after its B) is there already.
                ready = max([free[r]] + [done[d] + (transfer if d[1] % p != r else 0.0) for d in deps])
                if ready > free[r]:
                    rows.append({"step": step, "rank": names[r], "stage": s, "microbatch": i,
                                 "phase": "recv_wait", "start": free[r], "end": ready})  # fmt: skip
                end = ready + dur[op.kind][s]
                rows.append({"step": step, "rank": names[r], "stage": s, "microbatch": i,
                             "phase": PHASES[op.kind], "start": ready, "end": end})  # fmt: skip
                done[(op.kind, s, i)] = end
                free[r], busy[r] = end, busy[r] + dur[op.kind][s]
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for the engine's lists; a wrong list must not loop forever
            stuck = {r: lists[r][pos[r]] for r in range(p) if pos[r] < len(lists[r])}
            raise ValueError(f"{schedule}: every rank waits on another (deadlock) at {stuck}")
    spans = pd.DataFrame(rows, columns=SPAN_COLUMNS)
    return Simulation(schedule, p, m, v, max(free), busy, spans,
                      {"forward": f, "backward": b, "weight": w, "transfer": transfer})  # fmt: skip


# ---- from a measured run's own spans -------------------------------------------------------------------
@dataclass
class MeasuredTimes:
    """Mean seconds per pass and virtual stage, and the transfer time, read from a measured run's spans."""

    forward: list[float]
    backward: list[float]
    weight: list[float]
    transfer: float
    transfer_samples: int
    ranks: list[int]  # the (lowest) global rank holding each pipeline rank's stages


def _mean_durations(compute: pd.DataFrame, phase: str, n: int) -> list[float]:
    rows = compute[compute["phase"] == phase]
    means = (rows["end"] - rows["start"]).groupby(rows["stage"]).mean()
    return [float(means.get(s, 0.0)) for s in range(n)]


def measured_times(spans: pd.DataFrame, p: int, v: int = 1) -> MeasuredTimes:
    """Mean forward / backward / weight seconds per virtual stage (over steps, microbatches and the ranks of a
    stage), and the transfer time: the median, over receives that were already blocked when the awaited
    pass ended on the sender, of the time from that pass's end to the receive's end (`recv_wait` spans
    name the receiving stage and microbatch; the pass right after one on its rank says which message)."""
    n = p * v
    compute = spans[spans["phase"].isin(list(PHASES.values()))]
    fwd, bwd, wgt = (_mean_durations(compute, ph, n) for ph in ("forward", "backward", "weight"))
    # Pass ends by (step, kind, stage, microbatch); a list, since in a 3d run every data- and tensor-parallel
    # replica of a stage runs the same pass. The spans do not say which replica sent to which, so the latest end
    # inside the receive's window counts: exact with one replica, at most the replicas' skew short otherwise.
    ends: dict[tuple, list[float]] = {}
    for row in compute.itertuples():
        ends.setdefault((row.step, KINDS[row.phase], row.stage, row.microbatch), []).append(row.end)
    samples: list[float] = []
    for (_step, _rank), lane in spans.sort_values("start").groupby(["step", "rank"]):
        rows = list(lane.itertuples())
        for k, row in enumerate(rows):
            if row.phase != "recv_wait":
                continue
            nxt = next((x for x in rows[k + 1 :] if x.phase in KINDS), None)
            if nxt is None or (nxt.stage, nxt.microbatch) != (row.stage, row.microbatch):
                continue
            kind = KINDS[nxt.phase]
            sender = (row.step, "F", row.stage - 1, row.microbatch) if kind == "F" else None
            if kind == "B" and row.stage < n - 1:
                sender = (row.step, "B", row.stage + 1, row.microbatch)
            inside = [e for e in ends.get(sender, []) if row.start <= e <= row.end] if sender else []
            if inside:
                samples.append(row.end - max(inside))
    ranks = []
    for r in range(p):
        held = spans.loc[spans["stage"] % p == r, "rank"]
        ranks.append(int(held.min()) if len(held) else r)
    transfer = statistics.median(samples) if samples else 0.0
    return MeasuredTimes(fwd, bwd, wgt, transfer, len(samples), ranks)


def simulate_from_spans(spans: pd.DataFrame, schedule: str, p: int, m: int, v: int = 1) -> Simulation:
    """The schedule alone, run with a measured run's own mean pass and transfer times (`measured_times`)."""
    t = measured_times(spans, p, v)
    sim = simulate(schedule, p, m, t.forward, t.backward, t.weight, t.transfer, v, ranks=t.ranks,
                   step=int(spans["step"].max()) if len(spans) else 0)  # fmt: skip
    sim.inputs["transfer_samples"] = t.transfer_samples
    return sim


def spans_bubble(spans: pd.DataFrame) -> float:
    """The bubble a measured timeline shows, counted the simulator's way: per step and rank, 1 - compute
    seconds / (the step's last span end); mean over ranks and steps. It leaves out the optimizer and the
    end-of-step barrier, which the job's own `bubble_fraction` includes."""
    compute = spans[spans["phase"].isin(list(PHASES.values()))]
    out = []
    for _step, rows in compute.groupby("step"):
        length = float(spans.loc[spans["step"] == _step, "end"].max())
        for _rank, lane in rows.groupby("rank"):
            out.append(1.0 - float((lane["end"] - lane["start"]).sum()) / length)
    return statistics.fmean(out) if out else 0.0
