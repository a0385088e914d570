"""The cluster's shared rows: secrets every node takes from the first (`cluster_secrets`)
and the server nodes with their heartbeats (`cluster_nodes`).

The secrets are claimed once: the first node's INSERT wins, every later node (and a node
racing it) reads what the winner wrote. That runs at startup before the reactor, on the
engine (`claim_secret`); the heartbeats run on the database's thread pool like every other
component.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from twisted.internet.defer import Deferred

from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database


def read_secret(engine: Engine, name: str) -> str | None:
    """A cluster secret's stored value, or None."""
    cs = t.cluster_secrets
    with engine.connect() as c:
        row = c.execute(sa.select(cs.c.value).where(cs.c.name == name)).first()
    return None if row is None else str(row.value)


def claim_secret(engine: Engine, name: str, value: str, now: float, by: str) -> str:
    """Store `value` as the cluster secret `name` unless a node did first; the value that
    holds (this one or the first node's)."""
    cs = t.cluster_secrets
    try:
        with engine.begin() as c:
            c.execute(cs.insert().values(name=name, value=value, created_at=now, created_by=by))
        return value
    except sa.exc.IntegrityError:
        stored = read_secret(engine, name)
        if stored is None:  # pragma: no cover - a row that vanished: nobody deletes them
            raise
        return stored


class ClusterStore:
    """The `cluster_nodes` table: each node's heartbeat and session counts."""

    def __init__(self, db: Database):
        self._db = db

    def heartbeat(self, name: str, values: dict[str, Any]) -> Deferred[None]:
        """Write a node's row (made on its first heartbeat)."""
        cn = t.cluster_nodes

        def op(c: Connection) -> None:
            if c.dialect.name == "postgresql":  # two beats at once: one row all the same
                from sqlalchemy.dialects.postgresql import insert

                c.execute(
                    insert(cn)
                    .values(name=name, **values)
                    .on_conflict_do_update(index_elements=[cn.c.name], set_=values)
                )
                return
            updated = c.execute(cn.update().where(cn.c.name == name).values(**values)).rowcount
            if not updated:
                c.execute(cn.insert().values(name=name, **values))

        return self._db.transaction(op)

    def list_nodes(self) -> Deferred[list[dict[str, Any]]]:
        """Every node that ever joined, by name."""
        cn = t.cluster_nodes

        def q(c: Connection) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in c.execute(sa.select(cn).order_by(cn.c.name))]

        return self._db.read(q)

    def forget_node(self, name: str) -> Deferred[int]:
        """Remove a node's row (an operator's clean-up of a node gone for good)."""
        cn = t.cluster_nodes
        return self._db.transaction(
            lambda c: c.execute(cn.delete().where(cn.c.name == name)).rowcount
        )
