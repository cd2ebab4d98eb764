"""Streamlit entry: navigation over pages/, the runner's heartbeat in the sidebar, and the runner kept alive.

The runner is a separate process (`python -m runner serve`); this only starts one when no live
runner serves the database, so restarting the app never stops a job.
"""

from __future__ import annotations

import streamlit as st

from runner.service import ensure_runner
from storage import queries
from storage.db import database_url
from ui.format import human_duration
from ui.state import engine

st.set_page_config(page_title="Parallel GPT Lab", page_icon=":material/hub:", layout="wide")

ensure_runner(database_url())


@st.fragment(run_every=2.0)
def runner_badge() -> None:
    status = queries.runner_status(engine())
    if status and status["alive"]:
        st.success(f"Runner alive, last seen {human_duration(max(status['age_s'], 0.0))} ago",
                   icon=":material/check_circle:")  # fmt: skip
        st.caption(status["gpu_note"])
    else:
        st.warning("No runner is serving this database yet; it is starting.", icon=":material/hourglass_top:")


with st.sidebar:
    runner_badge()

pages = [
    st.Page("pages/launch.py", title="Launch", icon=":material/rocket_launch:", default=True),
    st.Page("pages/history.py", title="History", icon=":material/history:", url_path="history"),
]
st.navigation(pages).run()
