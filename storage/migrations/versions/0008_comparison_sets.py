"""runs.set_id: the comparison set a run was queued in (`submit --repeat K`, Launch's Repeat, Compare's Repeat)

A set's runs are queued interleaved (A B C A B C ...) and the runner runs them one at a time in that
order, so each spec meets the same machine. The set's id is the id of its first run; runs queued alone, and
every run stored before this revision, have none.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("set_id", sa.Integer(), nullable=True))
        batch.create_index("ix_runs_set_id", ["set_id"])


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_set_id")
        batch.drop_column("set_id")
