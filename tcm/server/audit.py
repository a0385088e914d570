"""The audit log: who changed what, when (`tcm audit`)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from tcm.interfaces import IAudit
from tcm.server.errors import Invalid
from tcm.server.roles import Principal

REFUSED = "request.refused"  # the action of a 401/403 entry
UNKNOWN = "-"  # the actor of a request refused before it named a principal
# Refusals written one by one per minute at most; beyond, counted and written as one entry
# when the minute ends, so a flood of bad tokens cannot grow the audit log without bound.
REFUSALS_PER_MINUTE = 120


@implementer(IAudit)
class AuditLog:
    """Writes and reads the store's audit area; the time is this server's clock."""

    def __init__(
        self, audit_store: Any, clock: Any, refusals_per_minute: int = REFUSALS_PER_MINUTE
    ):
        self._store = audit_store
        self._clock = clock
        self.refusals_per_minute = refusals_per_minute
        self._window = float("-inf")  # when this minute of refusals began
        self._written = 0  # refusals written one by one in it
        self._held: dict[int, int] = {}  # refusals past the limit in it, by status
        self._flush: Any = None

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

        Written as `request.refused` on `METHOD PATH` with {status, reason}; past
        `refusals_per_minute` in a minute, counted instead and written as one entry on `*`
        with {"suppressed": {status: count}, "since"} when the minute ends."""
        now = self._clock.seconds()
        if now - self._window >= 60.0:
            self.flush_refusals()
            self._window, self._written = now, 0
        if self._written >= self.refusals_per_minute:
            self._held[status] = self._held.get(status, 0) + 1
            if self._flush is None:
                self._flush = self._clock.callLater(self._window + 60.0 - now, self.flush_refusals)
            return succeed(None)
        self._written += 1
        return self.record(
            who or UNKNOWN, REFUSED, f"{method} {path}", {"status": status, "reason": reason}
        )

    def flush_refusals(self) -> Deferred[None]:
        """Write the refusals held back in this minute as one entry (if any)."""
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        held, self._held = self._held, {}
        if not held:
            return succeed(None)
        details = {
            "suppressed": {str(s): n for s, n in sorted(held.items())},
            "since": self._window,
        }
        return self.record(UNKNOWN, REFUSED, "*", details)
