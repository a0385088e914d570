"""Inventory: per agent and class, the current version (its data, digest, version number and
times) and a bounded history of the versions before it. Stored once: a job target's result
names the versions it collected, the data lives here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.protocol.canonical import JSONText, canonical
from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database, WriteQueue

# Versions of each (agent, class) kept before the current one (--inventory-history).
DEFAULT_HISTORY = 5

# Agents read per statement when many are asked for at once.
_CHUNK = 500


def _text(data: Any) -> str:
    """The JSON text of a class's data: as received (canonical already), or made so."""
    return data if isinstance(data, JSONText) else canonical(data)


class InventoryStore:
    """The `inventory` and `inventory_history` tables. Collections are written through the
    write queue, in the same transaction as the result of the job that collected them."""

    def __init__(self, db: Database, writes: WriteQueue, history: int = DEFAULT_HISTORY):
        self._db = db
        self._writes = writes
        self.history = history  # earlier versions kept per (agent, class); 0: none

    def store_inventory(self, agent_id: str, collected: Any, now: float) -> Deferred[list[str]]:
        """Write an inventory.Collected through the write queue (with the job's result);
        fires with the classes said unchanged that the store does not hold.

        A class sent in full whose digest differs from the stored one becomes the next
        version: the one it replaces goes to the history, which keeps the last `history`.
        A class sent unchanged (its digest, or a prefix of it, is the stored one's) only gets
        the newer collection time. An unchanged class whose full digest the server holds for
        another agent only takes that agent's data: equal digests, equal data."""
        inv, hist = t.inventory, t.inventory_history
        keep = self.history
        at = collected.collected_at

        def newer(col: Any) -> Any:
            return sa.case((col < at, at), else_=col)

        def put(c: Connection, cls: str, text: str, digest: str) -> None:
            where = (inv.c.agent_id == agent_id) & (inv.c["class"] == cls)
            row = c.execute(sa.select(inv.c.digest, inv.c.version).where(where)).first()
            data = sa.bindparam("data", text, type_=sa.Text)
            if row is None:
                c.execute(
                    inv.insert().values(
                        agent_id=agent_id,
                        **{"class": cls},
                        data=data,
                        digest=digest,
                        collected_at=at,
                        changed_at=now,
                        version=1,
                    )
                )
                return
            if row.digest == digest:  # the same version again: a newer collection time only
                c.execute(inv.update().where(where).values(collected_at=newer(inv.c.collected_at)))
                return
            if keep > 0:
                c.execute(
                    hist.insert().from_select(
                        [
                            "agent_id",
                            "class",
                            "version",
                            "data",
                            "digest",
                            "collected_at",
                            "changed_at",
                            "replaced_at",
                        ],
                        sa.select(
                            inv.c.agent_id,
                            inv.c["class"],
                            inv.c.version,
                            inv.c.data,
                            inv.c.digest,
                            inv.c.collected_at,
                            inv.c.changed_at,
                            sa.literal(now, sa.Float),
                        ).where(where),
                    )
                )
            version = row.version + 1
            c.execute(
                inv.update()
                .where(where)
                .values(data=data, digest=digest, collected_at=at, changed_at=now, version=version)
            )
            c.execute(
                hist.delete().where(
                    hist.c.agent_id == agent_id,
                    hist.c["class"] == cls,
                    hist.c.version < version - keep,
                )
            )

        def op(c: Connection) -> list[str]:
            missing: list[str] = []
            for cls, (data, digest) in collected.changed.items():
                put(c, cls, _text(data), digest)
            for cls, digest in collected.unchanged.items():
                touched = c.execute(
                    inv.update()
                    .where(
                        inv.c.agent_id == agent_id,
                        inv.c["class"] == cls,
                        sa.func.substr(inv.c.digest, 1, len(digest)) == digest,
                    )
                    .values(collected_at=newer(inv.c.collected_at))
                ).rowcount
                if touched:
                    continue
                other = None
                if len(digest) == 64:  # a full digest: another agent may hold that data
                    other = c.execute(
                        sa.select(inv.c.data)
                        .where(inv.c["class"] == cls)
                        .where(inv.c.digest == digest)
                        .limit(1)
                    ).first()
                if other is not None:
                    put(c, cls, canonical(other.data), digest)
                else:  # nothing to go by: the class is asked again in full
                    missing.append(cls)
            return missing

        weight = sum(len(d) for d, _ in collected.changed.values() if isinstance(d, str))
        return self._writes.submit(op, weight=weight)

    def get_inventory(self, agent_id: str) -> Deferred[dict[str, dict[str, Any]]]:
        """class -> {data, digest, version, collected_at, changed_at} of one agent."""
        inv = t.inventory

        def q(c: Connection) -> dict[str, dict[str, Any]]:
            return {
                r._mapping["class"]: {
                    "data": r.data,
                    "digest": r.digest,
                    "version": r.version,
                    "collected_at": r.collected_at,
                    "changed_at": r.changed_at,
                }
                for r in c.execute(sa.select(inv).where(inv.c.agent_id == agent_id))
            }

        return self._db.read(q)

    def class_history(
        self, agent_id: str, cls: str | None = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Every version kept of one agent's classes (or of one), newest first per class,
        without their data: {class, version, digest, collected_at, changed_at, replaced_at
        (None for the current version), current}."""
        inv, hist = t.inventory, t.inventory_history

        def q(c: Connection) -> list[dict[str, Any]]:
            out = []
            for table, current in ((inv, True), (hist, False)):
                query = sa.select(
                    table.c["class"],
                    table.c.version,
                    table.c.digest,
                    table.c.collected_at,
                    table.c.changed_at,
                    *([] if current else [table.c.replaced_at]),
                ).where(table.c.agent_id == agent_id)
                if cls is not None:
                    query = query.where(table.c["class"] == cls)
                for r in c.execute(query):
                    row = dict(r._mapping)
                    row.setdefault("replaced_at", None)
                    row["current"] = current
                    out.append(row)
            out.sort(key=lambda r: (r["class"], -r["version"]))
            return out

        return self._db.read(q)

    def class_version(
        self, agent_id: str, cls: str, version: int | None
    ) -> Deferred[dict[str, Any] | None]:
        """One version of one agent's class (None: the current one) with its data, or None."""
        inv, hist = t.inventory, t.inventory_history

        def q(c: Connection) -> dict[str, Any] | None:
            where = (inv.c.agent_id == agent_id) & (inv.c["class"] == cls)
            row = c.execute(sa.select(inv).where(where)).first()
            if row is not None and (version is None or row.version == version):
                return {**dict(row._mapping), "replaced_at": None, "current": True}
            if version is None:
                return None
            old = c.execute(
                sa.select(hist).where(
                    hist.c.agent_id == agent_id,
                    hist.c["class"] == cls,
                    hist.c.version == version,
                )
            ).first()
            return None if old is None else {**dict(old._mapping), "current": False}

        return self._db.read(q)

    def versions_data(
        self, wanted: Mapping[str, Mapping[str, str]], budget: int | None = None
    ) -> Deferred[tuple[dict[str, dict[str, Any]], set[tuple[str, str]]]]:
        """(agent -> {class: data}, over budget) of the versions named by digest (or digest
        prefix) in `wanted` (agent -> {class: digest}): the current version or one in the
        history. A version no longer kept is left out; so is any past `budget` bytes of data
        in all (in agent order), named in the second part: a job of thousands of agents is
        not read into memory whole."""
        inv, hist = t.inventory, t.inventory_history
        agents = sorted(wanted)

        def q(c: Connection) -> tuple[dict[str, dict[str, Any]], set[tuple[str, str]]]:
            out: dict[str, dict[str, Any]] = {}
            over: set[tuple[str, str]] = set()
            left = budget
            for i in range(0, len(agents), _CHUNK):
                chunk = agents[i : i + _CHUNK]
                classes = sorted({k for a in chunk for k in wanted[a]})
                candidates: list[tuple[str, str, int, Any, str]] = []
                seen: set[tuple[str, str]] = set()
                for table in (inv, hist):
                    rows = c.execute(
                        sa.select(
                            table.c.agent_id,
                            table.c["class"],
                            table.c.digest,
                            sa.func.length(sa.cast(table.c.data, sa.Text)),
                        )
                        .where(table.c.agent_id.in_(chunk))
                        .where(table.c["class"].in_(classes))
                    )
                    for agent, cls, digest, size in rows:
                        name = wanted[agent].get(cls)
                        if name is None or not digest.startswith(name):
                            continue
                        if (agent, cls) not in seen:
                            seen.add((agent, cls))
                            candidates.append((agent, cls, size or 0, table, digest))
                found = []
                for agent, cls, size, table, digest in sorted(candidates, key=lambda x: x[:2]):
                    if left is not None:
                        if left < size:
                            over.add((agent, cls))
                            continue
                        left -= size
                    found.append((table, agent, cls, digest))
                for table, agent, cls, digest in found:
                    data = c.execute(
                        sa.select(table.c.data).where(
                            table.c.agent_id == agent,
                            table.c["class"] == cls,
                            table.c.digest == digest,
                        )
                    ).scalar()
                    out.setdefault(agent, {})[cls] = data
            return out, over

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

    def sizes(self) -> Deferred[dict[str, int]]:
        """Rows and bytes of JSON data in the current inventory and in its history."""
        inv, hist = t.inventory, t.inventory_history

        def q(c: Connection) -> dict[str, int]:
            out = {}
            for name, table in (("inventory", inv), ("inventory_history", hist)):
                rows, size = c.execute(
                    sa.select(
                        sa.func.count(),
                        sa.func.coalesce(
                            sa.func.sum(sa.func.length(sa.cast(table.c.data, sa.Text))), 0
                        ),
                    )
                ).one()
                out[f"{name}_rows"] = int(rows)
                out[f"{name}_bytes"] = int(size)
            return out

        return self._db.read(q)
