"""Streamlit entry: navigation over pages/, the runner's heartbeat in the sidebar, and the runner kept alive.

The runner is a separate process (`python -m runner serve`); this only starts one when no live
runner serves the database, so restarting the app never stops a job.
"""

from __future__ import annotations

import streamlit as st

from runner import api
from ui.format import human_age
from ui.state import engine

st.set_page_config(page_title="Parallel GPT Lab", page_icon=":material/hub:", layout="wide")

api.ensure_runner()


@st.fragment(run_every=2.0)
def runner_badge() -> None:
    """The runner's heartbeat; refreshes by itself so a runner that dies shows up without a click."""
    status = api.runner_status(engine())
    if status and status["alive"]:
        st.success(f"Runner alive, last seen {human_age(status['age_s'])} ago", icon=":material/check_circle:")
        gpus = status["gpus"]
        st.caption(
            f"{len(gpus)} GPU(s): {', '.join(g['name'] for g in gpus)}"
            if gpus
            else "No GPU: runs use CPU processes (gloo)"
        )
    elif status:
        st.warning(f"Runner not responding, last seen {human_age(status['age_s'])} ago", icon=":material/warning:")
        # Only on a click: a fragment that spawned a runner every 2 s would race the one still starting.
        if st.button("Start a runner", key="app_start_runner"):
            api.ensure_runner()
            st.toast("runner starting")
    else:
        st.info("Starting the runner…", icon=":material/hourglass_top:")


with st.sidebar:
    runner_badge()

pages = [
    st.Page("pages/launch.py", title="Launch", icon=":material/rocket_launch:", default=True),
    st.Page("pages/history.py", title="History", icon=":material/history:", url_path="history"),
    st.Page("pages/live.py", title="Live", icon=":material/monitor_heart:", url_path="live"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("pages/planner.py", title="Planner", icon=":material/architecture:", url_path="planner"),
]
st.navigation(pages).run()
