"""The relay's connection table: numbered agent connections and the upstream each goes to."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol


class AgentConnection(Protocol):
    """What the relay needs of an agent connection: the agent's own WebSocket at the edge
    (`EdgeProtocol`), or one a gateway carries to a task server (`CarriedAgent`)."""

    relay_conn: int | None  # its number here, while the relay holds it
    relay_upstream: str | None  # set by the table
    relay_link: Any  # the upstream's node link it was opened on (set by the table)

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
        # (upstream, agent) -> the agent's latest connection: its other sessions go over
        # the same node link (one node holds all of an agent's sessions)
        self._agents: dict[tuple[str, str], int] = {}
        self._keys: dict[int, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Iterator[AgentConnection]:
        return iter(list(self._conns.values()))  # a copy: closing one may remove it

    def add(
        self, conn: AgentConnection, upstream: str, link: Any = None, agent_id: str | None = None
    ) -> int:
        """Number a new connection of agent `agent_id` to `upstream`, over its node link
        `link`."""
        self._next += 1
        self._conns[self._next] = conn
        conn.relay_upstream = upstream
        conn.relay_link = link
        if agent_id is not None:
            key = (upstream, agent_id)
            self._agents[key] = self._next
            self._keys[self._next] = key
        return self._next

    def get(self, c: int) -> AgentConnection | None:
        return self._conns.get(c)

    def pop(self, c: int) -> AgentConnection | None:
        conn = self._conns.pop(c, None)
        key = self._keys.pop(c, None)
        if key is not None and self._agents.get(key) == c:
            del self._agents[key]
        return conn

    def link_of_agent(self, upstream: str, agent_id: str | None) -> Any:
        """The node link an agent's live connection to `upstream` is on, or None."""
        if agent_id is None:
            return None
        c = self._agents.get((upstream, agent_id))
        conn = self._conns.get(c) if c is not None else None
        return getattr(conn, "relay_link", None) if conn is not None else None

    def upstream_of(self, conn: AgentConnection) -> str:
        return conn.relay_upstream or self.default_upstream

    def of(self, c: int, upstream: str, link: Any = None) -> AgentConnection | None:
        """Connection `c` if it goes to `upstream` (over `link`, when given): a server, or
        a node of a cluster, speaks only for its own agents."""
        conn = self._conns.get(c)
        if conn is None or self.upstream_of(conn) != upstream:
            return None
        if link is not None and conn.relay_link is not None and conn.relay_link is not link:
            return None
        return conn

    def on(self, upstream: str, link: Any = None) -> list[int]:
        """The numbers of the connections to `upstream` (over `link`, when given)."""
        return [
            c
            for c, conn in self._conns.items()
            if self.upstream_of(conn) == upstream and (link is None or conn.relay_link is link)
        ]

    def per_link(self, upstream: str) -> dict[Any, int]:
        """How many connections to `upstream` each of its node links carries."""
        counts: dict[Any, int] = {}
        for conn in self._conns.values():
            if self.upstream_of(conn) == upstream:
                link = conn.relay_link
                counts[link] = counts.get(link, 0) + 1
        return counts

    def per_upstream(self, names: list[str]) -> dict[str, int]:
        """How many connections go to each upstream (every configured one, even at 0)."""
        counts = dict.fromkeys(names, 0)
        for conn in self._conns.values():
            name = self.upstream_of(conn)
            counts[name] = counts.get(name, 0) + 1
        return counts
