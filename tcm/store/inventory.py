"""Inventory: per agent and class, the data last collected, its digest and times."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database, WriteQueue


class InventoryStore:
    """The `inventory` table. Collections are written through the write queue, in the same
    transaction as the result of the job that collected them."""

    def __init__(self, db: Database, writes: WriteQueue):
        self._db = db
        self._writes = writes

    def store_inventory(self, agent_id: str, collected: Any, now: float) -> Deferred[None]:
        """Write an inventory.Collected through the write queue (with the job's result).

        A class the agent sent in full replaces the stored one; a class it found unchanged
        keeps its data and gets the new collection time. An unchanged class whose digest the
        server holds for another agent only (the refresh job listed every digest held) takes
        that agent's data: equal digests, equal data."""
        inv = t.inventory

        def upsert(c: Connection, cls: str, data: Any, digest: str) -> None:
            where = (inv.c.agent_id == agent_id) & (inv.c["class"] == cls)
            row = c.execute(sa.select(inv.c.digest, inv.c.collected_at).where(where)).first()
            at = collected.collected_at
            if row is None:
                values = {"agent_id": agent_id, "class": cls, "data": data, "digest": digest}
                c.execute(inv.insert().values(**values, collected_at=at, changed_at=now))
            elif row.digest == digest:  # unchanged: newer collection time only
                c.execute(inv.update().where(where).values(collected_at=max(row.collected_at, at)))
            else:
                c.execute(
                    inv.update()
                    .where(where)
                    .values(data=data, digest=digest, collected_at=at, changed_at=now)
                )

        def op(c: Connection) -> None:
            for cls, (data, digest) in collected.changed.items():
                upsert(c, cls, data, digest)
            for cls, digest in collected.unchanged.items():
                mine = c.execute(
                    sa.select(inv.c.digest)
                    .where(inv.c.agent_id == agent_id)
                    .where(inv.c["class"] == cls)
                ).first()
                if mine is not None and mine.digest == digest:
                    upsert(c, cls, None, digest)
                    continue
                other = c.execute(
                    sa.select(inv.c.data)
                    .where(inv.c["class"] == cls)
                    .where(inv.c.digest == digest)
                    .limit(1)
                ).first()
                if other is not None:
                    upsert(c, cls, other.data, digest)
                # else: nothing to go by; the class stays stale and is asked again in full

        return self._writes.submit(op)

    def get_inventory(self, agent_id: str) -> Deferred[dict[str, dict[str, Any]]]:
        """class -> {data, digest, collected_at, changed_at} of one agent."""
        inv = t.inventory

        def q(c: Connection) -> dict[str, dict[str, Any]]:
            return {
                r._mapping["class"]: {
                    "data": r.data,
                    "digest": r.digest,
                    "collected_at": r.collected_at,
                    "changed_at": r.changed_at,
                }
                for r in c.execute(sa.select(inv).where(inv.c.agent_id == agent_id))
            }

        return self._db.read(q)

    def inventory_data(self, classes: Iterable[str]) -> Deferred[dict[str, dict[str, Any]]]:
        """agent id -> {class: data} for the given classes (what filters read)."""
        inv = t.inventory
        wanted = sorted(set(classes))

        def q(c: Connection) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            if not wanted:
                return out
            rows = c.execute(
                sa.select(inv.c.agent_id, inv.c["class"], inv.c.data).where(
                    inv.c["class"].in_(wanted)
                )
            )
            for r in rows:
                out.setdefault(r.agent_id, {})[r._mapping["class"]] = r.data
            return out

        return self._db.read(q)

    def inventory_times(self) -> Deferred[dict[tuple[str, str], tuple[float, str]]]:
        """(agent, class) -> (collected_at, digest) of every stored class."""
        inv = t.inventory

        def q(c: Connection) -> dict[tuple[str, str], tuple[float, str]]:
            return {
                (r.agent_id, r._mapping["class"]): (r.collected_at, r.digest)
                for r in c.execute(
                    sa.select(inv.c.agent_id, inv.c["class"], inv.c.collected_at, inv.c.digest)
                )
            }

        return self._db.read(q)
