"""Initial schema: agents, enrollment tokens, jobs, job targets, job output, settings.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False, server_default=""),
        sa.Column("platform", sa.String(255), nullable=False, server_default=""),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("enrolled_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float),
        sa.Column("capabilities", sa.JSON, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float),
        sa.Column("uses_left", sa.Integer),
        sa.Column("used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("description", sa.String(255), nullable=False, server_default=""),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("args", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("timeout", sa.Float),
        sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
    )
    op.create_table(
        "job_targets",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id"), primary_key=True),
        sa.Column("agent_id", sa.String(64), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("delivered_at", sa.Float),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_job_targets_agent_state", "job_targets", ["agent_id", "state"])
    op.create_index("ix_job_targets_state", "job_targets", ["state"])
    op.create_table(
        "job_output",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("stream", sa.String(16), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.UniqueConstraint("job_id", "agent_id", "seq", name="uq_job_output_seq"),
    )
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    for name in ("settings", "job_output", "job_targets", "jobs", "enrollment_tokens", "agents"):
        op.drop_table(name)
