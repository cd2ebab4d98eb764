"""What the Ultra-Scale Playbook's measurements themselves allow, set beside the planner's figures by
bench/bench_playbook.py: which failures no memory figure can explain, how far ZeRO-0 and ZeRO-1 twins agree, where
the memory and throughput misses lie, the best fit agreement any usable memory would give, and a host-cost what-if.
Each is decided from the measured rows (and, where named, the planner's own predictions); none changes a prediction.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from runner.job.metrics import percentile, spearman
from runner.planner.devices import GiB

if TYPE_CHECKING:
    from bench.bench_playbook import Planned, Row


def with_host_cost(results: list[Planned], seconds: float) -> list[Planned]:
    """The same predictions with `seconds` of host time added to every layer and micro-batch pass (a what-if)."""
    return [replace(p, step_s=p.step_s + p.layer_passes * seconds) if p.step_s else p for p in results]


def memory_cannot_explain(rows: list[Row]) -> list[bool]:
    """For each row, whether its outcome is one no memory figure can explain, whatever the model: it produced no
    result although every micro-batch size of its layout (model, nodes, tp, pp, dp, ZeRO) failed, or although a run
    of the same tp, pp and dp that needs no less memory by any count (a micro-batch at least as large, a ZeRO stage
    no higher) produced one. Decided from the measured rows alone, never from a prediction."""

    ran: dict = defaultdict(list)  # (model, nodes, tp, pp, dp) -> the runs with a result
    for r in rows:
        if r.tok_s_gpu is not None:
            ran[r.layout[:5]].append(r)
    layouts_ran = {q.layout for runs in ran.values() for q in runs}

    def contradicted(r: Row) -> bool:
        return any(q.mbs >= r.mbs and q.zero <= r.zero for q in ran[r.layout[:5]])

    return [r.tok_s_gpu is None and (r.layout not in layouts_ran or contradicted(r)) for r in rows]


@dataclass(frozen=True)
class Twins:
    """ZeRO-0 and ZeRO-1 runs of one configuration (model, nodes, tp, pp, dp, micro-batch, accumulation), both
    with a result: what the planner (ZeRO-1 adds one all-gather of the parameters) and the measurements say of
    them."""

    pairs: int
    predicted_range: tuple[float, float]  # predicted tokens/s ZeRO-1 / ZeRO-0, lowest and highest
    measured_quartiles: tuple[float, float, float]  # measured ZeRO-1 / ZeRO-0: 10th percentile, median, 90th
    off_25: float  # share of pairs measured more than 25% apart
    cells: dict  # (model, nodes) -> (pairs, rho of measured ZeRO-0 against ZeRO-1, rho of predicted against it)


def zero_twins(results: list[Planned], min_pairs: int = 5) -> Twins | None:
    """The twins' agreement with each other, the measurements' own ceiling for a rank correlation: within a cell,
    Spearman's rho of the ZeRO-0 runs' tokens/s against their ZeRO-1 twins' is how well a model that knew the one
    exactly would rank the other; the planner's rho on the same ZeRO-1 runs stands beside it."""
    by: dict = defaultdict(dict)
    for p in results:
        if p.row.tok_s_gpu and p.tok_s_gpu and p.row.zero in (0, 1):
            r = p.row
            by[(r.model, r.nodes, r.tp, r.pp, r.dp, r.mbs, r.grad_acc)][r.zero] = p
    pairs = [(v[0], v[1]) for v in by.values() if len(v) == 2]
    if not pairs:
        return None
    measured = [b.row.tok_s_gpu / a.row.tok_s_gpu for a, b in pairs]
    predicted = [b.tok_s_gpu / a.tok_s_gpu for a, b in pairs]
    cells: dict = defaultdict(list)
    for a, b in pairs:
        cells[(a.row.model, a.row.nodes)].append((a, b))
    rho = {}
    for key, twins in sorted(cells.items()):
        if len(twins) >= min_pairs:
            ones = [b.row.tok_s_gpu for _, b in twins]
            rho[key] = (len(twins), spearman([a.row.tok_s_gpu for a, _ in twins], ones),
                        spearman([b.tok_s_gpu for _, b in twins], ones))  # fmt: skip
    off = sum(1 for m in measured if not 0.8 <= m <= 1.25) / len(measured)
    return Twins(len(pairs), (min(predicted), max(predicted)),
                 (percentile(measured, 0.1), statistics.median(measured), percentile(measured, 0.9)), off, rho)  # fmt: skip


def growth_per_sequence(results: list[Planned]) -> dict[int, tuple[int, float]]:
    """How the measured peak grows with the micro-batch against how the predicted one grows, by tp: for each layout
    (model, nodes, tp, pp, dp, ZeRO) and each two neighbouring micro-batch sizes of it that both produced a figure,
    (measured difference) / (predicted difference); per tp, the pairs and their median. What the states and any
    fixed cost add cancels in the difference, so this separates a miss in the bytes a sequence adds (activations,
    logits) from a fixed one."""
    by: dict = defaultdict(list)
    for p in results:
        if p.row.mem_gb and p.memory is not None:
            by[p.row.layout].append(p)
    ratios: dict = defaultdict(list)
    for runs in by.values():
        runs.sort(key=lambda p: p.row.mbs)
        for a, b in itertools.pairwise(runs):
            if b.row.mbs > a.row.mbs and b.memory > a.memory:
                ratios[a.row.tp].append((b.row.mem_gb - a.row.mem_gb) * GiB / (b.memory - a.memory))
    return {tp: (len(v), statistics.median(v)) for tp, v in sorted(ratios.items())}


def layout_failures(results: list[Planned]) -> tuple[int, float]:
    """Of the configurations predicted to run (`Planned.runs`) that produced no result: how many belong to a layout
    (model, nodes, tp, pp, dp, ZeRO) none of whose micro-batch sizes produced one, and their median predicted peak in
    GiB."""
    ran = {p.row.layout for p in results if p.row.tok_s_gpu}
    lost = [p for p in results if p.runs and p.row.tok_s_gpu is None and p.row.layout not in ran]
    return len(lost), statistics.median(p.memory for p in lost) / GiB if lost else 0.0


TP_BANDS = ("tp 1", "tp 2-8", "tp 16-32")  # tensor parallelism none, within a node, across nodes
MBS_BANDS = ("1-2", "4-8", "16+")  # sequences a micro-batch


def ratio_by_kind(results: list[Planned]) -> dict[tuple[bool, str, str], tuple[int, float]]:
    """Where the throughput miss lies: for each (pipeline or not, TP_BANDS band, MBS_BANDS band) that ran, the runs and
    their median measured / predicted tokens/s. The ranks within a cell suffer where this ratio moves between kinds."""
    groups: dict = defaultdict(list)
    for p in results:
        r = p.row
        if r.tok_s_gpu and p.tok_s_gpu:
            tp = TP_BANDS[0] if r.tp == 1 else TP_BANDS[1] if r.tp <= 8 else TP_BANDS[2]
            mbs = MBS_BANDS[0] if r.mbs <= 2 else MBS_BANDS[1] if r.mbs <= 8 else MBS_BANDS[2]
            groups[(r.pp > 1, tp, mbs)].append(r.tok_s_gpu / p.tok_s_gpu)
    return {k: (len(v), statistics.median(v)) for k, v in sorted(groups.items())}


def tp8_pair(results: list[Planned]) -> tuple[Planned, Planned] | None:
    """1B on one node, tp 8 alone: the runs with the smallest and largest micro-batch that ran."""
    ran = sorted((p for p in results if (p.row.model, p.row.nodes, p.row.tp, p.row.pp) == ("1B", 1, 8, 1)
                  and p.row.tok_s_gpu and p.tok_s_gpu), key=lambda p: p.row.mbs)  # fmt: skip
    return (ran[0], ran[-1]) if len(ran) >= 2 else None


def best_usable(results: list[Planned], low_gib: float = 40.0, high_gib: float = 80.0) -> tuple[float, float]:
    """The highest fit agreement the planner's own busiest-rank peaks reach with the usable memory set anywhere from
    `low_gib` to `high_gib` in 0.5 GiB steps (layouts nanotron cannot train still predicted to fail), and the usable
    GiB that gives it (the lowest of any tie). A ceiling for every reserve (CUDA context, NCCL buffers, allocator
    fragmentation) the planner could charge, however chosen: never used to plan."""
    laid = [p for p in results if p.memory is not None]
    best, at = -1.0, low_gib
    for step in range(int((high_gib - low_gib) * 2) + 1):
        usable = (low_gib + step / 2) * GiB
        agree = sum(1 for p in laid if (p.trains and p.busiest <= usable) == (p.row.tok_s_gpu is not None)) / len(laid)
        if agree > best:
            best, at = agree, low_gib + step / 2
    return best, at


def per_micro_batch(results: list[Planned], max_tp: int = 8) -> tuple[tuple, list[tuple[int, float, float]]] | None:
    """A tensor-parallel pipeline's step time per micro-batch, measured and predicted, at each micro-batch size that
    ran: the layout (model, nodes, tp, pp, dp, ZeRO) with 1 < tp <= max_tp (by default within a node) and pp > 1 that
    ran at the most sizes (the first of a tie in sorted order), and (sequences a micro-batch, measured ms, predicted ms) for each. The step is the
    global batch's tokens over tokens/s per GPU times the GPUs; a micro-batch is the step over its accumulation."""
    by: dict = defaultdict(list)
    for p in results:
        r = p.row
        if 1 < r.tp <= max_tp and r.pp > 1 and r.tok_s_gpu and p.tok_s_gpu:
            by[r.layout].append(p)
    if not by:
        return None
    layout = max(sorted(by), key=lambda k: len({p.row.mbs for p in by[k]}))
    runs = []
    for p in sorted(by[layout], key=lambda p: p.row.mbs):
        measured_step = p.row.tokens / (p.row.tok_s_gpu * p.row.gpus)
        runs.append((p.row.mbs, measured_step / p.row.grad_acc * 1e3, p.step_s / p.row.grad_acc * 1e3))
    return layout, runs


STALL_FACTOR = 4  # a pipeline slot this many times its kind's fastest is a stall (`stalled`; swept in the report)


def slot_seconds(row: Row) -> float:
    """The measured time of one pipeline slot: the step (the global batch's tokens over tokens/s per GPU times the
    GPUs) over its grad_acc + pp - 1 slots (1F1B's micro-batches and its fill; grad_acc alone without a pipeline)."""
    return row.tokens / (row.tok_s_gpu * row.gpus) / (row.grad_acc + row.pp - 1)


def stalled(rows: list[Row], factor: float = STALL_FACTOR, min_accumulation: int = 1) -> list[bool]:
    """For each row, whether its run stalled: its slot (`slot_seconds`) took at least `factor` times the fastest slot
    of any run of the same model, tp, pp and micro-batch, on whatever nodes, data-parallel degree and ZeRO stage.
    Those runs do the same device work a slot; what differs between them is paid once a step (the gradients'
    reduction, ZeRO's gathers), which `min_accumulation` bounds: only runs whose step holds at least that many
    micro-batches are judged. Decided from the measured rows alone, never from a prediction; rows without a result
    are never stalled."""
    fastest: dict = {}
    for r in rows:
        if r.tok_s_gpu:
            key = (r.model, r.tp, r.pp, r.mbs)
            fastest[key] = min(fastest.get(key, float("inf")), slot_seconds(r))
    return [bool(r.tok_s_gpu) and r.grad_acc >= min_accumulation
            and slot_seconds(r) >= factor * fastest[(r.model, r.tp, r.pp, r.mbs)] for r in rows]  # fmt: skip


@dataclass(frozen=True)
class Stalls:
    """The runs `stalled` flags, what their ZeRO twins did, and the ranks without them."""

    count: int
    in_pipelines: int  # of them, runs with pp > 1
    twins: tuple[int, int]  # of them with a ZeRO-0/1 twin with a result: how many twins, how many twins not stalled
    slot_ms: tuple[float, float]  # the stalled slots' 10th and 90th percentile, ms
    rho_without: dict  # (factor, min_accumulation) -> (runs left out, median rho over the others)


def stalls(results: list[Planned], summarize) -> Stalls:
    """`stalled` at STALL_FACTOR over every planned row, and the median rho (`summarize`, the benchmark's own) over
    the runs it does not flag at factors 3, 4, 6 and 10, judging every run or only those of 8 micro-batches or more."""
    rows = [p.row for p in results]
    flags = stalled(rows)
    by_config = {(r.model, r.nodes, r.tp, r.pp, r.dp, r.mbs, r.grad_acc, r.zero): f
                 for r, f in zip(rows, flags, strict=True) if r.tok_s_gpu}  # fmt: skip
    flagged = [r for r, f in zip(rows, flags, strict=True) if f]
    twin_flags = [by_config[k] for r in flagged
                  if (k := (r.model, r.nodes, r.tp, r.pp, r.dp, r.mbs, r.grad_acc, 1 - r.zero)) in by_config]  # fmt: skip
    slots = [slot_seconds(r) * 1e3 for r in flagged]
    rho = {}
    for factor, least in itertools.product((3, 4, 6, 10), (1, 8)):
        keep = stalled(rows, factor, least)
        rho[(factor, least)] = (
            sum(keep),
            summarize([p for p, k in zip(results, keep, strict=True) if not k]).rho_median,
        )
    return Stalls(len(flagged), sum(1 for r in flagged if r.pp > 1), (len(twin_flags), twin_flags.count(False)),
                  (percentile(slots, 0.1), percentile(slots, 0.9)) if slots else (0.0, 0.0), rho)  # fmt: skip


def stall_lines(results: list[Planned], summarize) -> list[str]:
    """The report's paragraph on stalled runs (`stalls`): what the measurements say of them, and the ranks without
    them (`summarize`, the benchmark's own)."""
    s = stalls(results, summarize)
    if not s.count:
        return []
    sweep = ", ".join(
        f"{rho:.2f} at {f}x ({n} left out)" for (f, least), (n, rho) in s.rho_without.items() if least == 1
    )
    judged = ", ".join(f"{rho:.2f} at {f}x" for (f, least), (_, rho) in s.rho_without.items() if least == 8)
    return [
        "",
        f"Runs that stalled: {s.count} runs with a result spent {STALL_FACTOR} times or more as long on a pipeline slot "
        "(the step over its micro-batches and the pipeline's fill) as the fastest run of the same model, tp, pp and "
        "micro-batch on any number of nodes: the same device work a slot (`stalled`, decided from the measured rows "
        f"alone). {s.in_pipelines} of them are pipelines; their slots took {s.slot_ms[0]:,.0f} to {s.slot_ms[1]:,.0f} ms "
        f"(10th to 90th percentile) whatever the layout. {s.twins[0]} of them have a ZeRO twin with a result (the "
        f"same configuration at the other ZeRO stage, which adds one all-gather a step) and {s.twins[1]} of those twins "
        "did not stall: one configuration ran at both speeds, which no figure of the layout can rank. Over the runs that did not stall, "
        f"the median rho is {sweep}; judging only runs of 8 or more micro-batches a step, where what a step adds "
        f"once weighs least, {judged}. Beside the target, never in its place: the target is over every run.",
    ]


def stages_cross_nodes(row: Row) -> bool:
    """Whether some pipeline neighbours of the run sit on different nodes. nanotron orders ranks (pp, dp, tp), tp
    innermost (src/nanotron/parallel/context.py, `_init_parallel_groups`), so rank r's next stage is rank r + dp x tp,
    on node (r + dp x tp) // (GPUs a node)."""
    step, per_node = row.dp * row.tp, row.gpus // row.nodes
    return row.pp > 1 and any(r // per_node != (r + step) // per_node for r in range(row.gpus - step))


def crossing_cost(rows: list[Row]) -> dict[tuple[int, bool], list[tuple[float, float]]]:
    """What it costs a pipeline's slot that its stages sit on different nodes, measured: for each model, tp, pp and
    micro-batch run both with every stage boundary inside a node and with some across nodes (`stages_cross_nodes`),
    the fastest slot across nodes over the fastest within, and their difference in seconds (runs that stalled left
    out). Keyed (tp, one sequence a micro-batch or more); a list of (ratio, seconds)."""
    flags = stalled(rows)
    best: dict = defaultdict(dict)
    for r, f in zip(rows, flags, strict=True):
        if r.tok_s_gpu and r.pp > 1 and not f:
            side = best[(r.model, r.tp, r.pp, r.mbs)]
            crossing = stages_cross_nodes(r)
            side[crossing] = min(side.get(crossing, float("inf")), slot_seconds(r))
    ratios: dict = defaultdict(list)
    for (_, tp, _, mbs), side in sorted(best.items()):
        if len(side) == 2:
            ratios[(tp, mbs == 1)].append((side[True] / side[False], side[True] - side[False]))
    return dict(ratios)


def crossing_lines(ratios: dict[tuple[int, bool], list[tuple[float, float]]], width: int, link: float) -> list[str]:
    """The report's paragraph on pipelines whose stages sit on different nodes (`crossing_cost`). The bytes a stage
    sends a micro-batch of one sequence are at most 4,096 positions (every run's) x `width` (the widest model's, at tp
    1: sequence parallelism divides them by tp) x 2 (bfloat16): their time on `link` bytes/s between nodes stands
    beside the extra."""
    if not ratios:
        return []
    parts = [f"tp {tp} {'at one sequence' if one else 'at 2 or more'}: {statistics.median(r for r, _ in v):.2f} "
             f"({len(v)})" for (tp, one), v in sorted(ratios.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]  # fmt: skip
    extra = [s for (tp, one), v in ratios.items() if tp > 1 and one for _, s in v]
    sent = 4096 * width * 2
    tail = (f" At one sequence and tp > 1 a slot across nodes took a median {statistics.median(extra) * 1e3:.0f} ms "
            f"more, where the most a stage sends a micro-batch ({sent / 2**20:.0f} MiB: 4,096 positions x {width:,} x "
            f"2 bytes) takes {sent / link * 1e3:.2f} ms on the {link / 1e9:.0f} GB/s between nodes: what a slot pays for "
            "crossing nodes is not the bytes." if extra else "")  # fmt: skip
    return [
        "Where the stages sit: the fastest slot of a pipeline whose stages span nodes over the fastest of the same "
        "model, tp, pp and micro-batch with every stage boundary inside a node (`crossing_cost`, runs that stalled "
        "left out), median (layouts): " + "; ".join(parts) + "." + tail + "\n",
    ]
