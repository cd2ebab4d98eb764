"""What pages share across reruns: the database engine (cached; never the runner, which is its own process)."""

from __future__ import annotations

import streamlit as st
from sqlalchemy import Engine

from storage.db import database_url, get_engine


@st.cache_resource(show_spinner=False)
def _engine_for(url: str) -> Engine:
    return get_engine(url)


def engine() -> Engine:
    return _engine_for(database_url())


def enter_through_app() -> None:
    """Call first in every page: make sure app.py (navigation, runner, heartbeat) runs around the page.

    With a `pages/` folder beside app.py, a fresh server is in Streamlit's old folder-based multipage
    mode until some session runs app.py's st.navigation. If the first visit is a deep link such as
    /history?run=5, Streamlit runs pages/history.py on its own: no runner is started and the sidebar
    lists every file. Leaving that mode and rerunning executes app.py, which routes back to this same
    page (page identity is its url path) with the query string intact.
    """
    from streamlit.runtime.pages_manager import PagesManager

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False  # exactly what st.navigation does on its first call
        st.rerun()
