"""A task server's gateways: which ones its server lets link here, and their live links."""

from __future__ import annotations

from typing import Any

from tcm.protocol import codes


class GatewayLinks:
    """The gateways this task server accepts (name -> certificate fingerprint, from its
    server's `nodes`, and the certificate each renewed last, accepted until it expires) and
    each one's live link (`DownLink`), by name or name/worker."""

    def __init__(self) -> None:
        self.allowed: dict[str, str] | None = None  # None: not told yet (no link to the server)
        self.previous: dict[str, str] = {}
        self.links: dict[str, Any] = {}

    def _accepts(self, name: str, fingerprint: str | None) -> bool:
        assert self.allowed is not None
        return fingerprint is not None and fingerprint in (
            self.allowed.get(name),
            self.previous.get(name),
        )

    def refusal(self, name: str, fingerprint: str | None) -> tuple[int, str] | None:
        """Why gateway `name` with this certificate may not link now (status, reason)."""
        if self.allowed is None:
            return 503, "this task server is not linked to its server yet"
        known = self.allowed.get(name)
        if known is None:
            return 403, f"gateway {name!r} is not registered with this task server's server"
        if not self._accepts(name, fingerprint):
            return 403, f"gateway {name!r} presented a certificate other than the one it enrolled"
        return None

    def set_allowed(self, gateways: dict[str, str], previous: dict[str, str] | None = None) -> None:
        """The gateways the server names now; links of any other are cut off."""
        self.allowed = dict(gateways)
        self.previous = dict(previous or {})
        for down in list(self.links.values()):
            if not self._accepts(down.name, down.fingerprint):
                down.close(codes.CLOSE_UNAUTHORIZED, f"gateway {down.name} is not registered now")

    def attach(self, down: Any) -> None:
        """A gateway's link said hello: it replaces an older link of the same gateway."""
        old = self.links.get(down.key)
        self.links[down.key] = down
        if old is not None and old is not down:
            old.close(codes.CLOSE_SUPERSEDED, "a newer link of this gateway replaced this one")

    def detach(self, down: Any) -> None:
        key = down.key
        if self.links.get(key) is down:
            del self.links[key]
