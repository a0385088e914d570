"""What tcm's server and agent WebSocket protocols share on top of Autobahn.

Autobahn prepares WAMP TLS channel bindings on every connection (which needs the TLS protocol
itself as transport, while the server wraps it to log handshake failures) and formats debug
lines per chunk received. tcm uses neither; at tens of thousands of connections both cost.
The parts of Autobahn this reaches below its public API are in ``tcm.compat``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from autobahn.twisted.util import peer2str
from autobahn.wamp.types import TransportDetails

from tcm import compat
from tcm.protocol import codes
from tcm.tls.buffers import release_handshake_buffers

# Autobahn's protocol classes are only partly typed (and inconsistently so across their
# mixins); to the type checker this mixin stands on Any.
_Base: Any = Any if TYPE_CHECKING else object


def bind_options(factory: Any) -> None:
    """Give `factory` a protocol subclass that carries the factory's WebSocket options as
    class attributes, so connections copy none of them; factories with equal options share
    it (``compat.bind_websocket_options``)."""
    compat.bind_websocket_options(factory)


class LeanWebSocketMixin(compat.AutobahnOpenHook):
    """Mix in before Autobahn's Twisted WebSocket protocol class. At open, the handshake's
    leftovers are dropped and the connection's idle state left to the class
    (``compat.AutobahnOpenHook``), and so is Autobahn's send queue while it is empty."""

    # Autobahn's queue of chopped and synced sends, which tcm does not make: an empty deque
    # is 760 bytes a connection. Empty and shared until a send needs one (``sendData``).
    send_queue: Any = ()

    def _onOpen(self) -> None:
        if type(self.send_queue) is deque and not self.send_queue:
            del self.send_queue  # the class's empty one
        super()._onOpen()

    def connectionMade(self) -> None:
        details = TransportDetails(
            channel_type=TransportDetails.CHANNEL_TYPE_TLS,
            channel_framing=TransportDetails.CHANNEL_FRAMING_WEBSOCKET,
            peer=peer2str(self.transport),
            is_server=self.is_server,
            is_secure=True,
        )
        try:
            self.transport.setTcpNoDelay(True)
        except Exception:  # not a TCP socket (UNIX, memory): nothing to set
            pass
        compat.autobahn_connection_made(self, details)

    def dataReceived(self, data: bytes) -> None:
        compat.autobahn_data_received(self, data)
        # a frame put its state back into the connection's dict: once between frames, compact
        state = self.__dict__
        if "current_frame" in state and state["current_frame"] is None:
            if self.state == self.STATE_OPEN:
                compat.compact_websocket_state(self)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """Autobahn's sendData, without the debug line it formats on every send (its
        arguments cost more than the write itself; a fan-out makes one per connection)."""
        if sync or chopsize or self.send_queue:
            if type(self.send_queue) is not deque:
                self.send_queue = deque()  # Autobahn appends to it
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
    release_tls_buffers_soon(protocol, clock)


def release_tls_buffers_soon(protocol: Any, clock: Any) -> None:
    """Once this turn's output has gone out, give the connection's TLS fresh memory BIOs:
    after the handshake, and after a large message (a BIO keeps the capacity of the largest
    chunk it held: a 100 KB inventory read in 64 KB chunks left 64 KB on each of 10,000
    connections, most of what a full collection left behind; issue 18)."""
    clock.callLater(0, _release_tls_buffers, protocol)


def _release_tls_buffers(protocol: Any) -> None:
    transport = protocol.transport  # the TLS connection (ISystemHandle)
    if protocol.state == protocol.STATE_OPEN and transport is not None:
        if release_handshake_buffers(transport.getHandle()):
            protocol.tls_buffer_releases += 1


class LinkEndMixin(_Base):
    """The accepting end of a node link (the server's, or a task server's for a gateway):
    binary link messages into `self.end` (a NodeLink or DownLink), its loss to `end.lost()`.
    Mix in before Autobahn's server protocol; `onConnect` sets `end`."""

    end: Any = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.end is None:
            return
        if not isBinary:
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
