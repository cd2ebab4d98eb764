"""runs.backend and runs.backend_job_id: where a run was launched (local torchrun, Slurm) and that backend's id

Existing runs were all launched locally: they get backend "local" and, when they have one, their
torchrun pid as the backend's job id.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("backend", sa.String(length=16), nullable=False, server_default="local"))
        batch.add_column(sa.Column("backend_job_id", sa.String(length=64), nullable=True))
    runs = sa.table("runs", sa.column("pid", sa.Integer()), sa.column("backend_job_id", sa.String(64)))
    op.execute(runs.update().where(runs.c.pid.isnot(None)).values(backend_job_id=sa.cast(runs.c.pid, sa.String(64))))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("backend_job_id")
        batch.drop_column("backend")
