"""Repeated runs on Compare and in `python -m runner compare`: runs grouped by spec, each figure's median with its
interval and spread, and sentences saying which differences the runs resolve and which they do not.

Runs are grouped by RunSpec.comparison_key: identical specs apart from tags and time limit, which change nothing
the ranks compute. A group's figure is the median of its runs' figures (each run's own figure: ui.compare's
run_figures) with the distribution-free interval of runner/analysis/stats.py; a difference between two groups is the
Hodges-Lehmann ratio of their runs' tokens/s with its Mann-Whitney interval, and is called resolved only when
that interval reaches 95% and excludes 1 (runner.analysis.stats.direction). Step time is not judged separately: at a fixed
batch it is the reciprocal of tokens/s, so its verdict would be the same. Pure functions of get_run() dicts.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import pandas as pd

from runner.analysis.same_work import work_differences
from runner.analysis.stats import (
    LEVEL,
    Interval,
    direction,
    median_interval,
    ratio_interval,
    runs_needed,
    runs_needed_each,
)
from runner.spec.run_spec import RunSpec
from ui.alike import difference_text
from ui.compare import SCALE, run_figures
from ui.cpu import shared_machine

# (figure in run_figures, what people call it, printf format): the figures that vary from run to run.
FIGURES = (
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("step_time_s_p50", "step time p50 (ms)", "{:.2f}"),
    ("comm_share", "communication share", "{:.1%}"),
    ("idle_share", "idle share", "{:.1%}"),
    ("bubble_measured", "pipeline bubble", "{:.1%}"),
    ("peak_rss_mib_max", "process peak RSS (MiB, max rank)", "{:,.1f}"),
)
JUDGED = "tokens_per_s"  # the figure whose differences are put into words (step time is its reciprocal)


@dataclass
class Group:
    """The runs of one spec."""

    label: str
    spec: RunSpec
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [r["id"] for r in self.runs]

    def values(self, figure: str) -> list[float]:
        """The figure of every run that has it (a run without it, e.g. no pipeline's bubble, is left out)."""
        out = []
        for run in self.runs:
            v = run_figures(run).get(figure)
            if v is not None and v == v:
                out.append(float(v) * SCALE.get(figure, 1.0))
        return out

    @property
    def shared(self) -> int:
        """How many of its runs shared the machine (ui.cpu.shared_machine)."""
        return sum(1 for r in self.runs if shared_machine(r.get("result") or {}))


def group_runs(runs: list[dict[str, Any]]) -> list[Group]:
    """Finished runs with a result, grouped by spec in order of first appearance, each labelled by its strategy,
    degrees and the fields where its value is not the one most groups share (the first group's on a tie), unset
    ones left out: labelling every group with every field any two differ in ran to 25 fields, 'block_size None'
    among them. Two groups still read apart, since of any field they differ in one holds a value not the most
    shared."""
    groups: dict[str, Group] = {}
    for run in runs:
        if not run.get("result"):
            continue
        spec = RunSpec.from_dict(run["spec"])
        groups.setdefault(spec.comparison_key(), Group("", spec)).runs.append(run)
    specs = [json.loads(key) for key in groups]
    differ = sorted(k for k in specs[0] if len({json.dumps(s.get(k)) for s in specs}) > 1) if specs else []
    shared = {k: Counter(json.dumps(s.get(k)) for s in specs).most_common(1)[0][0] for k in differ}
    for group, spec in zip(groups.values(), specs, strict=True):
        run = group.runs[0]
        words = [spec["strategy"], f"tp{run['tp']} pp{run['pp']} dp{run['dp']}"]
        words += [f"{k} {spec[k]}" for k in differ if k not in ("strategy", "tp", "pp", "dp")
                  and spec.get(k) is not None and json.dumps(spec.get(k)) != shared[k]]  # fmt: skip
        group.label = " · ".join(words)
    return list(groups.values())


def median_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """One row per figure and group, numbers as measured: median, interval (low, high) with its true
    confidence, min and max, and how many runs had the figure."""
    rows = []
    for figure, name, _ in FIGURES:
        for g in groups:
            values = g.values(figure)
            if values:
                ci = median_interval(values)
                rows.append({"figure": figure, "name": name, "spec": g.label, "runs": len(values),
                             "median": ci.estimate, "low": ci.low, "high": ci.high, "confidence": ci.confidence,
                             "min": min(values), "max": max(values)})  # fmt: skip
    return rows


def medians_table(groups: list[Group]) -> pd.DataFrame:
    """median_rows as people read them: each figure in its unit, the interval with its confidence (and how many
    runs would reach 95% where it falls short), the spread as min..max."""
    formats = {figure: fmt for figure, _, fmt in FIGURES}
    rows = []
    for r in median_rows(groups):
        fmt = formats[r["figure"]].format
        short = f": {runs_needed()} runs reach {LEVEL:.0%}" if r["confidence"] < LEVEL - 1e-12 else ""
        # one run has no interval (1,202..1,202 at 0% read as a measured certainty)
        interval = f"{fmt(r['low'])}..{fmt(r['high'])}" if r["runs"] > 1 else "none: one run"
        rows.append({"figure": r["name"], "spec": r["spec"], "runs": r["runs"], "median": fmt(r["median"]),
                     "interval": interval, "confidence": f"{r['confidence']:.0%}{short}",
                     "spread (min..max)": f"{fmt(r['min'])}..{fmt(r['max'])}"})  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Verdict:
    """What the runs say about one pair of groups, `faster` / `slower` being the faster and slower by median."""

    faster: str
    slower: str
    ratio: Interval | None  # faster's tokens/s over slower's; None for groups that did different work
    outcome: str  # runner.analysis.stats.direction: 'higher' (resolved), 'unresolved' or 'too few'; or 'unlike'
    sentence: str

    def to_dict(self) -> dict[str, Any]:
        r = self.ratio
        figures = ({"ratio": r.estimate, "low": r.low, "high": r.high, "confidence": r.confidence, "runs": list(r.n)}
                   if r else {"ratio": None, "low": None, "high": None, "confidence": None, "runs": None})  # fmt: skip
        return {"faster": self.faster, "slower": self.slower, "outcome": self.outcome, **figures,
                "sentence": self.sentence}  # fmt: skip


def verdicts(groups: list[Group]) -> list[Verdict]:
    """Every pair of groups with tokens/s, the faster by median named first; resolved pairs first. Groups that did
    different work (another model, workload, batch, sequence or number of new tokens: runner.analysis.same_work)
    are not ranked: their pair says so, last."""
    out = []
    for a, b in combinations([g for g in groups if g.values(JUDGED)], 2):
        if differ := work_differences(a.spec, b.spec):
            what = ", ".join(difference_text(a.spec, b.spec, name) for name in differ)
            out.append(Verdict(a.label, b.label, None, "unlike",
                               f"{a.label} against {b.label}: not ranked, they did different work ({what}); tokens/s "
                               "ranks ways of doing the same work."))  # fmt: skip
            continue
        ratio = ratio_interval(b.values(JUDGED), a.values(JUDGED))  # a over b
        if ratio.estimate < 1:
            a, b = b, a
            ratio = ratio_interval(b.values(JUDGED), a.values(JUDGED))
        outcome = direction(ratio)
        out.append(Verdict(a.label, b.label, ratio, outcome, _sentence(a, b, ratio, outcome)))
    return sorted(out, key=lambda v: (v.outcome == "unlike", v.outcome != "higher", -(v.ratio.estimate if v.ratio else 0)))




def _sentence(fast: Group, slow: Group, r: Interval, outcome: str) -> str:
    counts = f"{r.n[1]} and {r.n[0]} runs"
    # the estimate is the median of every run-to-run ratio (Hodges-Lehmann), not the ratio of the two medians shown
    pairs = "one run of each" if r.n == (1, 1) else f"median of the {r.n[0] * r.n[1]} run-to-run ratios"
    span = f"{r.low:.2f}..{r.high:.2f}"
    if outcome == "higher":
        return (f"{fast.label} is faster than {slow.label}: {r.estimate:.2f}x the tokens/s "
                f"({pairs}; {r.confidence:.0%} interval {span}, {counts}; resolved).")  # fmt: skip
    if outcome == "unresolved":
        return (f"{fast.label} against {slow.label}: no difference these runs can resolve (ratio of tokens/s "
                f"{r.estimate:.2f}, {pairs}; {r.confidence:.0%} interval {span} includes 1; {counts}).")  # fmt: skip
    return (f"{fast.label} against {slow.label}: too few runs to resolve a difference (ratio of tokens/s "
            f"{r.estimate:.2f}, {pairs}, from {counts}; the best interval they allow, {span}, has only {r.confidence:.0%} "
            f"confidence; {runs_needed_each()} runs of each reach {LEVEL:.0%}).")  # fmt: skip


def noise_note(groups: list[Group]) -> str | None:
    """For runs that are all of one spec (nothing to compare them against): their spread of tokens/s, which is
    the machine's noise alone; None otherwise."""
    if len(groups) != 1 or len(values := groups[0].values(JUDGED)) < 2:
        return None
    ci = median_interval(values)
    half = (max(values) - min(values)) / 2 / ci.estimate
    return (f"All {len(values)} runs are of one spec, so their spread is the machine's noise alone: tokens/s from "
            f"{min(values):,.0f} to {max(values):,.0f}, ±{half:.0%} around the median {ci.estimate:,.0f}. A "
            "difference between specs must stand out of noise like this; Repeat with another spec to measure one.")  # fmt: skip


def shared_note(groups: list[Group]) -> str | None:
    """Which groups hold runs that shared the machine, or None when none did."""
    parts = [f"{g.shared} of {len(g.runs)} runs of {g.label} ("
             + ", ".join(f"#{r['id']}" for r in g.runs if shared_machine(r.get("result") or {})) + ")"
             for g in groups if g.shared]  # fmt: skip
    if not parts:
        return None
    return ("Shared the machine (other processes took a tenth or more of the job's cores): " + "; ".join(parts)
            + ". Their figures count in the medians; the intervals widen by what they add.")  # fmt: skip


def comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything `python -m runner compare --json` prints: groups, medians with intervals, verdicts."""
    groups = group_runs(runs)
    return {
        "groups": [{"spec": g.label, "runs": g.ids, "shared_machine": g.shared} for g in groups],
        "medians": median_rows(groups),
        "verdicts": [v.to_dict() for v in verdicts(groups)],
        "noise": noise_note(groups),
        "shared": shared_note(groups),
    }


def comparison_text(runs: list[dict[str, Any]]) -> str:
    """What `python -m runner compare` prints: the groups, each figure's medians with intervals, the verdicts."""
    groups = group_runs(runs)
    unfinished = [f"{r['id']} ({r['status']})" for r in runs if not r.get("result")]
    lines = ["Runs grouped by spec (tags and time limit aside):"]
    for g in groups:
        shared = f"; {g.shared} shared the machine" if g.shared else ""
        lines.append(f"  {g.label}: run{'s' if len(g.runs) > 1 else ''} {', '.join(map(str, g.ids))}{shared}")
    if unfinished:
        lines.append(f"  without a result, left out: {', '.join(unfinished)}")
    table = medians_table(groups)
    for name, rows in table.groupby("figure", sort=False):
        lines += ["", f"{name}: median, interval (confidence), spread"]
        width = max(len(s) for s in rows["spec"])
        for r in rows.to_dict("records"):
            lines.append(f"  {r['spec']:<{width}}  {r['runs']} run{'s' if r['runs'] > 1 else ' '}  {r['median']:>10}  "
                         f"{r['interval']} ({r['confidence']})  spread {r['spread (min..max)']}")  # fmt: skip
    found = verdicts(groups)
    if found:
        lines += ["", "What the runs resolve (tokens/s):", *(f"  - {v.sentence}" for v in found)]
    for note in (noise_note(groups), shared_note(groups)):
        if note:
            lines += ["", note]
    return "\n".join(lines)
