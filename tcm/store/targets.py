"""Named targets (a filter or a fixed list of agents) and agent groups with their members."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.store import schema as t
from tcm.store.errors import Conflict

if TYPE_CHECKING:
    from tcm.store.database import Database


class TargetStore:
    """The `targets`, `agent_groups` and `group_members` tables."""

    def __init__(self, db: Database):
        self._db = db

    # -- targets -----------------------------------------------------------------------
    def create_target(self, row: dict[str, Any]) -> Deferred[None]:
        """Insert a target; Conflict when the name is taken."""
        tg = t.targets

        def op(c: Connection) -> None:
            if c.execute(sa.select(tg.c.name).where(tg.c.name == row["name"])).first():
                raise Conflict(f"target {row['name']!r} exists")
            try:
                c.execute(tg.insert().values(**row))
            except sa.exc.IntegrityError:  # created meanwhile by another server process
                raise Conflict(f"target {row['name']!r} exists") from None

        return self._db.transaction(op)

    def get_target(self, name: str) -> Deferred[dict[str, Any] | None]:
        def q(c: Connection) -> dict[str, Any] | None:
            row = c.execute(sa.select(t.targets).where(t.targets.c.name == name)).first()
            return dict(row._mapping) if row else None

        return self._db.read(q)

    def list_targets(self) -> Deferred[list[dict[str, Any]]]:
        """Every target, by name."""
        return self._db.read(
            lambda c: [
                dict(r._mapping) for r in c.execute(sa.select(t.targets).order_by(t.targets.c.name))
            ]
        )

    def delete_target(self, name: str) -> Deferred[bool]:
        """Delete a target; False when there was none of that name."""
        return self._db.transaction(
            lambda c: c.execute(t.targets.delete().where(t.targets.c.name == name)).rowcount > 0
        )

    # -- groups ------------------------------------------------------------------------
    def create_group(
        self, name: str, description: str, now: float, agents: list[str]
    ) -> Deferred[None]:
        """Insert a group with its members; Conflict when the name is taken."""
        g, gm = t.agent_groups, t.group_members

        def op(c: Connection) -> None:
            if c.execute(sa.select(g.c.name).where(g.c.name == name)).first():
                raise Conflict(f"group {name!r} exists")
            try:
                c.execute(g.insert().values(name=name, description=description, created_at=now))
            except sa.exc.IntegrityError:  # created meanwhile by another server process
                raise Conflict(f"group {name!r} exists") from None
            if agents:
                c.execute(gm.insert(), [dict(group_name=name, agent_id=a) for a in agents])

        return self._db.transaction(op)

    def list_groups(self) -> Deferred[list[dict[str, Any]]]:
        """Every group by name, each with its number of `members`."""
        g, gm = t.agent_groups, t.group_members

        def q(c: Connection) -> list[dict[str, Any]]:
            counts: dict[str, int] = {
                r[0]: r[1]
                for r in c.execute(
                    sa.select(gm.c.group_name, sa.func.count()).group_by(gm.c.group_name)
                )
            }
            return [
                {**dict(r._mapping), "members": counts.get(r.name, 0)}
                for r in c.execute(sa.select(g).order_by(g.c.name))
            ]

        return self._db.read(q)

    def get_group(self, name: str) -> Deferred[dict[str, Any] | None]:
        """A group with its member `agents` (sorted), or None."""
        g, gm = t.agent_groups, t.group_members

        def q(c: Connection) -> dict[str, Any] | None:
            row = c.execute(sa.select(g).where(g.c.name == name)).first()
            if row is None:
                return None
            members = c.execute(
                sa.select(gm.c.agent_id).where(gm.c.group_name == name).order_by(gm.c.agent_id)
            )
            return {**dict(row._mapping), "agents": [r.agent_id for r in members]}

        return self._db.read(q)

    def delete_group(self, name: str) -> Deferred[bool]:
        """Delete a group and its memberships; False when there was none of that name."""
        g, gm = t.agent_groups, t.group_members

        def op(c: Connection) -> bool:
            c.execute(gm.delete().where(gm.c.group_name == name))
            return c.execute(g.delete().where(g.c.name == name)).rowcount > 0

        return self._db.transaction(op)

    def change_group(self, name: str, add: list[str], remove: list[str]) -> Deferred[bool]:
        """Add and remove members; False when there is no such group."""
        g, gm = t.agent_groups, t.group_members

        def op(c: Connection) -> bool:
            if c.execute(sa.select(g.c.name).where(g.c.name == name)).first() is None:
                return False
            if remove:
                c.execute(
                    gm.delete().where(gm.c.group_name == name).where(gm.c.agent_id.in_(remove))
                )
            if add:
                have = {
                    r.agent_id
                    for r in c.execute(
                        sa.select(gm.c.agent_id)
                        .where(gm.c.group_name == name)
                        .where(gm.c.agent_id.in_(add))
                    )
                }
                new = [a for a in dict.fromkeys(add) if a not in have]
                if new:
                    c.execute(gm.insert(), [dict(group_name=name, agent_id=a) for a in new])
            return True

        return self._db.transaction(op)

    def group_memberships(self) -> Deferred[dict[str, list[str]]]:
        """agent id -> the names of its groups."""
        gm = t.group_members

        def q(c: Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            for r in c.execute(sa.select(gm).order_by(gm.c.group_name)):
                out.setdefault(r.agent_id, []).append(r.group_name)
            return out

        return self._db.read(q)
