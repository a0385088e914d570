"""The relay's connection table: numbered agent connections and the upstream each goes to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class AgentConnection(Protocol):
    """What the relay needs of an agent connection: the agent's own WebSocket at the edge
    (`EdgeProtocol`), or one a gateway carries to a task server (`CarriedAgent`)."""

    relay_conn: int | None  # its number here, while the relay holds it
    relay_upstream: str | None  # set by the table

    @property
    def agent_id(self) -> str | None: ...
    @property
    def last_rx(self) -> float: ...  # when the agent was last heard from
    @property
    def down(self) -> Any: ...  # the gateway link that carries it, None for its own connection

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> Any: ...
    def sendClose(self, code: int, reason: str = "") -> Any: ...


class ConnectionTable:
    """Agent connections by number (`c` on the link), each with the upstream it goes to.

    Numbers are unique across upstreams and never reused while the process lives, so a late
    message of a server about a connection that is gone cannot reach another one."""

    def __init__(self, default_upstream: str):
        self.default_upstream = default_upstream
        self._conns: dict[int, AgentConnection] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[AgentConnection]:
        return iter(list(self._conns.values()))  # a copy: closing one may remove it

    def add(self, conn: AgentConnection, upstream: str) -> int:
        """Number a new connection to `upstream`."""
        self._next += 1
        self._conns[self._next] = conn
        conn.relay_upstream = upstream
        return self._next

    def get(self, c: int) -> AgentConnection | None:
        return self._conns.get(c)

    def pop(self, c: int) -> AgentConnection | None:
        return self._conns.pop(c, None)

    def upstream_of(self, conn: AgentConnection) -> str:
        return conn.relay_upstream or self.default_upstream

    def of(self, c: int, upstream: str) -> AgentConnection | None:
        """Connection `c` if it goes to `upstream`: a server speaks only for its own agents."""
        conn = self._conns.get(c)
        if conn is None or self.upstream_of(conn) != upstream:
            return None
        return conn

    def on(self, upstream: str) -> list[int]:
        """The numbers of the connections to `upstream`."""
        return [c for c, conn in self._conns.items() if self.upstream_of(conn) == upstream]

    def per_upstream(self, names: list[str]) -> dict[str, int]:
        """How many connections go to each upstream (every configured one, even at 0)."""
        counts = dict.fromkeys(names, 0)
        for conn in self._conns.values():
            name = self.upstream_of(conn)
            counts[name] = counts.get(name, 0) + 1
        return counts
