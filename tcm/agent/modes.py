"""The agent's connection mode, as an explicit state machine. Pure: no I/O.

    persistent    a WebSocket session is open and welcomed
    http          no session; HTTPS polls reach the server
    disconnected  neither works right now

Every change is recorded with its reason (and logged by the agent), so an endpoint owner can
see why the agent is where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PERSISTENT, HTTP, DISCONNECTED = "persistent", "http", "disconnected"
HISTORY = 20  # changes kept

# event -> {from state: to state}; a state missing from a row ignores that event
_TRANSITIONS: dict[str, dict[str, str]] = {
    "session_open": {HTTP: PERSISTENT, DISCONNECTED: PERSISTENT},
    "session_lost": {PERSISTENT: HTTP},
    "poll_ok": {DISCONNECTED: HTTP},
    "poll_failed": {HTTP: DISCONNECTED},
    "user_disconnect": {PERSISTENT: HTTP},
    "profile_http": {PERSISTENT: HTTP},
}


class ConnectionMode:
    """Which way the agent reaches its server now, and the history of changes."""

    def __init__(self, clock: Any, on_change: Callable[[str, str, str], None] | None = None):
        self.clock = clock
        self.state = DISCONNECTED
        self.since = clock.seconds()
        # the last HISTORY changes (a list: an empty deque holds a 0.5 KB block, a swarm
        # holds thousands of these; issue 17)
        self.history: list[dict[str, Any]] = []
        self._on_change = on_change

    def event(self, name: str, reason: str) -> bool:
        """Apply an event; True if the mode changed."""
        new = _TRANSITIONS[name].get(self.state)
        if new is None or new == self.state:
            return False
        old, self.state = self.state, new
        self.since = self.clock.seconds()
        self.history.append({"at": self.since, "from": old, "to": new, "reason": reason})
        if len(self.history) > HISTORY:
            del self.history[0]
        if self._on_change is not None:
            self._on_change(old, new, reason)
        return True
