"""Tables of the tcm store (SQLAlchemy Core). Migrations in tcm/store/migrations mirror these."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("hostname", sa.String(255), nullable=False, server_default=""),
    sa.Column("platform", sa.String(255), nullable=False, server_default=""),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("enrolled_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float),
    sa.Column("capabilities", sa.JSON, nullable=False, default=list),
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    # False while an admin has not approved it (with the require_approval setting on)
    sa.Column("approved", sa.Boolean, nullable=False, server_default=sa.true()),
    # an admin's name for it (NULL: its hostname) and tags {key: value} (revision 0007)
    sa.Column("display_name", sa.String(255)),
    sa.Column("tags", sa.JSON),
    # deleted: revoked and hidden from listings; its jobs and audit entries are kept
    sa.Column("deleted", sa.Boolean, nullable=False, server_default=sa.false()),
)

enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # public part, shown in listings
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),  # NULL: never
    sa.Column("uses_left", sa.Integer),  # NULL: unlimited
    sa.Column("used", sa.Integer, nullable=False, server_default="0"),
    sa.Column("description", sa.String(255), nullable=False, server_default=""),
    sa.Column("profile", sa.String(64)),  # agents enrolling with it get this profile (0004)
    sa.Column("revoked_at", sa.Float),  # withdrawn by an admin: refused from then on (0007)
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("timeout", sa.Float),
    sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
)

job_targets = sa.Table(
    "job_targets",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id"), primary_key=True),
    sa.Column("agent_id", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
    sa.Column("received_at", sa.Float),  # reported by the agent
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.Text),
    # bytes of the result's JSON and error (what retention by size counts)
    sa.Column("result_bytes", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_job_targets_agent_state", "agent_id", "state"),
    sa.Index("ix_job_targets_state", "state"),
)

job_output = sa.Table(
    "job_output",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("agent_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("stream", sa.String(16), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.UniqueConstraint("job_id", "agent_id", "seq", name="uq_job_output_seq"),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.JSON, nullable=False),
)

# -- policies and connection profiles (migration 0004) ----------------------------------
policies = sa.Table(
    "policies",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("document", sa.JSON, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

policy_assignments = sa.Table(
    "policy_assignments",
    metadata,
    sa.Column(
        "policy",
        sa.String(64),
        sa.ForeignKey("policies.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("target", sa.String(64), primary_key=True),
)

profiles = sa.Table(
    "profiles",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("settings", sa.JSON, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

profile_assignments = sa.Table(
    "profile_assignments",
    metadata,
    sa.Column(
        "profile",
        sa.String(64),
        sa.ForeignKey("profiles.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("target", sa.String(64), primary_key=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
)

# What each agent reported it runs: its profile and each policy's version and state, and
# the profile its enrollment token named.
agent_config = sa.Table(
    "agent_config",
    metadata,
    sa.Column("agent_id", sa.String(64), primary_key=True),
    sa.Column("enrollment_profile", sa.String(64)),
    sa.Column("profile", sa.String(64)),
    sa.Column("profile_version", sa.Integer),
    sa.Column("policies", sa.JSON, nullable=False, default=dict),
    sa.Column("reported_at", sa.Float),
)

# -- the administrator's model (revision 0003) --------------------------------------------

targets = sa.Table(
    "targets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("filter", sa.Text),  # a filter expression, evaluated live ...
    sa.Column("agents", sa.JSON),  # ... or a fixed list of agent ids
    sa.Column("description", sa.String(255), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
)

agent_groups = sa.Table(
    "agent_groups",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("description", sa.String(255), nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)

group_members = sa.Table(
    "group_members",
    metadata,
    sa.Column(
        "group_name",
        sa.String(64),
        sa.ForeignKey("agent_groups.name", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("agent_id", sa.String(64), primary_key=True),
    sa.Index("ix_group_members_agent", "agent_id"),
)

inventory = sa.Table(
    "inventory",
    metadata,
    sa.Column("agent_id", sa.String(64), primary_key=True),
    sa.Column("class", sa.String(64), primary_key=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("collected_at", sa.Float, nullable=False),
    sa.Column("changed_at", sa.Float, nullable=False),
    # 1 for the first version of the class collected from the agent, +1 at each change
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Index("ix_inventory_class_digest", "class", "digest"),
)

# The versions of a class an agent had before its current one (in `inventory`), the last
# --inventory-history of each (agent, class).
inventory_history = sa.Table(
    "inventory_history",
    metadata,
    sa.Column("agent_id", sa.String(64), primary_key=True),
    sa.Column("class", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("collected_at", sa.Float, nullable=False),
    sa.Column("changed_at", sa.Float, nullable=False),
    sa.Column("replaced_at", sa.Float, nullable=False),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # public part of the token
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("target", sa.String(64)),  # NULL: not scoped
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
    sa.Column("expires_at", sa.Float),  # NULL: never
    sa.Column("revoked_at", sa.Float),
    sa.Index("ix_api_tokens_name", "name"),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("object", sa.String(255), nullable=False, server_default=""),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Index("ix_audit_log_at", "at"),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("url", sa.String(512)),  # where agents reach it (reported by the node)
    sa.Column("max_clients", sa.Integer),  # NULL: the server's default
    sa.Column("fingerprint", sa.String(64)),  # of its certificate, once enrolled
    # of the certificate it renewed last: accepted too until it expires
    sa.Column("previous_fingerprint", sa.String(64)),
    sa.Column("registered_at", sa.Float, nullable=False),
    sa.Column("enrolled_at", sa.Float),
    sa.Column("token_hash", sa.String(64)),  # one-time enrollment secret, until used
    sa.Column("token_expires", sa.Float),
    sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
)

# -- a cluster of server nodes on one database (revision 0009) ------------------------------
cluster_secrets = sa.Table(
    "cluster_secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    # the CA key sealed with the cluster key (Fernet); the CA certificate and admin token
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False, server_default=""),
)

cluster_nodes = sa.Table(
    "cluster_nodes",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("address", sa.String(255), nullable=False, server_default=""),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("core", sa.Integer, nullable=False, server_default="0"),
    sa.Column("task", sa.Integer, nullable=False, server_default="0"),
    sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
    sa.Column("bus", sa.String(16), nullable=False, server_default="down"),
    sa.Column("stopped", sa.Boolean, nullable=False, server_default=sa.false()),
)
