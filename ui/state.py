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
