"""The administrator's model: targets, groups, inventory per data class, API tokens, audit.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "targets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("filter", sa.Text),
        sa.Column("agents", sa.JSON),
        sa.Column("description", sa.String(255), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
    )
    op.create_table(
        "agent_groups",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("description", sa.String(255), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "group_members",
        sa.Column(
            "group_name",
            sa.String(64),
            sa.ForeignKey("agent_groups.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("agent_id", sa.String(64), primary_key=True),
    )
    op.create_index("ix_group_members_agent", "group_members", ["agent_id"])
    op.create_table(
        "inventory",
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("class", sa.String(64), primary_key=True),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("collected_at", sa.Float, nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
    )
    op.create_index("ix_inventory_class_digest", "inventory", ["class", "digest"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("target", sa.String(64)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("expires_at", sa.Float),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_index("ix_api_tokens_name", "api_tokens", ["name"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object", sa.String(255), nullable=False, server_default=""),
        sa.Column("details", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_at", "audit_log")
    op.drop_table("audit_log")
    op.drop_index("ix_api_tokens_name", "api_tokens")
    op.drop_table("api_tokens")
    op.drop_index("ix_inventory_class_digest", "inventory")
    op.drop_table("inventory")
    op.drop_index("ix_group_members_agent", "group_members")
    op.drop_table("group_members")
    op.drop_table("agent_groups")
    op.drop_table("targets")
