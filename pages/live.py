"""Live page: runs in progress (progress, elapsed and remaining time, telemetry, log tail, cancel) and the queue."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import streamlit as st

from runner import api
from runner.spec.records import TERMINAL_STATUSES
from runner.spec.run_spec import model_label
from ui import charts
from ui.format import ranks_text, status_label
from ui.hosts import last_lines, stored_logs_caption
from ui.nodes import nodes_caption
from ui.run_detail import RECENT_S, live_progress, progress_html, recently_ended
from ui.state import engine, enter_through_app

enter_through_app()  # a deep link on a fresh server would otherwise skip app.py

K = "live_"

st.title("Live")


@st.fragment(run_every=1.0)
def live_view() -> None:
    active = api.active_runs(engine())
    running = active[active["status"] == "running"]
    queued = active[active["status"] == "queued"]
    if active.empty:
        st.info("Nothing is running or queued. Launch a run and it appears here.")
    for row in running.itertuples():
        run = api.get_run(engine(), int(row.id))
        with st.container(border=True):
            head, button = st.columns([5, 1])
            head.markdown(f"**[#{row.id}](/history?run={row.id})** {row.strategy} · "
                          f"{model_label(row.model, row.weights)} · {row.workload} · {ranks_text(row.world_size)} · "
                          f"{row.user}")  # fmt: skip
            if row.cancel_requested:
                button.caption("cancelling…")
            elif button.button("Cancel", key=f"{K}cancel_{row.id}"):
                api.cancel(engine(), int(row.id))
                st.toast(f"cancelling run {row.id}")
            steps = api.step_metrics(engine(), int(row.id))["step_time_s"].tolist()
            warmup = int(run["spec"].get("warmup", 0)) if run else 0
            frac, text = live_progress(row.started_at, steps, int(row.progress_step), int(row.total_steps),
                                       datetime.now(UTC), warmup)  # fmt: skip
            st.html(progress_html(frac, text))
            series = api.telemetry_series(engine(), [int(row.id)])
            if not series.empty:
                a, b = st.columns(2)
                a.altair_chart(charts.telemetry_chart(series, "util_pct", "utilisation (%)"), width="stretch")
                b.altair_chart(charts.telemetry_chart(series, "mem_bytes", "memory (MiB)"), width="stretch")
                if (per_node := nodes_caption(series)) is not None:  # a multi-node run: every node, latest sample
                    st.caption("Per node: " + per_node)
            # Ranks' last lines: from the run folder when it ran here, else from the tails its host stored.
            stored = api.log_tails(engine(), int(row.id)) if run else {}
            if run and (run["run_dir"] or stored):
                logs = [
                    api.log(engine(), run, f"rank{r}", tail_bytes=4000, stored=stored) for r in range(run["world_size"])
                ]
                if (caption := stored_logs_caption(run, stored, api.this_host())) is not None:
                    st.caption(caption)
                st.code(last_lines(logs, 5) or "(no output yet)", language=None)
    if not queued.empty:
        st.subheader("Queue")
        for row in queued.itertuples():
            c1, c2 = st.columns([5, 1])
            c1.markdown(f"{status_label('queued')} **#{row.id}** {row.strategy} · {model_label(row.model, row.weights)} · "
                        f"{ranks_text(row.world_size)} "
                        f"— {row.wait_reason or 'waiting for the runner'}")  # fmt: skip
            if c2.button("Cancel", key=f"{K}cancelq_{row.id}"):
                api.cancel(engine(), int(row.id))
    ended = api.list_runs(engine(), api.RunFilter(status=[s.value for s in TERMINAL_STATUSES]), limit=10)
    if lines := recently_ended(ended.to_dict("records"), datetime.now(UTC)):
        st.subheader(f"Ended in the last {RECENT_S // 60} minutes")
        st.markdown("\n".join(f"- {line}" for line in lines))
    st.caption(f"updated {time.strftime('%H:%M:%S')}")


live_view()
