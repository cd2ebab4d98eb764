"""Compare page: chosen runs (or the best of each strategy) side by side, the guide's table measured,
ratios to a baseline, per-rank memory by coordinate, overlaid telemetry, pipeline timelines, spec differences."""

from __future__ import annotations

import streamlit as st

from runner import api
from runner.analysis.same_work import WORK_FIELDS
from runner.job.metrics import bubble_theory_formula, step_number
from runner.spec.converge_layouts import DEFAULTS, bound_of, bound_text
from runner.spec.run_spec import DTYPES, PRESETS, WORKLOADS, SpecError, model_label
from runner.spec.strategies import strategy_names
from ui import charts
from ui.alike import best_note, shared_training, unlike_baseline
from ui.compare import (
    GUIDE_NOTES,
    coinciding_curves,
    comparison_table,
    curve_baseline,
    figure_help,
    guide_table,
    loss_deviations,
    readable_table,
    spec_differences,
    unsharded_sources,
    with_baseline,
)
from ui.compare_sets import group_runs, medians_table, noise_note, shared_note, verdicts
from ui.format import ranks_text
from ui.nodes import ranks_by_node, with_node
from ui.planner import plan_comparisons, readable_comparison
from ui.state import engine, enter_through_app

enter_through_app()  # a deep link on a fresh server would otherwise skip app.py

K = "compare_"

st.title("Compare runs")


def convergence_check() -> None:
    """Queue the convergence check (every strategy, or those picked, on one corpus, seed and model) and show its
    runs here: their curves are compared on this page once they have run."""
    with st.expander("Run the convergence check", expanded=False):
        c1, c2, c3, c4 = st.columns([3, 1, 1, 1])
        picked = c1.multiselect("strategies (single is the baseline)", strategy_names(), key=K + "conv_strategies",
                                placeholder="every strategy")  # fmt: skip
        steps = c2.number_input("steps", min_value=1, value=DEFAULTS.steps, key=K + "conv_steps")
        dtype = c3.selectbox("dtype", DTYPES, key=K + "conv_dtype")
        models = list(PRESETS)  # the Llama family's too: every strategy trains it against the single device
        model = c4.selectbox("model", models, index=models.index(DEFAULTS.model), key=K + "conv_model")
        data = st.text_input("data", value=DEFAULTS.data, key=K + "conv_data").strip() or DEFAULTS.data
        if st.button("Run the convergence check", key=K + "conv_run", icon=":material/show_chart:"):
            try:
                tag, queued = api.submit_converge(engine(), picked or None, settings={"steps": int(steps),
                                                  "dtype": dtype, "data": data, "model": model})  # fmt: skip
            except SpecError as exc:
                st.error("Not queued:\n" + "\n".join(f"- **{p.field}**: {p.message}" for p in exc.problems),
                         icon=":material/error:")  # fmt: skip
                return
            ids = ",".join(str(i) for _, i in queued if i is not None)
            st.success(f"Queued {len(ids.split(','))} runs under the tag {tag}: follow them in [History]"
                       f"(/history?tag={tag}), then [compare their curves](/compare?runs={ids}).")  # fmt: skip


convergence_check()


recent = api.list_runs(engine(), api.RunFilter(status=["succeeded"]), limit=200)
if recent.empty:
    st.info("No finished runs yet: launch two runs with different strategies, then compare them here.")
    st.stop()

labels = {
    int(r.id): f"#{r.id} {r.strategy} · {model_label(r.model, r.weights)} · {r.workload} · {ranks_text(r.world_size)}"
    for r in recent.itertuples()
}
from_link = [int(x) for x in st.query_params.get("runs", "").split(",") if x.isdigit() and int(x) in labels]

# The expander keeps its own open state (a keyed, stateful expander): an `expanded` computed from the address
# would change its identity, and Streamlit would redraw it collapsed as soon as a pick filled the address.
if K + "best_open" not in st.session_state:
    st.session_state[K + "best_open"] = not from_link  # a shared link opens on its figures
with st.expander("Best of each strategy", key=K + "best_open", on_change="rerun"):
    c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
    model = c1.selectbox("model", list(PRESETS) + ["custom"], key=K + "best_model")
    workload = c2.selectbox("workload", WORKLOADS, index=2, key=K + "best_workload")
    if c3.button("Pick them", key=K + "best"):
        picked = api.best_runs(engine(), model, workload)
        best = [i for i in picked.ids if i in labels]
        if best:
            # The multiselect below is the selection: a widget keeps its own value over a new `default`, so
            # writing only the address would be overwritten by the old (empty) choice on the next line.
            st.session_state[K + "runs"] = best
            st.caption(best_note(picked))
        else:
            st.warning(f"No succeeded {workload} runs of the {model} model yet.")

if K + "runs" not in st.session_state:  # the address seeds the selection; from then on the widget holds it
    st.session_state[K + "runs"] = from_link
chosen = st.multiselect(
    "runs", list(labels), format_func=labels.get, key=K + "runs", placeholder="pick two or more finished runs",
)  # fmt: skip
if chosen != from_link:
    st.query_params["runs"] = ",".join(map(str, chosen))
if len(chosen) < 1:
    st.caption("Choose runs above; the selection is kept in the address, so the view can be shared.")
    st.stop()

runs = [r for r in (api.get_run(engine(), i) for i in chosen) if r]


def repeated_runs(runs: list[dict]) -> None:
    """Runs grouped by spec: each figure's median with its interval, which differences they resolve in words
    (ui/compare_sets.py, runner/analysis/stats.py), and Repeat to queue more runs of every spec shown as one set."""
    groups = group_runs(runs)
    st.subheader("Medians of repeated runs, and what they resolve")
    st.caption("Runs of one spec (tags and time limit aside) form a group. Each figure is the group's median with "
               "a distribution-free interval: the order statistics that cover the true median with the confidence "
               "shown, whatever the shape of the noise. Two specs differ only where the interval of their ratio of "
               "tokens/s reaches 95% and excludes 1.")  # fmt: skip
    marks = {"higher": "✔ ", "unresolved": "≈ ", "unlike": "≠ "}
    lines = [marks.get(v.outcome, "… ") + v.sentence for v in verdicts(groups)]
    if lines:
        st.markdown("\n".join(f"- {line}" for line in lines))
    if noise := noise_note(groups):
        st.markdown(noise)
    if note := shared_note(groups):
        st.warning(note, icon=":material/group:")
    st.table(medians_table(groups).set_index("figure"))  # a static table: every cell whole, at any width
    c1, c2 = st.columns([1, 3], vertical_alignment="bottom")
    # no min or max: the browser would keep an out-of-range value to itself and Repeat would queue the last valid one
    k = int(c1.number_input("runs of each spec", value=3, step=1, key=K + "repeat_k",
                            help=f"1 to {api.MAX_REPEAT}"))  # fmt: skip
    if problem := api.repeat_problem(k):
        st.error(f"runs of each spec: {problem.message}", icon=":material/error:")
    if c2.button(f"Repeat x{k}", key=K + "repeat", icon=":material/replay:", disabled=problem is not None,
                 help=f"queue {k} more runs of each spec above as one comparison set, run one at a time in turn "
                 "(A B A B ...) so that every spec meets the same machine"):  # fmt: skip
        try:
            ids = api.repeat_runs(engine(), [r["id"] for r in runs], k)
        except SpecError as exc:
            st.error("Nothing queued: " + "; ".join(str(p) for p in exc.problems))
        else:
            every = ",".join(map(str, [*chosen, *ids]))
            st.success(f"Queued comparison set {ids[0]}: {len(ids)} runs, one at a time. Follow them on [Live](/live);"
                       f" when they have finished, [compare them with these](/compare?runs={every}).",
                       icon=":material/check_circle:")  # fmt: skip


repeated_runs(runs)
table = comparison_table(runs)
baseline = st.selectbox("baseline (others shown as ratios to it)", [None, *chosen], format_func=lambda i: "none" if i is None else labels[i], key=K + "baseline")  # fmt: skip
unlike = unlike_baseline(runs, baseline, WORK_FIELDS)
shown = readable_table(with_baseline(table, baseline, unlike), ratio=True) if baseline else readable_table(table)
st.dataframe(shown, hide_index=True,
             column_config={name: st.column_config.Column(help=why) for name, why in figure_help().items()})  # fmt: skip

st.subheader("The guide's comparison table, measured")
# An HTML table: its cells wrap instead of being cut at the column's width, whatever the window.
st.table(guide_table(runs), hide_index=True)
if sources := unsharded_sources(runs):
    st.caption("vs unsharded: " + "; ".join(sources) + ".")
st.caption(GUIDE_NOTES)

a, b = st.columns(2)
a.altair_chart(charts.compare_bar_chart(table, "tokens_per_s", "tokens / s"), width="stretch")
b.altair_chart(charts.compare_bar_chart(table.assign(step_ms=table["step_time_s_p50"] * 1e3), "step_ms",
                                       "step time p50 (ms)"), width="stretch")  # fmt: skip
ranks = api.rank_results(engine(), chosen)
if not ranks.empty:
    coord = st.radio("group per-rank bars by", ["rank", "tp", "pp", "dp", "node"], horizontal=True, key=K + "coord",
                     help="node: the machine each rank ran on (a Slurm run spreads its ranks over nodes)")  # fmt: skip
    a, b = st.columns(2)
    if coord == "rank":
        a.altair_chart(charts.rank_memory_chart(ranks), width="stretch")
    elif coord == "node":
        a.altair_chart(charts.rank_memory_by_coord_chart(with_node(ranks), "node"), width="stretch")
    else:
        a.altair_chart(charts.rank_memory_by_coord_chart(ranks, coord), width="stretch")
    b.altair_chart(charts.rank_time_chart(ranks), width="stretch")
    if coord == "node":
        st.caption("Per node: its ranks' figures summed (bytes held, peak memory together, seconds)")
        st.dataframe(ranks_by_node(ranks), hide_index=True)

# Runs launched from the Planner: its prediction beside what they measured (issue 15's proof).
for run_id, table in plan_comparisons(engine(), chosen).items():
    st.markdown(f"**#{run_id}: the planner's prediction against the measurement**")
    st.dataframe(readable_comparison(table), hide_index=True)

series = api.telemetry_series(engine(), chosen)
if not series.empty:
    a, b = st.columns(2)
    a.altair_chart(charts.telemetry_chart(series, "util_pct", "utilisation (%)"), width="stretch")
    b.altair_chart(charts.telemetry_chart(series, "mem_bytes", "memory (MiB)"), width="stretch")

for run in runs:
    spans = api.timeline_spans(engine(), run["id"])
    if spans.empty:
        continue
    last = int(spans["step"].max())
    r = run["result"] or {}
    st.altair_chart(
        charts.timeline_chart(
            spans[spans["step"] == last], title=f"#{run['id']} {run['spec']['strategy']}: step {step_number(last)}",
            bubble=(r.get("bubble_fraction"), r.get("bubble_fraction_theory")),
        ),
        width="stretch",
    )  # fmt: skip
    if r.get("bubble_fraction") is not None:
        formula = bubble_theory_formula(run["spec"].get("schedule", "1f1b"))
        st.caption(
            f"bubble measured {r['bubble_fraction']:.1%} (idle / step time, mean over ranks), "
            f"theory {formula} = {r.get('bubble_fraction_theory') or 0:.1%}"
        )

def loss_curves_section(runs: list[dict], chosen: list[int], baseline: int | None) -> None:
    """The chosen runs' loss curves overlaid, and how far each strays from the baseline run's (the one chosen
    above, else the first single-device run): step by step, its largest relative deviation."""
    curves = api.loss_curves(engine(), chosen)
    if curves.empty or not curves["loss"].notna().any():
        return
    st.subheader("Loss curves")
    base = curve_baseline(runs, baseline)
    short = {r["id"]: f"#{r['id']} {r['spec']['strategy']}" for r in runs if r["id"] in chosen}
    dtype = shared_training(runs)  # one model, data, seed and dtype: the convergence check's bound applies
    table, per_step = loss_deviations(curves, base, short, dtype, unlike_baseline(runs, base))
    st.altair_chart(charts.loss_overlay_chart(curves, short), width="stretch")
    if hidden := coinciding_curves(curves, base, short):
        st.caption(hidden)
    st.caption(f"Deviation: |loss - baseline| / baseline per step against {short.get(base, base)}, the largest over "
               "the steps both runs recorded; runs on the same data, seed and model should agree to rounding.")  # fmt: skip
    if dtype is not None:
        st.caption(f"The runs trained alike: verdict against the convergence check's bound for {bound_text(dtype)}.")
    early = bound_of(dtype or "float32").early_steps
    st.dataframe(table, hide_index=True, column_config={
        "early deviation": st.column_config.NumberColumn(
            f"early deviation (steps 1-{early})", format="%.2e", help=f"over the first {early} steps: the largest "
            "(bf16: the median, which a one-step loss spike does not move)"),
        "largest deviation": st.column_config.NumberColumn(format="%.2e"),
        "held-out deviation": st.column_config.NumberColumn(format="%.2e"),
        "last loss": st.column_config.NumberColumn(format="%.4f"),
        "last held-out loss": st.column_config.NumberColumn(format="%.4f"),
    })  # fmt: skip
    if not per_step.empty and (per_step["deviation"] > 0).any():
        st.altair_chart(charts.deviation_chart(per_step, list(short.values())), width="stretch")
        if exact := int((per_step["deviation"] == 0).sum()):  # the line bridges them: say so
            st.caption(f"{exact} of {len(per_step)} run-steps equal the baseline's loss exactly and are not drawn: a "
                       "log scale has no zero.")  # fmt: skip


loss_curves_section(runs, chosen, baseline)



st.subheader("Settings that differ")
diff = spec_differences(runs)
if len(runs) < 2:
    st.caption("One run chosen: choose another to see which settings differ.")
elif diff.empty:
    st.caption(f"The {len(runs)} runs have identical specs: repeats of one setting.")
else:
    st.dataframe(diff.astype(str))
