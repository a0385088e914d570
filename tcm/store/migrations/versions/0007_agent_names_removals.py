"""Agents: display name, tags, deleted (hidden, history kept); enrollment tokens: revoked.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("display_name", sa.String(255)))
        batch.add_column(sa.Column("tags", sa.JSON))
        batch.add_column(
            sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.add_column(sa.Column("revoked_at", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("revoked_at")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("deleted")
        batch.drop_column("tags")
        batch.drop_column("display_name")
