"""History page: every run of the team (filtered and paged in SQL), charts, and one run's detail at ?run=ID."""

from __future__ import annotations

import streamlit as st

from runner import api
from runner.spec.run_spec import RunSpec, model_label
from ui import charts
from ui.cpu import contention, contention_text, load_text, oversubscription_warning, shared_machine
from ui.filters import FILTERS, day_range, parse_day, run_filter
from ui.format import human_bytes, human_duration, human_rate, rank_tables, status_label
from ui.hosts import placement_text, ran_on, where_text, without_profiler_noise
from ui.nodes import nodes_caption
from ui.run_detail import (
    failure_text,
    generation,
    model_text,
    peak_memory,
    progress,
    progress_html,
    result_captions,
    timeline_title,
    unfinished_steps_text,
)
from ui.simulated import timeline_pair, timeline_pair_charts
from ui.state import engine, enter_through_app
from ui.verify import FAIL, PASS, differences, list_verdict, tolerance_text, verdict

enter_through_app()  # a deep link on a fresh server would otherwise skip app.py

K = "history_"
PAGE_SIZE = 50
LOG_TAIL_BYTES = 8000  # of the chosen rank's log, on the run page


def verify_panel(v: dict) -> None:
    """The job's verdict as a badge (failures listed, tolerances named) beside the differences it judged."""
    badge, table = st.columns([1, 1.6])
    with badge:
        result = verdict(v)
        if result == PASS:
            st.success("**Verify: PASS** · matches the single-device reference within tolerance", icon=":material/check_circle:")  # fmt: skip
        elif result == FAIL:
            failures = "\n".join(f"- {f}" for f in v.get("failures") or ["(no failure recorded)"])
            st.error(f"**Verify: FAIL** · differs from the single-device reference:\n\n{failures}", icon=":material/cancel:")  # fmt: skip
        else:
            st.info("**Verify: no verdict** (recorded before verdicts): the differences beside were not judged against tolerances", icon=":material/help:")  # fmt: skip
        if tolerance_text(v):
            st.caption(f"tolerances: {tolerance_text(v)}")
    table.table(differences(v), hide_index=True)  # an HTML table: its cells wrap, none is cut


def run_detail(run_id: int) -> None:
    if st.button("All runs", icon=":material/arrow_back:", key=f"{K}back"):
        st.query_params.clear()
        st.rerun()

    run = api.get_run(engine(), run_id)  # the one read of this rerun; the live part re-reads on its own reruns
    if run is None:
        st.error(f"There is no run {run_id}; it may have been deleted.")
        return
    active = not api.is_terminal(run["status"])
    first_draw = [run]  # the live part's first draw, in this rerun, uses the run read above

    # Refreshes every second while the run is queued or running; a finished run is drawn once.
    @st.fragment(run_every=1.0 if active else None)
    def live() -> None:
        run = first_draw.pop() if first_draw else api.get_run(engine(), run_id)
        if run is None:
            st.error(f"There is no run {run_id}; it may have been deleted.")
            return
        spec = run["spec"]
        st.title(f"Run {run_id}: {spec['strategy']} · {model_label(spec['model'], spec.get('weights'))} · "
                 f"{spec['workload']}")
        st.subheader(status_label(run["status"]))
        st.caption(placement_text(run))  # in a team database: whose run, and which host's runner has it
        if (model := model_text(run)) is not None:
            st.caption(model)
        if run["status"] == "queued":
            st.info(run["wait_reason"] or "waiting for the runner to pick it up")
        if run["status"] in ("queued", "running"):
            frac, text = progress(run)
            st.html(progress_html(frac, text))
            if st.button("Cancel", key=f"{K}cancel_{run_id}"):
                st.toast(f"run {run_id}: {api.cancel(engine(), run_id)}")
        if failure := failure_text(run):
            st.error(failure)
            if run["traceback"]:
                st.code(run["traceback"], language="python")
        r = run["result"] or {}
        if r:
            c = st.columns(5)
            c[0].metric("throughput", human_rate(r.get("tokens_per_s")))
            c[1].metric("step time p50", human_duration(r.get("step_time_s_p50")))
            c[2].metric("step time p90", human_duration(r.get("step_time_s_p90")))
            c[3].metric(
                "run's peak memory",
                human_bytes(peak_memory(run)),
                help="the largest rank's. GPU: memory the run allocated; CPU: resident memory above the rank's "
                "state after set-up (interpreter, torch, process group)",
            )
            c[4].metric("achieved GFLOP/s", f"{r['achieved_gflops']:.2f}" if r.get("achieved_gflops") else "—")
            for caption in result_captions(run):
                st.caption(caption)
            warning = oversubscription_warning(r, run["ranks"])
            if warning:
                st.warning(warning, icon=":material/warning:")
            elif (wait := contention(run["ranks"])) and wait.wait_s > 0:  # other processes took cores
                st.caption("CPU contention: " + contention_text(run["ranks"], r.get("bubble_fraction") is not None))
            if load := load_text(r):  # a run that shared the machine is flagged, a quiet one says so in grey
                (st.warning if shared_machine(r) else st.caption)(load)
            if r.get("verify"):
                verify_panel(r["verify"])
            elif run["spec"].get("verify") is False:
                st.caption("verify: off (not compared with the single-device reference)")
        steps = api.step_metrics(engine(), run_id)
        if (partial := unfinished_steps_text(run, steps)) is not None:
            st.caption(partial)
        if len(steps):
            st.altair_chart(charts.step_time_chart(steps), width="stretch")
        if len(steps) and steps["loss"].notna().any():
            st.altair_chart(charts.loss_chart(steps), width="stretch")
        if (text := generation(r)) is not None:
            a, b = st.columns(2)
            a.caption("prompt (the batch's first row)")
            a.code(text.prompt, language=None, wrap_lines=True)
            b.caption(f"its continuation: {text.tokens} tokens, greedy")
            b.code(text.continuation, language=None, wrap_lines=True)
        spans = api.timeline_spans(engine(), run_id)
        # A finished training pipeline: its last step measured above the same step simulated from the run's own
        # pass times (ui/simulated.py), what the schedule alone gives against what the machine took.
        pair = timeline_pair(spans, spec, r) if api.is_terminal(run["status"]) else None
        if pair is not None:
            for chart in timeline_pair_charts(pair):
                st.altair_chart(chart, width="stretch")
            st.caption(pair.caption)
        elif len(spans):
            # The guide's assembly-line picture, measured: the last timed step (all steps look alike).
            step = int(spans["step"].max())
            last = spans[spans["step"] == step]
            st.altair_chart(charts.timeline_chart(last, title=timeline_title(spec, step, last)), width="stretch")
        if run["ranks"]:
            ranks = api.rank_results(engine(), [run_id])
            a, b = st.columns(2)
            a.altair_chart(charts.rank_memory_chart(ranks), width="stretch")
            b.altair_chart(charts.rank_time_chart(ranks), width="stretch")
            held, spent = rank_tables(ranks)  # two HTML tables: narrow enough to show whole, headers wrapped
            st.table(held, hide_index=True)
            st.table(spent, hide_index=True)
        series = api.telemetry_series(engine(), [run_id])
        if len(series):
            a, b = st.columns(2)
            a.altair_chart(charts.telemetry_chart(series, "util_pct", "utilisation (%)"), width="stretch")
            b.altair_chart(charts.telemetry_chart(series, "mem_bytes", "memory (MiB)"), width="stretch")
            if (per_node := nodes_caption(series)) is not None:  # a multi-node run: every node, latest sample
                st.caption("Per node: " + per_node)
        if active and api.is_terminal(run["status"]):
            st.rerun()  # the whole page once more: stop refreshing, and logs below see the end

    live()
    with st.expander("Spec", expanded=False):
        st.json(run["spec"])
    script = api.job_script(run)
    if script is not None:
        with st.expander(f"Slurm job script (job {run.get('backend_job_id')})"):
            st.code(script, language="bash")
    with st.expander("Logs"):
        # The run folder when this machine ran it, else the tails its host's runner stored in the database.
        stored = api.log_tails(engine(), run_id)
        if run["run_dir"] or stored:
            rank = st.selectbox("rank", list(range(run["world_size"])), key=f"{K}logrank_{run_id}")
            st.caption(where_text(run, stored, api.this_host()))
            log = api.log(engine(), run, f"rank{rank}", tail_bytes=LOG_TAIL_BYTES, stored=stored)
            text, hidden = without_profiler_noise(log.text) if log.text is not None else ("(no output yet)", 0)
            if hidden and st.checkbox(f"show the profiler's {hidden} lines", key=f"{K}profiler_{run_id}",
                                      help="PyTorch's profiler prints them while the job measures its tensor peak"):  # fmt: skip
                text = log.text
            st.code(text)
            st.caption(f"The last {LOG_TAIL_BYTES // 1000} kB; the whole log: `python -m runner logs {run_id} "
                       f"--rank {rank}`")  # fmt: skip
        else:
            st.caption("The run has not started yet.")
    with st.expander("Notes and tags"):
        note = st.text_area("note", value=run["note"], key=f"{K}note_{run_id}")
        tags = st.text_input("tags", value=", ".join(run["tags"]), key=f"{K}tags_{run_id}")
        if st.button("Save", key=f"{K}save_{run_id}"):
            api.update_meta(engine(), run_id, note=note, tags=[t for t in tags.split(",")])
            st.toast("saved")
    with st.expander("Delete this run"):
        if run["status"] == "running":
            st.caption("Cancel the run before deleting it.")
        elif st.checkbox("Yes, delete it and everything measured for it", key=f"{K}confirm_{run_id}"):
            if st.button("Delete", type="primary", key=f"{K}delete_{run_id}"):
                api.delete(engine(), run_id)
                st.query_params.clear()
                st.rerun()


def runs_table(filters: api.RunFilter, offset: int) -> None:
    """The page of runs, CSV export and the comparison charts."""
    runs = api.list_runs(engine(), filters, limit=PAGE_SIZE, offset=offset)
    view = runs.copy()
    view["link"] = "?run=" + view["id"].astype(str)
    view["status"] = view["status"].map(status_label)
    view["tags"] = view["tags"].map(lambda t: ", ".join(t or []))
    view["model"] = [model_label(m, w) for m, w in zip(view["model"], view["weights"], strict=True)]
    view["peak_mem_mib"] = view["peak_mem_bytes_max"] / 2**20
    view["step_ms_p50"] = view["step_time_s_p50"] * 1e3  # in ms, as Compare and the run page give it
    view["ran_on"] = [ran_on(h, b) for h, b in zip(view["runner_host"], view["backend"], strict=True)]
    view["verify"] = [list_verdict(v, s) for v, s in zip(runs["verify"], runs["status"], strict=True)]
    view[["user", "note"]] = view[["user", "note"]].fillna("")  # no note is an empty cell, not a grey "None"
    st.dataframe(
        view,
        hide_index=True,
        column_order=[
            "link",
            "status",
            "strategy",
            "model",
            "workload",
            "verify",
            "world_size",
            "tp",
            "pp",
            "dp",
            "tokens_per_s",
            "step_ms_p50",
            "peak_mem_mib",
            "ran_on",
            "user",
            "tags",
            "created_at",
            "note",
        ],  # fmt: skip
        column_config={
            "link": st.column_config.LinkColumn("run", display_text=r"\?run=(\d+)"),
            "verify": st.column_config.TextColumn(
                "verify", help="the job's verdict against the single-device reference"
            ),
            "world_size": st.column_config.NumberColumn("ranks"),
            "tokens_per_s": st.column_config.NumberColumn("tokens/s", format="%.0f"),
            "step_ms_p50": st.column_config.NumberColumn("step p50 (ms)", format="%.2f"),
            "peak_mem_mib": st.column_config.NumberColumn("peak mem (MiB, max rank)", format="%.1f"),
            "created_at": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm:ss"),
            "ran_on": st.column_config.TextColumn(
                "ran on",
                help="the host whose runner ran it; (Slurm): submitted to "
                "that runner's Slurm cluster, its ranks on the cluster's nodes",
            ),
        },
    )
    st.download_button(
        "Export these runs as CSV", data="".join(api.export_csv(engine(), filters)), file_name="runs.csv",
        mime="text/csv", key=K + "csv",
    )  # fmt: skip
    done = runs[runs["tokens_per_s"].notna()]
    if len(done):
        a, b = st.columns(2)
        a.altair_chart(charts.throughput_chart(done), width="stretch")
        ranks = api.rank_results(engine(), [int(i) for i in done["id"].head(8)])
        if len(ranks):  # coloured by strategy, as the throughput beside it
            ranks = ranks.merge(done[["id", "strategy"]].rename(columns={"id": "run_id"}), on="run_id")
            b.altair_chart(charts.rank_memory_chart(ranks, colour="strategy"), width="stretch")


def run_list() -> None:
    st.title("History")
    total_all = api.count_runs(engine())
    if total_all == 0:
        st.info("No runs yet. Launch one from the Launch page, or start with a tiny layer split on 2 ranks:")
        if st.button("Launch a first tiny run", type="primary", key=K + "first"):
            spec = RunSpec(strategy="layer", pp=2, model="tiny", workload="train", steps=5, verify=True)
            run_id = api.submit(engine(), spec)
            st.query_params["run"] = str(run_id)
            st.rerun()
        return
    params = st.query_params
    with st.sidebar:
        st.header("Filters")
        chosen: dict[str, list[str]] = {}
        for name in FILTERS:
            options = api.filter_values(engine(), name)
            default = [v for v in params.get_all(name) if v in options]
            chosen[name] = st.multiselect(name, options, default=default, key=K + name)
        tag = st.text_input("tag", value=params.get("tag", ""), key=K + "tag")
        linked = [d for d in (parse_day(params.get("since")), parse_day(params.get("until"))) if d]
        days = st.date_input("created between", value=tuple(linked), key=K + "days", format="YYYY-MM-DD")
    since, until = day_range(days)
    for name, day in (("since", since), ("until", until)):
        if day:
            params[name] = day.isoformat()
        elif name in params:
            del params[name]
    for name in FILTERS:
        if chosen[name]:
            params[name] = chosen[name]
        elif name in params:
            del params[name]
    if tag:
        params["tag"] = tag
    elif "tag" in params:
        del params["tag"]
    filters = run_filter(chosen, tag, since, until)
    total = api.count_runs(engine(), filters)
    pages = max(1, -(-total // PAGE_SIZE))
    st.caption(f"{total} run matches the filters" if total == 1 else f"{total} runs match the filters, newest first")
    page = 1
    if pages > 1:
        page = st.columns(4)[0].number_input(
            f"page (of {pages})", min_value=1, max_value=pages, value=1, key=K + "page"
        )
    offset = (page - 1) * PAGE_SIZE
    active = api.count_runs(engine(), api.RunFilter(status=["queued", "running"])) > 0
    # Only while something is queued or running does the table refresh itself (every 2 s).
    st.fragment(runs_table, run_every=2.0 if active else None)(filters, offset)


run_param = st.query_params.get("run")
if run_param and run_param.isdigit():
    run_detail(int(run_param))
else:
    run_list()
