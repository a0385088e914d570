"""Policies and connection profiles, each with the targets it is assigned to."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database


class ConfigStore:
    """The `policies`, `policy_assignments`, `profiles` and `profile_assignments` tables."""

    def __init__(self, db: Database):
        self._db = db

    # -- policies ------------------------------------------------------------------------
    def load_policies(self) -> Deferred[list[dict[str, Any]]]:
        """Every policy with the names of its targets."""
        return self._db.read(
            lambda c: _with_children(
                c, t.policies, t.policy_assignments, "policy", ["target"], "targets"
            )
        )

    def save_policy(self, policy: dict[str, Any], targets: list[str]) -> Deferred[None]:
        """Insert or replace a policy and its assignments, in one transaction."""
        pa = t.policy_assignments

        def op(c: Connection) -> None:
            _upsert(c, t.policies, "name", policy)
            c.execute(pa.delete().where(pa.c.policy == policy["name"]))
            if targets:
                c.execute(pa.insert(), [{"policy": policy["name"], "target": x} for x in targets])

        return self._db.transaction(op)

    def delete_policy(self, name: str) -> Deferred[None]:
        """Delete a policy and its assignments (nothing when there is no such policy)."""

        def op(c: Connection) -> None:
            c.execute(t.policy_assignments.delete().where(t.policy_assignments.c.policy == name))
            c.execute(t.policies.delete().where(t.policies.c.name == name))

        return self._db.transaction(op)

    # -- connection profiles ---------------------------------------------------------------
    def load_profiles(self) -> Deferred[list[dict[str, Any]]]:
        """Every connection profile with its assignments ({target, priority})."""
        return self._db.read(
            lambda c: _with_children(
                c,
                t.profiles,
                t.profile_assignments,
                "profile",
                ["target", "priority"],
                "assignments",
            )
        )

    def save_profile(
        self, profile: dict[str, Any], assignments: list[dict[str, Any]]
    ) -> Deferred[None]:
        """Insert or replace a profile and its assignments, in one transaction."""
        pa = t.profile_assignments

        def op(c: Connection) -> None:
            _upsert(c, t.profiles, "name", profile)
            c.execute(pa.delete().where(pa.c.profile == profile["name"]))
            if assignments:
                c.execute(
                    pa.insert(),
                    [
                        {
                            "profile": profile["name"],
                            "target": a["target"],
                            "priority": a["priority"],
                        }
                        for a in assignments
                    ],
                )

        return self._db.transaction(op)

    def delete_profile(self, name: str) -> Deferred[None]:
        """Delete a profile and its assignments (nothing when there is no such profile)."""

        def op(c: Connection) -> None:
            c.execute(t.profile_assignments.delete().where(t.profile_assignments.c.profile == name))
            c.execute(t.profiles.delete().where(t.profiles.c.name == name))

        return self._db.transaction(op)


def _upsert(c: Connection, table: sa.Table, key: str, row: dict[str, Any]) -> None:
    updated = c.execute(table.update().where(table.c[key] == row[key]).values(**row))
    if updated.rowcount == 0:
        c.execute(table.insert().values(**row))


def _with_children(
    c: Connection,
    parent: sa.Table,
    child: sa.Table,
    fk: str,
    columns: list[str],
    field: str,
) -> list[dict[str, Any]]:
    """Rows of `parent`, each with a list of its `child` rows (only `columns`) in `field`."""
    out = {r.name: {**dict(r._mapping), field: []} for r in c.execute(sa.select(parent))}
    for r in c.execute(sa.select(child).order_by(*[child.c[n] for n in columns])):
        row = out.get(r._mapping[fk])
        if row is not None:
            values = [r._mapping[n] for n in columns]
            row[field].append(
                values[0] if len(columns) == 1 else dict(zip(columns, values, strict=True))
            )
    return list(out.values())
