"""A task server's end of a gateway's link: agents' task sessions the gateway carries.

An agent behind an internet gateway keeps its task session on the gateway, at
/taskserver/NAME/task/v1/ws; the gateway carries it over its link to task server NAME (the
same tcm.link.v1 a node speaks to its server, with this task server in the server's place).
Here each of the gateway's connections is one entry of the task server's relay table, like an
agent's own connection, and goes up the task server's link to the management server: the
server runs the session (its `via` names both nodes) and addresses it like any other.

A push from the server to many agents behind one gateway crosses the server's link once, then
the gateway's link once (one `push` with the gateway's connection numbers), and fans out at the
gateway. Only gateways the management server names (`nodes`, with their certificates'
fingerprints) may link; a gateway it stops naming is cut off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from tcm.protocol import codes, link
from tcm.relay.counters import refusal_label
from tcm.relay.relays import TaskServerRelay
from tcm.tls import pki
from tcm.wsbase import LeanWebSocketMixin, LinkEndMixin, link_end_options


class CarriedAgent:
    """An agent connection held by a gateway, as an entry of this task server's relay."""

    __slots__ = ("down", "c", "agent_id", "relay_conn", "relay_upstream", "relay_link", "last_rx")

    def __init__(self, down: DownLink, c: int, agent_id: str):
        self.down = down
        self.c = c  # the gateway's number for it
        self.agent_id = agent_id
        self.relay_conn: int | None = None
        self.relay_upstream: str | None = None
        self.relay_link: Any = None
        self.last_rx = float("inf")  # the gateway watches the agent's keepalive

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.down.send({"t": "frame", "c": self.c}, payload)

    def sendClose(self, code: int, reason: str = "") -> None:
        self.down.send({"t": "close", "c": self.c, "code": code, "reason": reason[:120]})


def _close_code(refusal: tuple[int, str]) -> int:
    status, why = refusal
    if status == 403:
        return codes.CLOSE_UNAUTHORIZED
    if "no link" in why:
        return codes.CLOSE_UPSTREAM_LOST
    return codes.CLOSE_DRAIN  # full or draining: the agent tries again, or elsewhere


class DownLink:
    """One gateway's link at this task server (its logic; the protocol below is the I/O)."""

    _log = Logger()
    # the link messages a gateway sends, by type (checked against tcm.protocol.link's
    # schemas); those a node sends only to a management server are refused with the reason
    _HANDLERS = {
        "hello": "_on_hello",
        "open": "_on_open",
        "frame": "_on_frame",
        "closed": "_on_closed",
    }
    _REFUSED = {
        "request": "a task server does not carry agent API calls: send them to a server",
        "reach": "reach is for management servers",
    }

    def __init__(
        self,
        name: str,
        fingerprint: str | None,
        relay: TaskServerRelay,
        send: Callable[[bytes], None],
        close: Callable[[int, str], None],
        clock: Any,
        keepalive: float = 25.0,
        max_batch: int = link.MAX_BATCH,
    ):
        self.name = name
        self.fingerprint = fingerprint
        self.relay = relay
        self.clock = clock
        self.keepalive = keepalive
        self._writer = link.LinkWriter(send, clock, max_batch)
        self._close = close
        self.worker: int | None = None
        self.ready = False
        self.agents: dict[int, CarriedAgent] = {}
        self.pushes = 0

    @property
    def key(self) -> str:
        return self.name if self.worker is None else f"{self.name}/{self.worker}"

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self._writer.send(header, payload)

    def push(self, conns: list[int], payload: bytes) -> None:
        """One frame for several of this gateway's agents: the gateway fans it out."""
        if len(conns) == 1:
            self.send({"t": "frame", "c": conns[0]}, payload)
            return
        self.pushes += 1
        self.send({"t": "push", "c": conns}, payload)

    def close(self, code: int, reason: str) -> None:
        self._close(code, reason[:120])

    def message_received(self, message: bytes) -> None:
        try:
            link.receive(self, message)
        except link.LinkError as e:
            self._log.warn("gateway {gw} sent a bad link message: {e}", gw=self.name, e=e)
            self.close(codes.CLOSE_PROTOCOL_ERROR, str(e))

    def _on_hello(self, header: dict[str, Any], payload: bytes) -> None:
        if self.ready:
            raise link.LinkError("hello already received")
        if header["role"] != "gateway":
            raise link.LinkError("only gateways link to a task server")
        worker = header.get("worker")
        self.worker = worker if isinstance(worker, int) and not isinstance(worker, bool) else None
        self.ready = True
        self.relay.gateways.attach(self)
        self.send(
            {
                "t": "welcome",
                "keepalive": self.keepalive,
                "server": self.relay.server_name,
                "role": "taskserver",
                "node": self.relay.node_name,
            }
        )
        self._log.info("gateway {gw} linked", gw=self.key)

    def _on_open(self, header: dict[str, Any], payload: bytes) -> None:
        c, agent_id = header["c"], header["agent"]
        if c in self.agents:
            raise link.LinkError(f"connection {c} is already open")
        relay = self.relay
        refusal = relay.refusal(agent_id)
        if refusal is not None:
            relay.counters.refused_for(refusal_label(refusal))
            self.send({"t": "close", "c": c, "code": _close_code(refusal), "reason": refusal[1]})
            return
        agent = CarriedAgent(self, c, agent_id)
        self.agents[c] = agent
        tls = header.get("tls")
        agent.relay_conn = relay.opened(
            agent,
            agent_id,
            str(header.get("peer", "")),
            tls if isinstance(tls, dict) else {},
            channel="task",
            gateway=self.name,
            node=header.get("node"),
            resume=header.get("resume"),  # the gateway's, for the agent's TLS ended there
        )

    def _on_frame(self, header: dict[str, Any], payload: bytes) -> None:
        agent = self.agents.get(header["c"])
        if agent is not None and agent.relay_conn is not None:
            self.relay.from_agent(agent.relay_conn, payload)

    def _on_closed(self, header: dict[str, Any], payload: bytes) -> None:
        agent = self.agents.pop(header["c"], None)
        if agent is not None and agent.relay_conn is not None:
            self.relay.closed(agent.relay_conn)
            agent.relay_conn = None

    def lost(self) -> None:
        """The gateway's link is gone: so is every agent connection it carried."""
        self._writer.discard()
        agents, self.agents = self.agents, {}
        for agent in agents.values():
            if agent.relay_conn is not None:
                self.relay.closed(agent.relay_conn)
                agent.relay_conn = None
        if self.ready:
            self.ready = False
            self.relay.gateways.detach(self)
            self._log.info("gateway {gw} link lost", gw=self.key)


class DownLinkProtocol(LinkEndMixin, LeanWebSocketMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """Thin adapter: a gateway's binary link messages in and out of a DownLink."""

    _log = Logger()

    def onConnect(self, request):
        relay: TaskServerRelay = self.factory.relay
        if link.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"node links speak {link.SUBPROTOCOL}")
        cn = pki.peer_common_name(self.transport)
        if cn is None or not cn.startswith(link.NODE_PREFIX):
            raise ConnectionDeny(403, "a gateway's node certificate is required")
        name = cn[len(link.NODE_PREFIX) :]
        fingerprint = pki.peer_fingerprint(self.transport)
        refusal = relay.gateways.refusal(name, fingerprint)
        if refusal is not None:
            self._log.info("gateway link from {name} refused: {why}", name=name, why=refusal[1])
            raise ConnectionDeny(*refusal)
        self.end = DownLink(
            name,
            fingerprint,
            relay,
            lambda data: self.sendMessage(data, isBinary=True),
            self.sendClose,
            relay.clock,
            keepalive=self.factory.keepalive,
        )
        return link.SUBPROTOCOL


class DownLinkFactory(WebSocketServerFactory):
    protocol = DownLinkProtocol

    def __init__(self, relay: TaskServerRelay, url: str, keepalive: float = 25.0):
        super().__init__(url, protocols=[link.SUBPROTOCOL])
        self.relay = relay
        self.keepalive = keepalive
        link_end_options(self, 64 * 1024 * 1024, keepalive, 20)
