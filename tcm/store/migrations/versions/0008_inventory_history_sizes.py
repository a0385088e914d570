"""Inventory stored once: a version number per class and a bounded history of earlier
versions; the bytes of each job target's result, for retention by size.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("inventory") as batch:
        batch.add_column(sa.Column("version", sa.Integer, nullable=False, server_default="1"))
    op.create_table(
        "inventory_history",
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("class", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("collected_at", sa.Float, nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
        sa.Column("replaced_at", sa.Float, nullable=False),
    )
    with op.batch_alter_table("job_targets") as batch:
        batch.add_column(sa.Column("result_bytes", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("job_targets") as batch:
        batch.drop_column("result_bytes")
    op.drop_table("inventory_history")
    with op.batch_alter_table("inventory") as batch:
        batch.drop_column("version")
