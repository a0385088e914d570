"""Where the agent connects: its server directly, else one of its gateways, in turn.

`Destinations` is the rule, plain logic: the first URL is the preferred one (the server
itself when the agent has one configured and it is reachable); a failed attempt, a refused
session, a drain (4006) or a relay that lost its server (4010) moves to the next URL; any other
end of a session goes back to the first, so a direct connection is preferred again as soon as
it works. `RotatingEndpoint` is the endpoint ClientService reconnects through: each attempt
goes to the current destination, and the session URL and the HTTPS client follow it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from tcm.protocol import codes

MOVE_ON = frozenset({codes.CLOSE_DRAIN, codes.CLOSE_UPSTREAM_LOST})
# a session that ended without a close frame (1006, or no code): its server went away
LOST = frozenset({None, 1006})


class Destinations:
    """The agent's server and gateways, and which one is in use now."""

    _log = Logger()

    def __init__(self, urls: list[str], servers: int = 1):
        """`servers`: how many of the first URLs are nodes of the server's cluster (the
        rest are gateways)."""
        if not urls:
            raise ValueError("an agent needs a server or a gateway to connect to")
        seen: list[str] = []
        for url in urls:
            url = url.rstrip("/")
            if url not in seen:
                seen.append(url)
        self.urls = seen
        self.servers = max(1, min(servers, len(seen)))
        self.index = 0

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def move_on(self, why: str) -> None:
        """This destination failed or sent the agent away: try the next one."""
        if len(self.urls) > 1:
            old = self.current
            self.index = (self.index + 1) % len(self.urls)
            self._log.info("{old} {why}: next is {new}", old=old, why=why, new=self.current)

    def session_ended(self, code: int | None) -> None:
        if code in MOVE_ON:
            self.move_on(f"closed the session with {code}")
        elif code in LOST and self.index < self.servers and self.servers > 1:
            # a node of the cluster went away (killed, unreachable): the next node now,
            # rather than the lost one first; the agent stays there (nodes are equal)
            old = self.current
            self.index = (self.index + 1) % self.servers
            self._log.info("{old} lost: next is {new}", old=old, new=self.current)
        elif self.index != 0:
            self.index = 0  # prefer the first (direct) destination again


class RotatingEndpoint:
    """Connects to the current destination; `switched(url)` is told when it changes."""

    def __init__(
        self,
        destinations: Destinations,
        endpoint_for: Callable[[str], Any],
        switched: Callable[[str], None],
    ):
        self.destinations = destinations
        self._endpoint_for = endpoint_for
        self._endpoints: dict[str, Any] = {}
        self._switched = switched
        self._last: str | None = None

    def connect(self, factory: Any):
        url = self.destinations.current
        if url != self._last:
            self._last = url
            self._switched(url)
        endpoint = self._endpoints.get(url)
        if endpoint is None:
            endpoint = self._endpoints[url] = self._endpoint_for(url)

        def failed(f):
            self.destinations.move_on(f"unreachable ({f.getErrorMessage()[:80]})")
            return f

        return endpoint.connect(factory).addErrback(failed)


def ws_url(base: str) -> str:
    """The session URL under a server's or gateway's base URL."""
    return "wss://" + base.split("://", 1)[1].rstrip("/") + "/agent/v1/ws"
