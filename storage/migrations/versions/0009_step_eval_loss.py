"""step_metrics.eval_loss: the held-out loss of a run training on a corpus, on the steps its eval_every picks

A run on a corpus (the spec's `data`) measures its loss on the corpus's held-out split every eval_every steps;
the step event carries it beside the training loss. Earlier steps have none: NULL.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("step_metrics") as batch:
        batch.add_column(sa.Column("eval_loss", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("step_metrics") as batch:
        batch.drop_column("eval_loss")
