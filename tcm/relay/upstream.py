"""A relay node's link to its server: one persistent mutual-TLS WebSocket (tcm.link.v1).

`ClientService` keeps it up with capped exponential backoff; the link counts as up once the
server answered the node's hello, and only then does the edge accept agents.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tcm import compat
from tcm.protocol import codes, link
from tcm.relay.relays import Relay
from tcm.wsbase import LeanWebSocketMixin, bind_options


class LinkClosed(Exception):
    """The server closed or refused the link before welcoming the node."""


class UpstreamProtocol(LeanWebSocketMixin, WebSocketClientProtocol):  # type: ignore[misc]
    """The node's end of the link: hello, then frames both ways. The link's own messages
    are handled here (`_HANDLERS`), every other one by the relay's table (`from_server`)."""

    _log = Logger()
    _HANDLERS = {"welcome": "_on_welcome"}
    welcomed: Deferred | None = None
    up = False

    def connectionMade(self):
        self.welcomed = Deferred()
        super().connectionMade()

    def onConnect(self, response):
        if response.protocol != link.SUBPROTOCOL:
            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, "server did not accept tcm.link.v1")

    def onOpen(self):
        f = self.factory
        self.writer = link.LinkWriter(
            lambda data: self.sendMessage(data, isBinary=True), f.relay.clock
        )
        hello = {
            "t": "hello",
            "name": f.name,
            "role": f.role,
            "url": f.url,
            "max_clients": f.relay.max_clients,
        }
        if f.worker is not None:
            hello["worker"] = f.worker
        self.send(hello)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.writer.send(header, payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, "node links use binary frames")
            return
        try:
            header, body = link.decode(payload, link.SERVER_SENDS)
            messages = link.unbatch(header, body, link.SERVER_SENDS)
        except link.LinkError as e:
            self._log.warn("server sent a bad link message: {e}", e=e)
            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, str(e)[:120])
            return
        for header, body in messages:
            try:
                self._message(header, body)
            except link.LinkError as e:
                self._log.warn("server sent a link message not for this node: {e}", e=e)
                self.sendClose(codes.CLOSE_PROTOCOL_ERROR, str(e)[:120])
                return

    def _message(self, header: dict[str, Any], body: bytes) -> None:
        name = self._HANDLERS.get(header["t"])
        if name is not None:
            getattr(self, name)(header, body)
        else:
            self.factory.relay.from_server(header, body, self.factory.upstream_name, self)

    def _on_welcome(self, header: dict[str, Any], body: bytes) -> None:
        f = self.factory
        if self.up:
            return
        server = header.get("server")
        problem = f.relay.link_up(
            f.upstream_name,
            self,
            server,
            role=header.get("role", "server"),
            node=header.get("node"),
            key=f.node_key,
        )
        if problem is not None:
            self._log.error("link to {server} refused here: {why}", server=f.server, why=problem)
            self.sendClose(codes.CLOSE_NORMAL, problem[:120])
            return
        self.up = True
        f.server_name = server
        if f.relay.on_welcomed is not None:
            f.relay.on_welcomed(f.upstream_name, f.node_key, server)
        self._log.info("link to {server} up (server {name})", server=f.server, name=server)
        assert self.welcomed is not None
        self.welcomed.callback(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        relay: Relay = self.factory.relay
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.discard()
        if self.up:
            self.up = False
            self._log.warn(
                "link to {server} lost: {code} {reason}",
                server=self.factory.server,
                code=code,
                reason=reason or "",
            )
            relay.link_lost(self.factory.upstream_name, self)
        elif self.welcomed is not None and not self.welcomed.called:
            self._log.warn(
                "link to {server} refused: {code} {reason}",
                server=self.factory.server,
                code=code,
                reason=reason or "",
            )
            self.welcomed.errback(LinkClosed(f"{code} {reason or ''}"))


class UpstreamFactory(WebSocketClientFactory):
    protocol = UpstreamProtocol

    def __init__(
        self,
        relay: Relay,
        server: str,
        name: str,
        role: str,
        url: str,
        keepalive: float = 25.0,
        upstream_name: str | None = None,
        worker: int | None = None,
        node_key: str | None = None,
    ):
        ws_url = "wss://" + server.split("://", 1)[1].rstrip("/") + link.WS_PATH
        super().__init__(ws_url, protocols=[link.SUBPROTOCOL])
        self.relay = relay
        self.server = server
        self.name = name
        self.role = role
        self.url = url
        self.upstream_name = upstream_name or relay.links.default
        self.worker = worker  # a gateway worker process's number, None for a single process
        self.server_name: str | None = None  # the server's own name, from its welcome
        # which node of the upstream this link goes to (its address), when the upstream
        # may be a cluster of several; None: the upstream's only link
        self.node_key = node_key
        size = 64 * 1024 * 1024
        self.setProtocolOptions(
            autoPingInterval=keepalive,
            autoPingTimeout=20,
            failByDrop=False,
            maxFramePayloadSize=size,
            maxMessagePayloadSize=size,
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            perMessageCompressionOffers=[],
        )
        bind_options(self)


def upstream_service(
    reactor: Any, endpoint: Any, factory: UpstreamFactory, backoff_max: float = 30.0
) -> ClientService:
    """Keep the link up; a link refused before welcome counts as a failed attempt."""
    return ClientService(
        endpoint,
        factory,
        retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=backoff_max, factor=2.0),
        clock=reactor,
        prepareConnection=_welcomed,
    )


def _welcomed(proto: Any) -> Deferred:
    def refused(f):
        # ClientService counts the failed attempt; it has no transition for the lost
        # connection that follows, so that one notification is not passed on.
        compat.ignore_lost_notification(proto)
        return f

    return proto.welcomed.addErrback(refused)
