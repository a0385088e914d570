"""The audit log: who changed what, when (`tcm audit`)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from tcm.interfaces import IAudit
from tcm.server.errors import Invalid
from tcm.server.roles import Principal

REFUSED = "request.refused"  # the action of a 401/403 entry
UNKNOWN = "-"  # the actor of a request refused before it named a principal


@implementer(IAudit)
class AuditLog:
    """Writes and reads the store's audit area; the time is this server's clock."""

    def __init__(self, audit_store: Any, clock: Any):
        self._store = audit_store
        self._clock = clock

    def record(
        self,
        who: str | Principal,
        action: str,
        obj: str = "",
        details: dict[str, Any] | None = None,
    ) -> Deferred[None]:
        """Write an entry (who, what, on what, details, now); fires once it is committed."""
        actor = who.name if isinstance(who, Principal) else who
        return self._store.audit(actor, action, obj, details or {}, self._clock.seconds())

    def entries(
        self,
        since: float | None,
        limit: int,
        who: str | None = None,
        action: str | None = None,
    ) -> Deferred[list[dict[str, Any]]]:
        """The newest `limit` entries since `since` (epoch seconds), by `who`, of `action`
        (a name, or a prefix ending in '.'), oldest first."""
        if not 1 <= limit <= 100000:
            raise Invalid("limit", "'limit' must be 1..100000")
        return self._store.list_audit(since, limit, who, action)

    def refused(
        self, who: str | None, method: str, path: str, status: int, reason: str
    ) -> Deferred[None]:
        """Record a refused request: `who` (None: no valid credential), the route, why.

        Written as `request.refused` on `METHOD PATH` with {status, reason}."""
        return self.record(
            who or UNKNOWN, REFUSED, f"{method} {path}", {"status": status, "reason": reason}
        )
