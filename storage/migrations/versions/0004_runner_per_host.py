"""a runner per host: one lease per host name, runs say where they may run and where they ran, log tails

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The one lease (id 1) becomes one lease per host; an existing row keeps serving its host.
    with op.batch_alter_table("runner_lease") as batch:
        batch.create_unique_constraint(batch.f("uq_runner_lease_host"), ["host"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("target_host", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("runner_host", sa.String(length=128), nullable=True))
    op.create_table(
        "run_logs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_run_logs_run_id_runs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_run_logs")),
        sa.UniqueConstraint("run_id", "name", name=op.f("uq_run_logs_run_id")),
    )


def downgrade() -> None:
    op.drop_table("run_logs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("runner_host")
        batch.drop_column("target_host")
    with op.batch_alter_table("runner_lease") as batch:
        batch.drop_constraint(batch.f("uq_runner_lease_host"), type_="unique")
