"""The agents' side of a relay node: accept agent sessions and move their frames.

The node runs no session logic of its own: it checks the agent's client certificate (the
TLS layer verified it against the tcm CA), numbers the connection, and from then on passes
frames between the agent and the server's session for it over the node link. A `push` from
the server (one frame, many connections) is framed once here and sent to each connection.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from tcm import pki
from tcm.protocol import codes, link
from tcm.wsbase import LeanWebSocketMixin, bind_options


class Relay:
    """The node's table of agent connections, between the edge and the upstream link."""

    _log = Logger()

    def __init__(self, clock: Any, max_clients: int, channel: str = "task"):
        self.clock = clock
        self.max_clients = max_clients
        self.channel = channel
        self.conns: dict[int, Any] = {}  # connection number -> edge protocol
        self._next = 0
        self.upstream: Any = None  # set by the upstream link once welcomed
        self.prepare: Any = None  # the edge factory's prepareMessage
        self.accepted = 0
        self.refused: dict[str, int] = {}

    # -- edge side -----------------------------------------------------------------------
    def refusal(self) -> tuple[int, str] | None:
        """Why a new agent connection is refused now (HTTP status, reason), or None."""
        if self.upstream is None:
            return 503, "this node has no link to its server now; try again later"
        if len(self.conns) >= self.max_clients:
            return 503, f"this node is full ({self.max_clients} clients)"
        return None

    def opened(self, proto: Any, agent_id: str, peer: str, tls: dict[str, Any]) -> int:
        self._next += 1
        conn = self._next
        self.conns[conn] = proto
        self.accepted += 1
        self.upstream.send(
            {
                "t": "open",
                "c": conn,
                "agent": agent_id,
                "peer": peer,
                "tls": tls,
                "channel": self.channel,
            }
        )
        return conn

    def from_agent(self, conn: int, payload: bytes) -> None:
        if self.upstream is not None:
            self.upstream.send({"t": "frame", "c": conn}, payload)

    def closed(self, conn: int) -> None:
        if self.conns.pop(conn, None) is not None and self.upstream is not None:
            self.upstream.send({"t": "closed", "c": conn})

    def refused_for(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    # -- server side ---------------------------------------------------------------------
    def from_server(self, header: dict[str, Any], payload: bytes) -> None:
        kind = header["t"]
        if kind == "frame":
            proto = self.conns.get(header["c"])
            if proto is not None:
                proto.sendMessage(payload, isBinary=False)
        elif kind == "push":
            prepared = self.prepare(payload) if self.prepare is not None else None
            for conn in header["c"]:
                proto = self.conns.get(conn)
                if proto is None:
                    continue
                if prepared is not None:
                    proto.sendPreparedMessage(prepared)
                else:
                    proto.sendMessage(payload, isBinary=False)
        elif kind == "close":
            proto = self.conns.get(header["c"])
            if proto is not None:
                proto.sendClose(header["code"], str(header.get("reason", ""))[:120])

    def upstream_lost(self) -> None:
        """No link: the server has forgotten these sessions; the agents must come again."""
        self.upstream = None
        conns, self.conns = self.conns, {}
        if conns:
            self._log.warn("server link lost: closing {n} agent connections", n=len(conns))
        for proto in conns.values():
            proto.relay_conn = None
            proto.sendClose(
                codes.CLOSE_UPSTREAM_LOST, codes.CLOSE_REASONS[codes.CLOSE_UPSTREAM_LOST]
            )

    def close_all(self, code: int) -> int:
        """Close every agent connection with `code` (draining at shutdown)."""
        n = 0
        for proto in list(self.conns.values()):
            proto.sendClose(code, codes.CLOSE_REASONS.get(code, ""))
            n += 1
        return n

    def sweep(self, deadline: float) -> None:
        """Close agent connections silent since `deadline` (no ping, no frame)."""
        for proto in list(self.conns.values()):
            if proto.last_rx < deadline:
                proto.sendClose(codes.CLOSE_KEEPALIVE, codes.CLOSE_REASONS[codes.CLOSE_KEEPALIVE])


class EdgeProtocol(LeanWebSocketMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """One agent connection at the node."""

    _log = Logger()
    relay_conn: int | None = None
    agent_id: str | None = None
    last_rx = 0.0

    def onConnect(self, request):
        relay: Relay = self.factory.relay
        if codes.SUBPROTOCOL not in request.protocols:
            relay.refused_for("subprotocol")
            raise ConnectionDeny(400, f"this node speaks {codes.SUBPROTOCOL}")
        agent_id = pki.peer_common_name(self.transport)
        if agent_id is None or ":" in agent_id:
            relay.refused_for("certificate")
            raise ConnectionDeny(403, "an agent certificate is required: enroll first")
        refusal = relay.refusal()
        if refusal is not None:
            relay.refused_for("unavailable")
            raise ConnectionDeny(*refusal)
        self.agent_id = agent_id
        return codes.SUBPROTOCOL

    def onOpen(self):
        relay: Relay = self.factory.relay
        self.last_rx = relay.clock.seconds()
        if relay.upstream is None:  # lost between the upgrade and now
            self.sendClose(
                codes.CLOSE_UPSTREAM_LOST, codes.CLOSE_REASONS[codes.CLOSE_UPSTREAM_LOST]
            )
            return
        peer = self.transport.getPeer()
        peer_text = f"tcp{'6' if ':' in peer.host else '4'}:{peer.host}:{peer.port}"
        self.relay_conn = relay.opened(
            self, self.agent_id, peer_text, pki.negotiated_tls(self.transport)
        )

    def onPing(self, payload: bytes) -> None:
        self.last_rx = self.factory.relay.clock.seconds()
        super().onPing(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay_conn is None:
            return
        if isBinary:
            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, "tcm.v1 uses text frames")
            return
        relay: Relay = self.factory.relay
        self.last_rx = relay.clock.seconds()
        relay.from_agent(self.relay_conn, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.relay_conn is not None:
            self.factory.relay.closed(self.relay_conn)
            self.relay_conn = None


class EdgeFactory(WebSocketServerFactory):
    protocol = EdgeProtocol

    def __init__(self, relay: Relay, url: str, max_message_size: int = 1024 * 1024):
        super().__init__(url, protocols=[codes.SUBPROTOCOL])
        self.relay = relay
        relay.prepare = self.prepareMessage
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            failByDrop=False,
            autoPingInterval=0,  # agents ping; the node sweeps silent connections
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            perMessageCompressionAccept=lambda offers: None,
        )
        bind_options(self)


assert "open" in link.NODE_SENDS
