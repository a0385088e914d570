"""The agents' side of a relay node: accept agent sessions and move their frames.

The edge checks the agent's client certificate (the TLS layer verified it against the tcm CA)
and asks the relay (`relays.py`) where the connection goes; from then on it passes frames
between the agent and the relay, which carries them over the node link to the server's session
for the agent. The agent's TLS ends here, so the edge seals the connection's resumption token
(with the factory's keys, those of its listener) and the relay's `open` carries it to the
server, which puts it in the welcome.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from tcm.protocol import codes
from tcm.relay.counters import refusal_label
from tcm.relay.relays import Relay
from tcm.tls import pki
from tcm.tls.resumption import ResumptionKeys, issue_token
from tcm.wsbase import LeanWebSocketMixin, bind_options, settle_upgrade


class EdgeProtocol(LeanWebSocketMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """One agent connection at the node."""

    _log = Logger()
    relay_conn: int | None = None
    relay_upstream: str | None = None
    relay_link: Any = None
    relay_node: str | None = None
    agent_id: str | None = None
    last_rx = 0.0
    down = None  # an agent's own connection (a gateway's carried ones have their link)
    tls_buffer_releases = 0

    def onConnect(self, request):
        relay: Relay = self.factory.relay
        if codes.SUBPROTOCOL not in request.protocols:
            relay.counters.refused_for("subprotocol")
            raise ConnectionDeny(400, f"this node speaks {codes.SUBPROTOCOL}")
        agent_id, server = pki.peer_subject(self.transport)
        if agent_id is None or ":" in agent_id:
            relay.counters.refused_for("certificate")
            raise ConnectionDeny(403, "an agent certificate is required: enroll first")
        upstream, refusal = relay.admit(agent_id, server, request.path)
        if refusal is not None:
            relay.counters.refused_for(refusal_label(refusal))
            self._log.info(
                "agent {agent} refused: {status} {why}",
                agent=agent_id,
                status=refusal[0],
                why=refusal[1],
            )
            raise ConnectionDeny(*refusal)
        self.agent_id = agent_id
        self.relay_upstream = upstream
        # ?node=NAME: the server node holding the agent's core session (a cluster's), where
        # its task session goes too when this relay node links to it
        named = request.params.get("node") or [None]
        self.relay_node = named[0] if isinstance(named[0], str) and len(named[0]) <= 128 else None
        return codes.SUBPROTOCOL

    def onOpen(self):
        relay: Relay = self.factory.relay
        settle_upgrade(self, relay.clock)  # nothing of the upgrade kept (as on the server)
        self.last_rx = relay.clock.seconds()
        if relay.links.get(self.relay_upstream) is None:  # lost since the upgrade
            self.sendClose(
                codes.CLOSE_UPSTREAM_LOST, codes.CLOSE_REASONS[codes.CLOSE_UPSTREAM_LOST]
            )
            return
        transport: Any = self.transport  # connected: onOpen comes after the upgrade
        peer = transport.getPeer()
        peer_text = f"tcp{'6' if ':' in peer.host else '4'}:{peer.host}:{peer.port}"
        assert self.agent_id is not None  # onConnect admitted it
        # its TLS ends here: this node seals its resumption token (tcm.tls.resumption)
        resume = issue_token(
            self.factory.resumption,
            pki.resumption_peer(self.transport),
            self.agent_id,
            relay.clock.seconds(),
        )
        self.relay_conn = relay.opened(
            self,
            self.agent_id,
            peer_text,
            pki.negotiated_tls(self.transport),
            self.relay_upstream,
            self.factory.channel,
            node=self.relay_node,
            resume=resume,
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

    def __init__(
        self,
        relay: Relay,
        url: str,
        max_message_size: int = 1024 * 1024,
        channel: str | None = None,
        resumption: ResumptionKeys | None = None,
    ):
        super().__init__(url, protocols=[codes.SUBPROTOCOL])
        self.relay = relay
        self.channel = channel or relay.channel
        # the keys of the listener the agents' TLS ends at: each accepted connection's
        # welcome brings a token they seal (None: no token)
        self.resumption = resumption
        relay.prepare = self.prepareMessage
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            failByDrop=False,
            autoPingInterval=0,  # agents ping; the node sweeps silent connections
            openHandshakeTimeout=0,  # whole within twisted.web's request (as on the server)
            closeHandshakeTimeout=5,
            perMessageCompressionAccept=lambda offers: None,
        )
        bind_options(self)
