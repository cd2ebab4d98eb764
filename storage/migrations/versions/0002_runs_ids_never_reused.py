"""runs ids are never reused on SQLite (AUTOINCREMENT)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite hands a deleted newest row's id out again unless the table is AUTOINCREMENT, which only a
    # rebuild can add; the batch rebuild copies every row. PostgreSQL sequences never reuse ids.
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("runs", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("runs", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
