"""calibrations and plan_predictions: the planner's measured host figures and the predictions runs were launched with

`python -m runner calibrate` (runner/planner/calibrate.py) measures a host's matmul rate and all-reduce
bandwidth; the planner uses the newest row of a host in place of published peaks. A run launched from a plan
(the Planner page's "Launch this layout") keeps what the planner predicted for it (memory per rank, step time,
bubble), so Compare can put prediction beside measurement. Both tables: storage/calibration.py.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=128), nullable=False),
        sa.Column("device", sa.String(length=16), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("matmul_flops", sa.Float(), nullable=False),
        sa.Column("allreduce_bytes_per_s", sa.Float(), nullable=True),
        sa.Column("allreduce_ranks", sa.Integer(), nullable=True),
        sa.Column("backend", sa.String(length=16), nullable=True),
        sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
    )
    op.create_index("ix_calibrations_host", "calibrations", ["host", "measured_at"])
    op.create_table(
        "plan_predictions",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prediction", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_plan_predictions_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_plan_predictions")),
    )


def downgrade() -> None:
    op.drop_table("plan_predictions")
    op.drop_index("ix_calibrations_host", table_name="calibrations")
    op.drop_table("calibrations")
