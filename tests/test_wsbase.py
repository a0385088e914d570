"""tcm.wsbase: protocol classes carry the WebSocket options (one per set of options), so
connections copy nothing, and the handshake's leftovers are dropped once a connection is open."""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.testing import StringTransport

from tcm.wsbase import LeanWebSocketMixin, bind_options


class _Server(LeanWebSocketMixin, WebSocketServerProtocol):
    opened = False

    def onConnect(self, request):
        return "tcm.v1"

    def onOpen(self):
        self.opened = True


def _factory(**options):
    factory = WebSocketServerFactory("ws://127.0.0.1:1", protocols=["tcm.v1"])
    factory.protocol = _Server
    factory.setProtocolOptions(**options)
    bind_options(factory)
    return factory


def _upgrade(protocol) -> None:
    protocol.dataReceived(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: tcm.v1\r\n\r\n"
    )


def test_options_live_on_a_class_of_each_factory():
    a = _factory(maxFramePayloadSize=1234, autoPingInterval=0)
    b = _factory(maxFramePayloadSize=99)
    assert a.protocol is not b.protocol
    assert issubclass(a.protocol, _Server)
    assert a.protocol.maxFramePayloadSize == 1234
    assert b.protocol.maxFramePayloadSize == 99
    assert a.protocol.CONFIG_ATTRS == ()  # nothing to copy per connection
    assert _Server.CONFIG_ATTRS  # the base class is untouched


def test_factories_with_equal_options_share_their_class_and_rebind_when_one_changes():
    """A swarm's agents have a factory each with the same options: one class for all (a
    class is about 3 KB; issue 17). A factory whose option changes binds again, from the
    base class, and the others keep theirs."""
    a = _factory(maxFramePayloadSize=777, autoPingInterval=50, allowedOrigins=["*"])
    b = _factory(maxFramePayloadSize=777, autoPingInterval=50, allowedOrigins=["*"])
    assert a.protocol is b.protocol
    shared = a.protocol
    a.autoPingInterval = 40
    bind_options(a)
    assert a.protocol is not shared and a.protocol.__bases__ == (_Server,)
    assert a.protocol.autoPingInterval == 40
    assert b.protocol is shared and shared.autoPingInterval == 50
    c = _factory(maxFramePayloadSize=777, autoPingInterval=40, allowedOrigins=["*"])
    assert c.protocol is a.protocol


def test_connection_copies_no_option_and_drops_the_handshake_after_open():
    factory = _factory(maxFramePayloadSize=1234, maxMessagePayloadSize=4321)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for name in WebSocketServerProtocol.CONFIG_ATTRS:
        assert name not in protocol.__dict__, name
    assert protocol.maxFramePayloadSize == 1234
    _upgrade(protocol)
    assert b"101 Switching Protocols" in transport.value()
    assert protocol.opened
    assert protocol.http_headers is None
    assert protocol.http_request_data is None
    assert protocol.websocket_protocols is None
    assert protocol.websocket_protocol_in_use == "tcm.v1"
    # and it still frames messages
    transport.clear()
    protocol.sendMessage(b'{"x":1}', isBinary=False)
    assert transport.value().endswith(b'{"x":1}')
