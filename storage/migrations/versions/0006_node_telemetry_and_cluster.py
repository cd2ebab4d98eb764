"""telemetry_samples.host and runner_lease.cluster: samples taken on every node of a multi-node run, and the
Slurm partition a runner launches on

A Slurm run's ranks are sampled on their own nodes: each sample names the node it was taken on (existing
samples were all taken by the runner on its own host: NULL, read as the run's host). A runner started with
--backend slurm publishes its partition (nodes, CPUs, GPUs, states, read with sinfo) for the Launch page.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("telemetry_samples") as batch:
        batch.add_column(sa.Column("host", sa.String(length=128), nullable=True))
    with op.batch_alter_table("runner_lease") as batch:
        batch.add_column(sa.Column("cluster", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runner_lease") as batch:
        batch.drop_column("cluster")
    with op.batch_alter_table("telemetry_samples") as batch:
        batch.drop_column("host")
