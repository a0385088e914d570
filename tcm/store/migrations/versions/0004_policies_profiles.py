"""Policies, connection profiles, their assignments to targets, what agents report running,
and the profile an enrollment token gives.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("document", sa.JSON, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "policy_assignments",
        sa.Column(
            "policy",
            sa.String(64),
            sa.ForeignKey("policies.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("target", sa.String(64), primary_key=True),
    )
    op.create_table(
        "profiles",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "profile_assignments",
        sa.Column(
            "profile",
            sa.String(64),
            sa.ForeignKey("profiles.name", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("target", sa.String(64), primary_key=True),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "agent_config",
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("enrollment_profile", sa.String(64)),
        sa.Column("profile", sa.String(64)),
        sa.Column("profile_version", sa.Integer),
        sa.Column("policies", sa.JSON, nullable=False),
        sa.Column("reported_at", sa.Float),
    )
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.add_column(sa.Column("profile", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_tokens") as batch:
        batch.drop_column("profile")
    op.drop_table("agent_config")
    op.drop_table("profile_assignments")
    op.drop_table("profiles")
    op.drop_table("policy_assignments")
    op.drop_table("policies")
