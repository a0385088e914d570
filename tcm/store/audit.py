"""The audit log: who did what to which object, when."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database, WriteQueue


class AuditStore:
    """The `audit_log` table; entries are written through the write queue."""

    def __init__(self, db: Database, writes: WriteQueue):
        self._db = db
        self._writes = writes

    def audit(
        self, actor: str, action: str, obj: str, details: dict[str, Any], at: float
    ) -> Deferred[None]:
        """Append an entry (the object's name cut to 255 characters)."""
        row = dict(at=at, actor=actor, action=action, object=obj[:255], details=details)

        def op(c: Connection) -> None:
            c.execute(t.audit_log.insert().values(**row))

        return self._writes.submit(op)

    def list_audit(
        self,
        since: float | None = None,
        limit: int = 1000,
        actor: str | None = None,
        action: str | None = None,
    ) -> Deferred[list[dict[str, Any]]]:
        """The newest `limit` entries at or after `since` (by `actor`, of `action`: an
        action name, or a prefix ending in '.' such as 'job.'), oldest first."""
        al = t.audit_log
        q = sa.select(al).order_by(al.c.id.desc()).limit(limit)
        if since is not None:
            q = q.where(al.c.at >= since)
        if actor is not None:
            q = q.where(al.c.actor == actor)
        if action is not None:
            if action.endswith("."):
                q = q.where(al.c.action.startswith(action, autoescape=True))
            else:
                q = q.where(al.c.action == action)

        def read(c: Connection) -> list[dict[str, Any]]:
            return [dict(r._mapping) for r in c.execute(q)][::-1]

        return self._db.read(read)
