"""What tcm's server and agent WebSocket protocols share on top of Autobahn.

Autobahn prepares WAMP TLS channel bindings on every connection (which needs the TLS protocol
itself as transport, while the server wraps it to log handshake failures) and formats debug
lines per chunk received. tcm uses neither; at tens of thousands of connections both cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.twisted.util import peer2str
from autobahn.wamp.types import TransportDetails

# Autobahn's protocol classes are only partly typed (and inconsistently so across their
# mixins); to the type checker this mixin stands on Any.
_Base: Any = Any if TYPE_CHECKING else object


def bind_options(factory: Any) -> None:
    """Give `factory` its own protocol subclass that carries the factory's WebSocket options
    as class attributes. Autobahn copies every option it does not find on the protocol into
    each connection's __dict__ (some forty of them); on the class they cost nothing per
    connection, and each factory keeps its own values."""
    base = factory.protocol
    options = {name: getattr(factory, name) for name in base.CONFIG_ATTRS}
    # With every option on the class, Autobahn's per-connection copy loop has nothing left to
    # copy; yet it walks the list and pformat()s all forty (name, value, source) entries for
    # a debug line that is never shown: a fifth of a swarm's CPU in a reconnect storm. An
    # empty list skips both; nothing else in Autobahn reads CONFIG_ATTRS.
    factory.protocol = type(
        base.__name__,
        (base,),
        {**options, "CONFIG_ATTRS": (), "__module__": base.__module__},
    )


class LeanWebSocketMixin(_Base):
    """Mix in before Autobahn's Twisted WebSocket protocol class."""

    def connectionMade(self) -> None:
        me: Any = self  # attributes Autobahn's two base classes declare differently
        me._transport_details = TransportDetails(
            channel_type=TransportDetails.CHANNEL_TYPE_TLS,
            channel_framing=TransportDetails.CHANNEL_FRAMING_WEBSOCKET,
            peer=peer2str(self.transport),
            is_server=self.is_server,
            is_secure=True,
        )
        me.peer = me._transport_details.peer
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # not a TCP socket (UNIX, memory): nothing to set
            pass
        self._connectionMade()

    # What Autobahn keeps of the opening handshake once it is done: the raw request and
    # response, the parsed headers, the offered protocols and extensions. Nothing reads them
    # after the handshake; at tens of thousands of sessions they are a kilobyte or two each.
    _HANDSHAKE_LEFTOVERS = (
        "http_headers",
        "http_request_data",
        "http_response_data",
        "http_status_line",
        "http_request_uri",
        "http_request_path",
        "http_request_params",
        "http_request_host",
        "websocket_protocols",
        "websocket_extensions",
        "websocket_origin",
        "_wskey",
    )

    def _onOpen(self) -> None:
        me: Any = self
        for name in self._HANDSHAKE_LEFTOVERS:
            if name in me.__dict__:
                me.__dict__[name] = None
        self.onOpen()

    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's sendData, without the debug line it formats on every send (its
        arguments cost more than the write itself; a fan-out makes one per connection)."""
        if sync or chopsize or self.send_queue:
            super().sendData(data, sync, chopsize)
            return
        self.transport.write(data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)


def settle_upgrade(protocol: Any, clock: Any) -> None:
    """At a server-side WebSocket's open, after an upgrade that came through twisted.web:
    keep nothing of the upgrade for the connection's lifetime.

    The HTTP channel is still registered as the TLS connection's producer, which keeps the
    channel, its never-finished request and their headers alive (about 6 KB a connection);
    the WebSocket has no use for it. TLS still holds the handshake's buffers: they are
    released once this turn's output (the 101 response, session tickets) has gone out."""
    protocol.transport.unregisterProducer()
    clock.callLater(0, _release_tls_buffers, protocol)


def _release_tls_buffers(protocol: Any) -> None:
    from tcm.server.ca import release_handshake_buffers

    transport = protocol.transport  # the TLS connection (ISystemHandle)
    if protocol.state == protocol.STATE_OPEN and transport is not None:
        protocol.tls_buffers_released = release_handshake_buffers(transport.getHandle())


class LinkEndMixin(_Base):
    """The accepting end of a node link (the server's, or a task server's for a gateway):
    binary link messages into `self.end` (a NodeLink or DownLink), its loss to `end.lost()`.
    Mix in before Autobahn's server protocol; `onConnect` sets `end`."""

    end: Any = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.end is None:
            return
        if not isBinary:
            from tcm.protocol import codes

            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, "node links use binary frames")
            return
        self.end.message_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.end is not None:
            self.end.lost()


def link_end_options(factory: Any, size: int, keepalive: float, timeout: float) -> None:
    """WebSocket options of a node link's accepting end; `size`: the largest message (a push
    carries many connection numbers)."""
    factory.setProtocolOptions(
        maxFramePayloadSize=size,
        maxMessagePayloadSize=size,
        failByDrop=False,
        autoPingInterval=keepalive,
        autoPingTimeout=timeout,
        openHandshakeTimeout=30,
        closeHandshakeTimeout=5,
        perMessageCompressionAccept=lambda offers: None,
    )
    bind_options(factory)
