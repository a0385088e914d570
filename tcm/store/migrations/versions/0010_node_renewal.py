"""Nodes renew their certificates: the one renewed last stays accepted until it expires.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("previous_fingerprint", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("previous_fingerprint")
