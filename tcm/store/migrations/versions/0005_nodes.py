"""Relay nodes (task servers, gateways) registered with this server.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("url", sa.String(512)),
        sa.Column("max_clients", sa.Integer),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("enrolled_at", sa.Float),
        sa.Column("token_hash", sa.String(64)),
        sa.Column("token_expires", sa.Float),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_table("nodes")
