"""Alembic environment: uses the engine handed over by storage.migrate; batch mode for SQLite ALTERs."""

from __future__ import annotations

from alembic import context

import storage.calibration  # noqa: F401 -- the planner's tables (revision 0007) on Base.metadata
from storage.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
    )
    context.run_migrations()
