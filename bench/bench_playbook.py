"""The planner against the Ultra-Scale Playbook's 1,631 measured training runs (1B and 8B Llama-style models on 1 to 64
nodes of 8 H100 80GB; ../shared/reference/playbook/README.md says what is known of their setup).

Every configuration is planned as it ran (its tp, pp, dp, ZeRO stage, micro-batch size and gradient accumulation)
and set against what was measured:
- memory: the predicted peak of world rank 0 (pipeline stage 0) against the figure's peak GPU memory, median and
  90th-percentile error over the runs with a result. The figure is rank 0's: the sweep wrote its results through
  nanotron's benchmark CSV (scripts/scaling_benchmarks.py sets benchmark_csv_path; src/nanotron/helpers.py at
  e24d2483, log_throughput, line 674: world rank 0 writes, after iteration 3), whose two memory columns are
  torch.cuda.max_memory_allocated() and max_memory_reserved() divided by 1024**3 (lines 609-610): GiB, labelled
  GB. Which of the two the Playbook's figure shows is not stated (reserved is the larger);
- fit: whether the planner says the configuration fits in the 80 GB (less its reserve), the busiest rank's peak
  since any rank's out of memory ends the run, and nanotron can train its layout at all (`nanotron_trains`, from
  nanotron's code), against whether the run produced a result;
- throughput: Spearman's rank correlation of predicted against measured tokens/s per GPU within each (model, nodes)
  cell, over its runs with a result.
Each pipeline is cut as nanotron cuts it (`nanotron_cut`: by cost, counting the head, so the first stages hold more
layers), through the planner's Layout.cut; tensor parallelism across nodes, which the planner refuses as a layout, is
still predicted here (the runs did it).
What the measurements themselves allow (bench/playbook_limits.py) is reported beside the targets, never in their
place: the fit agreement over the configurations whose outcome a memory figure can explain (`memory_cannot_explain`,
decided from the measured rows alone), the best agreement any usable memory would give the same peaks
(`best_usable`), how well runs that any compute model calls the same (ZeRO-0 and ZeRO-1 twins, `zero_twins`) rank
each other, and the ranks over the runs that did not stall (`stalled`: a pipeline slot several times as long as the
fastest of the same device work). Where the misses lie: the memory's in differences within a layout (`growth_per_sequence`: the measured
growth from one micro-batch size to the next against the predicted, which the states and fixed costs cancel out
of), the throughput's by kind of layout (`ratio_by_kind`). What the throughput ranks miss is shown, not fitted: the
same ranks with a fixed host-side cost added for every layer and micro-batch pass (HOST_COSTS_S, a what-if beside
the planner's figure, never part of it).

Assumptions, one for the whole set (the Playbook does not state them), and each alternative reported beside:
vocabulary 131,072 (alternative 32,768: nanotron's scaling script's two candidates); no activation recomputation
(alternative: every block); bf16 weights with float32 master weights
and AdamW state, gradients reduced in float32 (dtype bf16-master, reduce_fp32: the script's bf16 training with float32
gradient accumulation); its persistent float32 gradient buffer, which our engine does not keep, is added to each
predicted peak, 4 bytes a parameter the rank holds (FP32_GRAD_BUFFER); sequence parallelism wherever tp > 1 (the
script's REDUCE_SCATTER mode); 1F1B; fused causal attention.
The models: Llama as the README gives them (SwiGLU, RMSNorm, rotary positions, no biases, 1B's head tied, 8B's untied).
Run: .venv/bin/python bench/bench_playbook.py [--csv PATH] (a few minutes; no GPU).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.playbook_limits import (  # noqa: E402
    MBS_BANDS,
    TP_BANDS,
    best_usable,
    crossing_cost,
    crossing_lines,
    growth_per_sequence,
    layout_failures,
    memory_cannot_explain,
    per_micro_batch,
    ratio_by_kind,
    stall_lines,
    stalled,
    tp8_pair,
    with_host_cost,
    zero_twins,
)
from bench.results import REPO, write_section  # noqa: E402
from runner.analysis.stats import median_interval  # noqa: E402
from runner.gpt.config import GPTConfig  # noqa: E402
from runner.job.metrics import percentile, spearman  # noqa: E402
from runner.planner.devices import GiB, preset  # noqa: E402
from runner.planner.layouts import evaluate, on_devices  # noqa: E402
from runner.planner.memory import RankMemory, rank_memory  # noqa: E402
from runner.planner.models import Layout, Workload  # noqa: E402

CSV = REPO.parent / "shared" / "reference" / "playbook" / "measured-1b-8b.csv"
HEADING = "Playbook: 1,631 measured H100 runs against the planner"
# (layers, hidden, heads, SwiGLU hidden, head tied): the README's dimensions
MODELS = {"1B": (16, 2048, 32, 8192, True), "8B": (32, 4096, 32, 14336, False)}
FP32_GRAD_BUFFER = 4  # bytes a parameter the rank holds: nanotron's float32 gradient accumulation buffer
DEVICE = "h100-80gb"  # every run's GPU
GPUS_PER_NODE = 8
USABLE_BYTES = preset(DEVICE, GPUS_PER_NODE, GPUS_PER_NODE).usable_bytes  # the same whatever the node count
HOST_COSTS_S = (0.5e-3, 1e-3, 2e-3)  # what-if host seconds per layer and micro-batch pass (module docstring)


def model(name: str, vocab: int, seq: int) -> GPTConfig:
    layers, h, heads, ffn, tied = MODELS[name]
    return GPTConfig(n_layer=layers, n_head=heads, n_embd=h, vocab_size=vocab, block_size=seq, bias=False,
                     family="llama", n_kv_head=heads, ffn_hidden=ffn, tie_head=tied)  # fmt: skip


def nanotron_blocks(cfg: GPTConfig, pp: int) -> tuple[tuple[int, ...], int]:
    """The pipeline rank nanotron gives each of its blocks, and the rank it names the output rank.

    nanotron (src/nanotron/models/base.py build_model, at e24d2483 as at its head; costs from models/llama.py
    get_block_compute_costs) walks its pipeline blocks in order (embedding, the decoder layers, final norm, head, cast
    to float32, loss), each costing 4 h^2 + 3 h f for a decoder layer, V h for the head and nothing for the rest, and
    moves to the next rank after the block whose running cost passes that rank's share (r + 1) / pp of the total.
    After the last block it names the rank it has reached `output_pp_rank`: one past the loss's rank whenever the
    loss's running cost (the whole) passes that rank's share, that is whenever the loss is not on the last rank."""
    h, f = cfg.n_embd, cfg.d_ff
    layer = 4 * h * h + 3 * h * f
    costs = [0] + [layer] * cfg.n_layer + [0, cfg.vocab_size * h, 0, 0]
    total = sum(costs)
    rank, running, owner = 0, 0, []
    for cost in costs:
        running += cost
        owner.append(rank)
        if running > total * (rank + 1) / pp:
            rank += 1
    return tuple(owner), rank


def nanotron_cut(cfg: GPTConfig, pp: int) -> tuple[int, ...]:
    """The decoder layers nanotron puts on each of `pp` stages (`nanotron_blocks`). The head's cost makes the first
    stages hold more layers: 1B over 4 stages is 6, 5, 5 and the head alone. Where stages outnumber what the cost
    spreads over (1B over 8 stages: 3, 3, 2, 3, 2, 3, the head, the loss; at 32 stages one layer each and twelve idle
    ranks), the planner still puts the head and the loss on the last stage; the first stage, which holds the most
    microbatches, is the same."""
    owner, _ = nanotron_blocks(cfg, pp)
    return tuple(sum(1 for o in owner[1 : 1 + cfg.n_layer] if o == r) for r in range(pp))


def nanotron_trains(cfg: GPTConfig, pp: int) -> bool:
    """Whether nanotron, as the sweep ran it, can train the model over `pp` stages: whether its output rank holds the
    loss (`nanotron_blocks`). Where it does not (the last rank then holds no block at all: 1B from 16 stages, 8B from
    64, at a 131,072 vocabulary), the output rank's outputs hold only pointers to the loss, so its trainer leaves the
    step's average loss None (src/nanotron/trainer.py at e24d2483, training_step: `loss_avg` is computed only where
    `outputs[0]["loss"]` is a tensor) and its logger ranks, the output rank's, call `loss_avg.item()` when logging
    the first iteration (train_step_logs): the run stops before the third iteration, where the sweep's figures are
    written. Decided from nanotron's code and the model's dimensions, never from a measured row."""
    owner, output_rank = nanotron_blocks(cfg, pp)
    return owner[-1] == output_rank


@dataclass(frozen=True)
class Row:
    model: str
    nodes: int
    tp: int
    pp: int
    dp: int
    zero: int
    mbs: int
    grad_acc: int
    seq: int
    tok_s_gpu: float | None
    mem_gb: float | None

    @property
    def layout(self) -> tuple:
        """(model, nodes, tp, pp, dp, ZeRO): the configuration less its micro-batch."""
        return self.model, self.nodes, self.tp, self.pp, self.dp, self.zero

    @property
    def gpus(self) -> int:
        return self.nodes * GPUS_PER_NODE

    @property
    def tokens(self) -> int:
        """Tokens a step: the global batch (micro-batch x accumulation x replicas) of `seq` each."""
        return self.mbs * self.grad_acc * self.dp * self.seq


def read_rows(path: Path) -> list[Row]:
    def num(text: str) -> float | None:
        return float(text) if text.strip() else None

    with path.open() as f:
        return [Row(r["model"], int(r["nodes"]), int(r["tp"]), int(r["pp"]), int(r["dp"]), int(r["zero"]), int(r["mbs"]),
                    int(r["grad_acc"]), int(r["seq"]), num(r["tok_s_gpu"]), num(r["gpu_mem_gb"]))
                for r in csv.DictReader(f)]  # fmt: skip


@dataclass(frozen=True)
class Planned:
    row: Row
    memory: float | None  # predicted peak bytes of world rank 0 (the figure's rank); None where it cannot be cut
    step_s: float = 0.0  # predicted step time; 0 where it cannot be cut
    layer_passes: int = 0  # micro-batches x layers on the longest stage: what a fixed host cost a pass multiplies
    busiest: float = 0.0  # predicted peak bytes of the busiest rank
    trains: bool = True  # whether nanotron can train the layout at all (`nanotron_trains`)

    @property
    def tok_s_gpu(self) -> float | None:
        """Predicted tokens/s per GPU (None where it cannot be cut)."""
        return self.row.tokens / self.step_s / self.row.gpus if self.step_s else None

    @property
    def fits(self) -> bool | None:
        """Whether the busiest rank's predicted peak fits the device's usable memory (None where it cannot be cut)."""
        return None if self.memory is None else self.busiest <= USABLE_BYTES

    @property
    def runs(self) -> bool | None:
        """The prediction held against result / no result: it fits, and nanotron can train its layout."""
        return None if self.memory is None else bool(self.fits and self.trains)


def plan_row(row: Row, vocab: int, checkpoint: str) -> Planned:
    cfg = model(row.model, vocab, row.seq)
    cut = nanotron_cut(cfg, row.pp) if row.pp > 1 else ()
    work = Workload(batch=row.mbs * row.grad_acc * row.dp, seq=row.seq, dtype="bf16-master", reduce_fp32=True,
                    checkpoint=checkpoint, microbatch_size=row.mbs, sequence_parallel=row.tp > 1)  # fmt: skip
    devices = preset(DEVICE, row.gpus, GPUS_PER_NODE)
    layout = Layout(row.tp, row.pp, row.dp, row.zero, cut)
    c = evaluate(cfg, layout, work, devices)
    if c.memory is None or c.step is None:
        return Planned(row, None)
    first = rank_memory(cfg, layout, on_devices(work, devices), 0) if row.pp > 1 else c.memory

    def peak(m: RankMemory) -> int:
        # the runs' float32 gradient accumulation buffer beside the bfloat16 gradients, every step (module docstring)
        return m.total + FP32_GRAD_BUFFER * m.param_count

    passes = row.grad_acc * (max(cut) if cut else cfg.n_layer)
    trains = nanotron_trains(cfg, row.pp) if row.pp > 1 else True
    return Planned(row, peak(first), c.step.total, passes, peak(c.memory), trains)


@dataclass(frozen=True)
class Summary:
    planned: int
    cut: int  # layouts the planner cannot cut (left out)
    memory_median: float
    memory_p90: float
    memory_bias: float
    fit_agreement: float  # the prediction (`Planned.runs`) against result / no result
    fit_counts: dict  # (predicted to run, ran) -> configurations
    memory_fit_agreement: float  # the memory figure alone (`Planned.fits`) against result / no result
    untrainable: tuple[int, int]  # configurations nanotron cannot train (`nanotron_trains`): without a result, with one
    rho: dict  # (model, nodes) -> Spearman's rho
    rho_median: float
    measured: int  # planned runs with a memory figure
    by_degree: dict  # ("tp" | "pp", degree) -> median signed memory error
    explained: int  # planned configurations whose outcome a memory figure can explain (memory_cannot_explain)
    explained_agreement: float  # the fit agreement over those


def summarize(results: list[Planned]) -> Summary:
    laid = [p for p in results if p.memory is not None]
    errors = [p.memory / (p.row.mem_gb * GiB) - 1 for p in laid if p.row.mem_gb]
    grouped: dict = defaultdict(list)
    for p in laid:
        if p.row.mem_gb:
            for name in ("tp", "pp"):
                grouped[(name, getattr(p.row, name))].append(p.memory / (p.row.mem_gb * GiB) - 1)
    absolute = [abs(e) for e in errors]
    counts: dict = defaultdict(int)
    for p in laid:
        counts[(p.runs, p.row.tok_s_gpu is not None)] += 1
    agree = counts[(True, True)] + counts[(False, False)]
    memory_agree = sum(1 for p in laid if p.fits == (p.row.tok_s_gpu is not None))
    untrainable = [p.row.tok_s_gpu is not None for p in laid if not p.trains]
    unexplained = memory_cannot_explain([p.row for p in results])
    kept = [p for p, u in zip(results, unexplained, strict=True) if p.memory is not None and not u]
    kept_agree = sum(1 for p in kept if p.runs == (p.row.tok_s_gpu is not None))
    cells: dict = defaultdict(list)
    for p in laid:
        if p.row.tok_s_gpu is not None:
            cells[(p.row.model, p.row.nodes)].append((p.tok_s_gpu, p.row.tok_s_gpu))
    rho = {k: spearman([a for a, _ in v], [b for _, b in v]) for k, v in sorted(cells.items())}
    valid = [r for r in rho.values() if r is not None]
    return Summary(len(laid), len(results) - len(laid), statistics.median(absolute), percentile(absolute, 0.9),
                   statistics.median(errors), agree / len(laid), dict(counts), memory_agree / len(laid),
                   (untrainable.count(False), untrainable.count(True)), rho, statistics.median(valid) if valid else float("nan"),
                   len(errors), {k: statistics.median(v) for k, v in sorted(grouped.items())},
                   len(kept), kept_agree / len(kept) if kept else float("nan"))  # fmt: skip


def report(
    main: Summary,
    alternatives: dict[str, Summary],
    results: list[Planned],
    what_if: dict[float, Summary],
    small_vocab: list[Planned] | None = None,
) -> str:
    left_out = f"{main.cut} the planner cannot lay out are left out, " if main.cut else ""
    lost, lost_gib = layout_failures(results)
    best, best_at = best_usable(results)
    lines = [
        f"## {HEADING}",
        "",
        f"`bench/bench_playbook.py`: {len(results)} configurations of the Ultra-Scale Playbook (1B and 8B on 1-64 nodes "
        f"of 8 H100), each planned as it ran, as the Llama family with each pipeline cut as nanotron cuts it; "
        f"{left_out}{main.planned} planned. Assumptions and their alternatives: the script's docstring.",
        "",
        f"- Peak memory, predicted against measured over the {main.measured} runs with a result: median "
        f"|error| {main.memory_median:.1%}, 90th percentile {main.memory_p90:.1%}, median signed error "
        f"{main.memory_bias:+.1%} (target: median <= 10%).",
        f"- Fit: the prediction (it fits the 80 GB less the reserve, and nanotron can train its layout) agrees with "
        f"result / no result on {main.fit_agreement:.1%} (target >= 90%): predicted to run and ran "
        f"{main.fit_counts.get((True, True), 0)}, predicted not to and no result {main.fit_counts.get((False, False), 0)}, "
        f"predicted to run but no result {main.fit_counts.get((True, False), 0)}, predicted not to but ran "
        f"{main.fit_counts.get((False, True), 0)}. Nanotron cannot train {sum(main.untrainable)} of the configurations "
        f"whatever their memory (`nanotron_trains`, from its code: where pipeline ranks outnumber what its cut spreads "
        f"over, it names as output rank a rank past the loss, whose logging of the loss then fails before the figures "
        f"are written): {main.untrainable[0]} produced no result, {main.untrainable[1]} did. The memory figure alone "
        f"agrees on {main.memory_fit_agreement:.1%}. Of the {main.fit_counts.get((True, False), 0)} predicted to run "
        f"without a result, {lost} belong to layouts none of whose micro-batch sizes produced a result, predicted at a "
        f"median {lost_gib:.0f} GiB of the 80: failures no memory figure explains. Leaving out every "
        f"configuration whose outcome no memory figure can explain, decided from the measurements alone "
        f"(`memory_cannot_explain`: its whole layout failed, or a run needing no less memory ran), the agreement "
        f"over the other {main.explained} is {main.explained_agreement:.1%}. With the usable memory set anywhere from "
        f"40 to 80 GiB instead of the device's less its reserve, the same peaks would agree at most {best:.1%} "
        f"(at {best_at:g} GiB; `best_usable`): the reserve, not fitted, stays the device's.",
        f"- Throughput ranks: Spearman's rho of predicted against measured tokens/s per GPU, median over the "
        f"{len(main.rho)} (model, nodes) cells {main.rho_median:.2f} (target >= 0.7): "
        + ", ".join(f"{m} x{n} {r:.2f}" if r is not None else f"{m} x{n} -" for (m, n), r in main.rho.items())
        + f". How much the median rests on which cells were measured: "
        f"{median_interval(r for r in main.rho.values() if r is not None).describe('{:.2f}')} over the cells.",
        "",
        "| assumption changed | memory median abs err | p90 | signed median | fit agreement | median rho |",
        "|---|---|---|---|---|---|",
        f"| none (vocabulary 131,072, no recomputation) | {main.memory_median:.1%} | {main.memory_p90:.1%} | "
        f"{main.memory_bias:+.1%} | {main.fit_agreement:.1%} | {main.rho_median:.2f} |",
    ]
    for name, s in alternatives.items():
        lines.append(f"| {name} | {s.memory_median:.1%} | {s.memory_p90:.1%} | {s.memory_bias:+.1%} | "
                     f"{s.fit_agreement:.1%} | {s.rho_median:.2f} |")  # fmt: skip
    met = {"memory": main.memory_median <= 0.10, "fit": main.fit_agreement >= 0.90, "ranks": main.rho_median >= 0.7}
    degrees = "; ".join(f"{name} {d}: {e:+.0%}" for (name, d), e in main.by_degree.items())
    growth = growth_per_sequence(results)
    lines += [
        "",
        "Targets: "
        + ", ".join(f"{name} {'met' if ok else 'not met'}" for name, ok in met.items())
        + f". Median signed memory error by degree: {degrees}.",
        *vocabulary_evidence(results, small_vocab or []),
        "Where the memory miss lies: within a layout, from one micro-batch size to the next that ran, the measured "
        "growth of the peak over the predicted growth, median by tp: "
        + ", ".join(f"tp {tp} {r:.2f} ({n} pairs)" for tp, (n, r) in growth.items())
        + ". The states and any fixed cost cancel in these differences: a ratio above 1 is bytes each sequence "
        "adds that the count misses.",
    ]
    twins = zero_twins(results)
    if twins:
        lo, mid, hi = twins.measured_quartiles
        ceiling = [c[1] for c in twins.cells.values() if c[1] is not None]
        ours = [c[2] for c in twins.cells.values() if c[2] is not None]
        lines.append(
            f"How far the throughput figures agree with themselves: {twins.pairs} configurations ran both at ZeRO-0 and "
            f"at ZeRO-1 (the same model, nodes, layout, micro-batch and accumulation). The planner puts each pair within "
            f"{twins.predicted_range[0]:.2f}..{twins.predicted_range[1]:.2f} of each other (ZeRO-1 adds one all-gather); "
            f"measured, ZeRO-1 / ZeRO-0 has median {mid:.2f} but 10th and 90th percentiles {lo:.2f} and {hi:.2f}, and "
            f"{twins.off_25:.0%} of the pairs are more than 25% apart. Within each cell of at least 5 pairs, Spearman's "
            "rho of the ZeRO-0 runs against their ZeRO-1 twins (how well knowing one run exactly ranks its twin) and "
            "the planner's rho on the same ZeRO-1 runs: "
            + ", ".join(f"{m} x{n} {c[1]:.2f} / {c[2]:.2f}" for (m, n), c in twins.cells.items()
                        if c[1] is not None and c[2] is not None)
            + f"; medians {statistics.median(ceiling):.2f} / {statistics.median(ours):.2f}.")  # fmt: skip
    lines += stall_lines(results, summarize)
    steady = [p for p, f in zip(results, stalled([p.row for p in results]), strict=True) if not f]
    kinds = ratio_by_kind(steady)
    if kinds:
        lines += ["", "Where the throughput miss lies: median measured / predicted tokens/s per GPU (runs) by kind of "
                  "layout and sequences a micro-batch (`ratio_by_kind`), over the runs that did not stall. A kind far "
                  "below the others is ranked too high within its cell.", "",
                  "| layout | " + " | ".join(f"micro-batch {m}" for m in MBS_BANDS) + " |",
                  "|---|" + "---|" * len(MBS_BANDS)]  # fmt: skip
        for pipeline, tp in itertools.product((False, True), TP_BANDS):
            cells = [kinds.get((pipeline, tp, m)) for m in MBS_BANDS]
            if any(cells):
                lines.append(f"| {'pipeline' if pipeline else 'no pipeline'}, {tp} | "
                             + " | ".join(f"{c[1]:.2f} ({c[0]})" if c else "-" for c in cells) + " |")  # fmt: skip
        small, large = kinds.get((True, TP_BANDS[1], MBS_BANDS[0])), kinds.get((True, TP_BANDS[1], MBS_BANDS[2]))
        if small and large:
            lines += ["", f"Tensor parallelism inside a pipeline at 1-2 sequences a micro-batch ran at {small[1]:.2f} of "
                      f"the prediction over {small[0]} runs, the same kind at 16 or more at {large[1]:.2f}: a cost "
                      "that does not grow with the micro-batch, largest where tensor-parallel groups span nodes."]  # fmt: skip
        lines.append("")
    widest, link = MODELS["8B"][1], preset(DEVICE, 2 * GPUS_PER_NODE, GPUS_PER_NODE).bw_inter
    lines += crossing_lines(crossing_cost([p.row for p in results]), widest, link)
    floor = per_micro_batch(steady)
    if floor:
        (model_name, nodes, tp, pp, dp, zero), runs = floor
        lines.append(
            f"The same cost, one layout: {model_name} on {nodes} nodes at tp {tp}, pp {pp}, dp {dp} (ZeRO-{zero}) took "
            + ", ".join(f"{m:.0f}" for _, m, _ in runs) + " ms a micro-batch at "
            + ", ".join(str(b) for b, _, _ in runs) + " sequences (predicted "
            + ", ".join(f"{q:.0f}" for *_, q in runs) + "; `per_micro_batch`): the measured time stays at a floor "
            "whatever the micro-batch's size until the predicted compute exceeds it, as if a fixed cost per micro-batch ran "
            "beside the compute rather than after it.\n")  # fmt: skip
    pair = tp8_pair(results)
    if pair:
        small, large = pair
        lines.append(
            f"What the ranks miss, one example: 1B on one node at tp 8, {small.row.mbs} and {large.row.mbs} sequences a "
            f"micro-batch measured {small.row.tok_s_gpu:,.0f} and {large.row.tok_s_gpu:,.0f} tokens/s per GPU "
            f"({large.row.tok_s_gpu / small.row.tok_s_gpu:.1f}x), where the planner's compute and communication give "
            f"{large.tok_s_gpu / small.tok_s_gpu:.2f}x (NCCL's latency for every tensor-parallel collective "
            "included): a fixed cost per layer and pass beyond it that dominates small micro-batches under tensor "
            "parallelism, and that the planner has no term for. Added as a "
            "what-if (not part of the planner, not fitted), the median rho becomes "
            + ", ".join(f"{s.rho_median:.2f} at {t * 1e3:g} ms a pass" for t, s in what_if.items()) + ".")  # fmt: skip
    return "\n".join(lines) + "\n"


def vocabulary_evidence(results: list[Planned], small_vocab: list[Planned]) -> list[str]:
    """The configurations nanotron could train at a 32,768 vocabulary but not at 131,072 (its head a quarter the
    cost, the cut spreads over more stages), and how many of them produced a result: a test of the vocabulary
    assumption independent of any memory figure."""
    shifted = [(a.row.model, a.row.pp, a.row.tok_s_gpu is not None)
               for a, b in zip(results, small_vocab, strict=True) if not a.trains and b.trains]  # fmt: skip
    if not shifted:
        return []
    kinds = ", ".join(f"{m} over {pp} stages" for m, pp in sorted({(m, pp) for m, pp, _ in shifted}))
    ran = sum(1 for *_, r in shifted if r)
    return [f"The vocabulary read from the cut: at 32,768 nanotron could train {len(shifted)} configurations it cannot "
            f"at 131,072 ({kinds}); {ran} of them produced a result."]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=CSV)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"--csv: no file at {args.csv}; give the path of the Playbook's measured-1b-8b.csv "
                     "(shared/reference/playbook/ beside the repository)")  # fmt: skip
    rows = read_rows(args.csv)
    main_run = [plan_row(r, 131072, "none") for r in rows]
    small_vocab = [plan_row(r, 32768, "none") for r in rows]
    recompute = [plan_row(r, 131072, "blocks") for r in rows]
    summary = summarize(main_run)
    alternatives = {
        "vocabulary 32,768": summarize(small_vocab),
        "every block recomputed": summarize(recompute),
    }
    what_if = {t: summarize(with_host_cost(main_run, t)) for t in HOST_COSTS_S}
    text = report(summary, alternatives, main_run, what_if, small_vocab)
    print(text)
    write_section(HEADING, text, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
