"""Enrolled agents: identity, approval, revocation, last seen, and what each reports it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database, WriteQueue


class AgentStore:
    """The `agents` and `agent_config` tables. Last-seen times and reported configuration
    go through the write queue (many per second while agents come and go)."""

    def __init__(self, db: Database, writes: WriteQueue):
        self._db = db
        self._writes = writes
        writes.register(
            "seen",
            t.agents.update()
            .where(t.agents.c.id == sa.bindparam("agent"))
            .values(last_seen=sa.bindparam("at")),
        )

    def add_agent(
        self, agent_id: str, hostname: str, fingerprint: str, now: float, approved: bool = True
    ) -> Deferred[None]:
        """Insert a newly enrolled agent."""
        row = dict(
            id=agent_id,
            hostname=hostname,
            fingerprint=fingerprint,
            enrolled_at=now,
            capabilities=[],
            approved=approved,
        )

        def op(c: Connection) -> None:
            c.execute(t.agents.insert().values(**row))

        return self._db.transaction(op)

    def approve_agent(self, agent_id: str) -> Deferred[None]:
        def op(c: Connection) -> None:
            c.execute(t.agents.update().where(t.agents.c.id == agent_id).values(approved=True))

        return self._db.transaction(op)

    def revoke_agent(self, agent_id: str) -> Deferred[None]:
        def op(c: Connection) -> None:
            c.execute(t.agents.update().where(t.agents.c.id == agent_id).values(revoked=True))

        return self._db.transaction(op)

    def set_agent_label(
        self, agent_id: str, display_name: str | None, tags: dict[str, str]
    ) -> Deferred[None]:
        """Set an agent's display name (None: its hostname) and its tags."""

        def op(c: Connection) -> None:
            c.execute(
                t.agents.update()
                .where(t.agents.c.id == agent_id)
                .values(display_name=display_name, tags=tags)
            )

        return self._db.transaction(op)

    def delete_agent(self, agent_id: str) -> Deferred[None]:
        """Revoke an agent and hide it from listings; its jobs and audit entries stay."""

        def op(c: Connection) -> None:
            c.execute(
                t.agents.update()
                .where(t.agents.c.id == agent_id)
                .values(revoked=True, deleted=True)
            )

        return self._db.transaction(op)

    def agent_seen(
        self,
        agent_id: str,
        now: float,
        hostname: str | None = None,
        platform: str | None = None,
        capabilities: list | None = None,
    ) -> Deferred[None]:
        """Record an agent seen at `now` (and what its hello said, when given)."""
        if hostname is None and platform is None and capabilities is None:
            return self._writes.add("seen", [{"agent": agent_id, "at": now}])
        values: dict[str, Any] = {"last_seen": now}
        if hostname is not None:
            values["hostname"] = hostname
        if platform is not None:
            values["platform"] = platform
        if capabilities is not None:
            values["capabilities"] = capabilities

        def op(c: Connection) -> None:
            c.execute(t.agents.update().where(t.agents.c.id == agent_id).values(**values))

        return self._writes.submit(op)

    def agents_seen(self, agent_ids: list[str], now: float) -> Deferred[None]:
        """Many agents seen at `now`: one batched write (a stop closing every session)."""
        return self._writes.add("seen", [{"agent": a, "at": now} for a in agent_ids])

    def get_agent(self, agent_id: str) -> Deferred[dict[str, Any] | None]:
        def q(c: Connection) -> dict[str, Any] | None:
            row = c.execute(sa.select(t.agents).where(t.agents.c.id == agent_id)).first()
            return dict(row._mapping) if row else None

        return self._db.read(q)

    def list_agents(self) -> Deferred[list[dict[str, Any]]]:
        """Every agent (revoked ones too), in the order they enrolled."""
        return self._db.read(
            lambda c: [
                dict(r._mapping)
                for r in c.execute(sa.select(t.agents).order_by(t.agents.c.enrolled_at))
            ]
        )

    #: the agent states a page can be of (as the admin API's views say them), in columns
    PAGE_STATES = ("ok", "awaiting approval", "revoked")

    def agents_page(
        self,
        after: str | None,
        limit: int,
        include_deleted: bool = False,
        state: str | None = None,
    ) -> Deferred[tuple[list[dict[str, Any]], str | None]]:
        """A page of the agents in id order: at most `limit` after agent id `after`, and the
        `after` of the next page (None: this is the last). `state`: only those whose view
        says it (a deleted agent's state is "deleted", then "revoked", then "awaiting
        approval" for one not approved, else "ok"). One indexed range read: a page of 1,000
        costs the same at 10,000 agents as at 1,000."""
        a = t.agents.c
        q = sa.select(t.agents).order_by(a.id).limit(limit + 1)
        if after is not None:
            q = q.where(a.id > after)
        if not include_deleted or state is not None:
            q = q.where(a.deleted == sa.false())
        if state == "revoked":
            q = q.where(a.revoked == sa.true())
        elif state == "awaiting approval":
            q = q.where(a.revoked == sa.false(), a.approved == sa.false())
        elif state == "ok":
            q = q.where(a.revoked == sa.false(), a.approved == sa.true())
        elif state is not None:
            raise ValueError(f"no page of agents in state {state!r}")

        def read(c: Connection) -> tuple[list[dict[str, Any]], str | None]:
            rows = [dict(r._mapping) for r in c.execute(q)]
            if len(rows) > limit:
                return rows[:limit], rows[limit - 1]["id"]
            return rows, None

        return self._db.read(read)

    def agent_ids(self, include_revoked: bool = False) -> Deferred[list[str]]:
        q = sa.select(t.agents.c.id)
        if not include_revoked:
            q = q.where(t.agents.c.revoked == sa.false())
        return self._db.read(lambda c: [r.id for r in c.execute(q)])

    # -- what each agent reports it runs ----------------------------------------------
    def load_agent_config(self) -> Deferred[list[dict[str, Any]]]:
        """Every agent_config row (profile, policy versions and states, enrollment profile)."""
        return self._db.read(
            lambda c: [dict(r._mapping) for r in c.execute(sa.select(t.agent_config))]
        )

    def set_agent_config(self, agent_id: str, **values: Any) -> Deferred[None]:
        """Set columns of an agent's agent_config row (made when missing)."""

        def op(c: Connection) -> None:
            ac = t.agent_config
            updated = c.execute(ac.update().where(ac.c.agent_id == agent_id).values(**values))
            if updated.rowcount == 0:
                c.execute(ac.insert().values(agent_id=agent_id, **{"policies": {}, **values}))

        return self._writes.submit(op)
