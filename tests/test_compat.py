"""Canaries for tcm.compat: each test checks that one private attribute of Twisted, Autobahn or
pyOpenSSL that tcm uses is still there and still does what tcm relies on. After a library
upgrade a failure here names the function in tcm/compat.py to look at."""

from __future__ import annotations

import pytest
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.wamp.types import TransportDetails
from OpenSSL import SSL
from twisted.application.internet import ClientService
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http

from tcm import compat
from tcm.server.ca import CertificateAuthority
from tcm.tls.server import server_tls_options
from tcm.wsbase import LeanWebSocketMixin

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: tcm.v1\r\n\r\n"
)


# -- pyOpenSSL: swap_memory_bios -----------------------------------------------------------


def test_openssl_binding_has_the_bio_calls():
    try:
        from OpenSSL._util import lib
    except ImportError:
        pytest.fail("OpenSSL._util is gone: compat.swap_memory_bios can no longer reach libssl")
    missing = [name for name in compat.BIO_CALLS if not hasattr(lib, name)]
    assert not missing, f"OpenSSL._util.lib lacks {missing}: compat.swap_memory_bios is off"


def test_openssl_binding_has_the_psk_calls():
    """compat.psk_find_session / psk_use_session (resumption tokens, tcm.tls.resumption)."""
    from OpenSSL._util import lib

    missing = [name for name in compat.PSK_CALLS if not hasattr(lib, name)]
    assert not missing, f"OpenSSL._util.lib lacks {missing}: resumption tokens are off"
    assert hasattr(SSL.Connection, "_reverse_mapping"), (
        "pyOpenSSL's Connection._reverse_mapping is gone: compat.psk_* cannot find the "
        "connection of a callback"
    )
    assert compat.psk_use_session(SSL.Context(SSL.TLS_METHOD), lambda c: None, b"\x13\x02")


def test_client_options_context_is_the_context_of_the_connections():
    from twisted.internet import ssl

    options = ssl.optionsForClientTLS("tcm.example")
    context = compat.client_options_context(options)
    assert isinstance(context, SSL.Context), (
        "ClientTLSOptions._createConnection is no longer a bound method of the "
        "CertificateOptions: compat.client_options_context"
    )

    class FakeTLS:
        class factory:
            wrappedFactory = None

    assert options.clientConnectionForTLS(FakeTLS()).get_context() is context


def test_tls_groups_are_set_or_refused():
    context = SSL.Context(SSL.TLS_METHOD)
    assert compat.set_tls_groups(context, "X25519:P-256")
    assert not compat.set_tls_groups(context, "X25519:nosuchgroup")


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory):
    """A function making a server and a client SSL.Connection over memory BIOs, handshaken."""
    ca = CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("ca")))
    key_pem, cert_pem = ca.issue_server_certificate(["tcm.example"])
    server_ctx = server_tls_options(key_pem, cert_pem, [ca.cert_pem]).getContext()
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_verify(SSL.VERIFY_NONE)

    def make() -> tuple[SSL.Connection, SSL.Connection]:
        ends = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
        ends[0].set_accept_state()
        ends[1].set_connect_state()
        for _ in range(10):
            for a, b in (ends[::-1], ends):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                _pump(a, b)
        _recv(ends[1])  # session tickets
        return ends

    return make


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    while True:
        try:
            b.bio_write(a.bio_read(65536))
        except SSL.WantReadError:
            return


def _recv(conn: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(conn.recv(65536))
        except SSL.WantReadError:
            return b"".join(chunks)


def test_memory_bio_connection_keeps_its_bios_where_swap_memory_bios_looks(tls_pair):
    server_end, _client_end = tls_pair()
    for name in ("_ssl", "_into_ssl", "_from_ssl"):
        assert getattr(server_end, name, None) is not None, (
            f"SSL.Connection has no {name}: compat.swap_memory_bios does nothing any more"
        )


def test_swapped_bios_are_used_and_carry_data(tls_pair):
    server_end, client_end = tls_pair()
    old = (server_end._into_ssl, server_end._from_ssl)
    assert compat.swap_memory_bios(server_end) is True, "compat.swap_memory_bios refused"
    assert (server_end._into_ssl, server_end._from_ssl) != old
    client_end.send(b"up")
    _pump(client_end, server_end)
    assert _recv(server_end) == b"up", "pyOpenSSL no longer reads through the swapped BIO"
    server_end.send(b"down" * 1000)
    _pump(server_end, client_end)
    assert _recv(client_end) == b"down" * 1000, "pyOpenSSL no longer writes to the swapped BIO"


# -- Twisted: ignore_lost_notification, request_disconnected -------------------------------


class _Endpoint:
    """Connects at once, to a StringTransport."""

    def __init__(self) -> None:
        self.protocols: list[object] = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.protocols.append(protocol)
        return succeed(protocol)


def _refused_connection(ignore: bool) -> tuple[ClientService, _Endpoint, Clock, object]:
    """A ClientService whose prepareConnection fails: the case tcm's sessions meet when the
    server refuses them."""
    clock, endpoint, prepared = Clock(), _Endpoint(), []

    def prepare(protocol):
        prepared.append(protocol)
        if ignore:
            compat.ignore_lost_notification(protocol)
        return fail(ValueError("session refused"))

    service = ClientService(
        endpoint,
        Factory.forProtocol(Protocol),
        retryPolicy=lambda attempt: 1.0,
        clock=clock,
        prepareConnection=prepare,
    )
    service.startService()
    return service, endpoint, clock, prepared[0]


def test_client_service_protocol_has_a_lost_notification():
    service, _endpoint, _clock, protocol = _refused_connection(ignore=False)
    assert hasattr(protocol, "_lostNotification"), (
        "ClientService's protocol has no _lostNotification: "
        "compat.ignore_lost_notification does nothing any more"
    )
    service.stopService()


def test_ignored_lost_notification_keeps_client_service_retrying():
    service, endpoint, clock, protocol = _refused_connection(ignore=True)
    protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    clock.advance(1.0)
    assert len(endpoint.protocols) == 2, "ClientService did not retry after a refused session"
    service.stopService()


def test_client_service_still_needs_the_lost_notification_ignored():
    service, _endpoint, _clock, protocol = _refused_connection(ignore=False)
    try:
        protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    except Exception:
        pass  # no transition for it: what compat.ignore_lost_notification works around
    else:
        pytest.fail(
            "ClientService now takes a connection loss after a failed prepareConnection: "
            "compat.ignore_lost_notification may no longer be needed"
        )
    finally:
        service.stopService()


def test_request_disconnected_follows_the_connection():
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    request = http.Request(channel)
    assert compat.request_disconnected(request) is False
    request.connectionLost(Failure(ConnectionDone()))
    assert compat.request_disconnected(request) is True, (
        "Request._disconnected is not set when the connection is lost: "
        "compat.request_disconnected always says False"
    )


# -- Autobahn ------------------------------------------------------------------------------


class _Plain(WebSocketServerProtocol):
    """Autobahn as it comes."""

    def onConnect(self, request):
        return "tcm.v1"


class _Hooked(compat.AutobahnOpenHook, _Plain):
    opened = 0

    def connectionMade(self) -> None:
        details = TransportDetails(
            channel_type=TransportDetails.CHANNEL_TYPE_TLS,
            channel_framing=TransportDetails.CHANNEL_FRAMING_WEBSOCKET,
            peer="tcp4:127.0.0.1:1",
            is_server=True,
            is_secure=True,
        )
        compat.autobahn_connection_made(self, details)

    def dataReceived(self, data: bytes) -> None:
        compat.autobahn_data_received(self, data)

    def onOpen(self) -> None:
        self.opened += 1


def _open(protocol_class, **options):
    factory = WebSocketServerFactory("ws://127.0.0.1:1", protocols=["tcm.v1"])
    factory.protocol = protocol_class
    factory.setProtocolOptions(**options)
    return factory


def _connect(factory) -> tuple[object, StringTransport]:
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_autobahn_keeps_transport_details_where_tcm_sets_them():
    protocol, _transport = _connect(_open(_Plain))
    assert hasattr(protocol, "_transport_details"), (
        "Autobahn no longer sets _transport_details: compat.autobahn_connection_made "
        "sets an attribute nothing reads"
    )
    assert callable(getattr(WebSocketServerProtocol, "_connectionMade", None)), (
        "Autobahn has no _connectionMade: compat.autobahn_connection_made breaks"
    )
    assert callable(getattr(WebSocketServerProtocol, "_dataReceived", None)), (
        "Autobahn has no _dataReceived: compat.autobahn_data_received breaks"
    )


def test_connection_started_through_compat_opens_and_frames():
    protocol, transport = _connect(_open(_Hooked))
    assert protocol.peer == "tcp4:127.0.0.1:1"
    protocol.dataReceived(UPGRADE)
    assert b"101 Switching Protocols" in transport.value(), "no upgrade through compat"
    assert protocol.opened == 1, "onOpen did not run after compat.AutobahnOpenHook._onOpen"
    transport.clear()
    protocol.sendMessage(b"x", isBinary=True)
    assert transport.value() == b"\x82\x01x"


def test_autobahn_calls_on_open_through_the_private_hook():
    calls = []

    class Recording(_Plain):
        def _onOpen(self) -> None:
            calls.append("_onOpen")
            super()._onOpen()

        def onOpen(self) -> None:
            calls.append("onOpen")

    protocol, _transport = _connect(_open(Recording))
    protocol.dataReceived(UPGRADE)
    assert calls == ["_onOpen", "onOpen"], (
        f"Autobahn's open goes {calls}, not through _onOpen: compat.AutobahnOpenHook is skipped"
    )


def test_handshake_leftovers_are_what_autobahn_keeps():
    protocol, _transport = _connect(_open(_Plain))
    protocol.dataReceived(UPGRADE)
    missing = [name for name in compat.HANDSHAKE_LEFTOVERS if name not in protocol.__dict__]
    assert not missing, (
        f"Autobahn no longer keeps {missing} after the handshake: "
        "update compat.HANDSHAKE_LEFTOVERS (it may keep others now)"
    )
    compat.drop_websocket_handshake(protocol)
    assert all(protocol.__dict__[name] is None for name in compat.HANDSHAKE_LEFTOVERS)


def test_idle_state_names_are_no_class_attributes_of_autobahn():
    from autobahn.twisted.websocket import WebSocketClientProtocol

    missing = object()
    for cls in (WebSocketServerProtocol, WebSocketClientProtocol):
        shadowed = [n for n in compat.IDLE_STATE if getattr(cls, n, missing) is not missing]
        assert not shadowed, (
            f"Autobahn's {cls.__name__} now has class attributes {shadowed}: "
            "compat.AutobahnOpenHook's idle defaults would shadow them"
        )


def _masked(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x82, 0x80 | len(payload)]) + mask + body


class _Lean(LeanWebSocketMixin, _Plain):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload[::-1], isBinary)


def _idle_values_held(protocol) -> list[str]:
    state = protocol.__dict__
    return [n for n, v in compat.IDLE_STATE.items() if n in state and state[n] is v]


def test_open_connection_keeps_no_idle_state_of_its_own_and_still_works():
    factory = _open(_Lean)
    compat.bind_websocket_options(factory)
    protocol, transport = _connect(factory)
    transport.setTcpNoDelay = lambda on: None
    protocol.dataReceived(UPGRADE)
    assert b"101 Switching Protocols" in transport.value()
    assert _idle_values_held(protocol) == []
    assert "send_queue" not in protocol.__dict__, "an empty send queue per connection"
    assert len(protocol.__dict__) <= 21, sorted(protocol.__dict__)
    transport.clear()
    whole = _masked(b"abcdefgh")
    protocol.dataReceived(whole[:7])  # a frame half read: its state is the connection's
    assert protocol.__dict__.get("current_frame") is not None
    protocol.dataReceived(whole[7:] + _masked(b"xy"))
    assert transport.value() == b"\x82\x08hgfedcba\x82\x02yx"
    assert _idle_values_held(protocol) == [], "compacted again between frames"
    assert "current_frame_masker" not in protocol.__dict__
    transport.clear()
    protocol.sendMessage(b"z", isBinary=True, sync=True)  # Autobahn's queue, made on demand
    assert transport.value() == b"\x82\x01z"
    protocol.sendClose(1000)
    assert protocol.closedByMe is True and protocol.state == protocol.STATE_CLOSING


def test_autobahn_copies_the_options_named_in_config_attrs():
    factory = _open(_Plain, maxFramePayloadSize=1234)
    protocol, _transport = _connect(factory)
    copied = [name for name in _Plain.CONFIG_ATTRS if name in protocol.__dict__]
    assert copied == list(_Plain.CONFIG_ATTRS), (
        "Autobahn no longer copies the CONFIG_ATTRS options into each connection: "
        "compat.bind_websocket_options relies on that list"
    )
    compat.bind_websocket_options(factory)
    protocol, _transport = _connect(factory)
    assert [name for name in _Plain.CONFIG_ATTRS if name in protocol.__dict__] == []
    assert protocol.maxFramePayloadSize == 1234


def test_auto_ping_can_be_rescheduled():
    clock = Clock()
    factory = _open(_Plain, autoPingInterval=600, autoPingTimeout=0)
    protocol, transport = _connect(factory)
    protocol.dataReceived(UPGRADE)
    assert protocol.autoPingPendingCall is not None, (
        "Autobahn keeps no autoPingPendingCall: compat.reschedule_auto_ping does nothing"
    )
    compat.reschedule_auto_ping(protocol, clock, 3.0)
    transport.clear()
    clock.advance(3.0)
    assert transport.value()[:1] == b"\x89", (
        "_sendAutoPing sent no ping: compat.reschedule_auto_ping is off"
    )
    assert protocol.autoPingPendingCall is None  # sent; nothing left on the real reactor


def test_a_peer_ping_can_stand_for_the_pong():
    clock = Clock()
    factory = _open(_Plain, autoPingInterval=600, autoPingTimeout=20)
    protocol, transport = _connect(factory)
    protocol.dataReceived(UPGRADE)
    compat.reschedule_auto_ping(protocol, clock, 1.0)
    clock.advance(1.0)  # our ping is out; its timeout runs
    assert protocol.autoPingTimeoutCall is not None and protocol.autoPingPending, (
        "Autobahn keeps no autoPingTimeoutCall: compat.ping_is_proof_of_life does nothing"
    )
    compat.ping_is_proof_of_life(protocol)
    assert protocol.autoPingTimeoutCall is None and protocol.autoPingPending is None, (
        "_cancelAutoPingTimeoutCall left the timeout: compat.ping_is_proof_of_life is off"
    )
    assert protocol.autoPingPendingCall is not None  # the next ping is scheduled
    protocol.autoPingPendingCall.cancel()  # nothing left on the real reactor
    compat.ping_is_proof_of_life(protocol)  # nothing pending: nothing to do


# -- Twisted: LeanTLSProtocol, wrap_client_tls ----------------------------------------------


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.shook = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data


@pytest.fixture(scope="module")
def tls_creators(tmp_path_factory):
    """Server options and a client connection creator of one CA, for tcm.example."""
    from tcm.tls import pki

    ca = CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("leanca")))
    key_pem, cert_pem = ca.issue_server_certificate(["tcm.example"])
    server = server_tls_options(key_pem, cert_pem, [ca.cert_pem])
    return server, pki.client_tls_options("tcm.example", ca.cert_pem)


def _tls_connection(factory_class, tls_creators):
    """A server and a client protocol of `factory_class` over iosim, handshaken, data sent
    both ways."""
    from twisted.test import iosim

    server_opts, client_opts = tls_creators
    clock = Clock()  # the TLS layer sends small writes at the next turn of this clock
    inner_server, inner_client = _Collect(), _Collect()
    server = factory_class(server_opts, False, Factory.forProtocol(lambda: inner_server), clock)
    client = factory_class(client_opts, True, Factory.forProtocol(lambda: inner_client), clock)
    sp, cp = server.buildProtocol(None), client.buildProtocol(None)
    pump = iosim.connect(sp, iosim.makeFakeServer(sp), cp, iosim.makeFakeClient(cp))
    inner_client.transport.write(b"hello up")
    inner_server.transport.write(b"hello down")
    clock.advance(0)
    pump.flush()
    return sp, cp, inner_server, inner_client


def test_lean_tls_protocol_sets_what_twisted_s_makeconnection_sets(tls_creators):
    from twisted.protocols.tls import TLSMemoryBIOFactory

    lean = _tls_connection(compat.LeanTLSFactory, tls_creators)
    plain = _tls_connection(TLSMemoryBIOFactory, tls_creators)
    for mine, twisted_s in zip(lean[:2], plain[:2], strict=True):
        assert set(vars(mine)) == set(vars(twisted_s)), (
            "TLSMemoryBIOProtocol.makeConnection sets other attributes now: "
            "look at compat.LeanTLSProtocol"
        )


def test_lean_tls_protocol_carries_data_and_the_transport_s_interfaces(tls_creators):
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import providedBy

    server, client, inner_server, inner_client = _tls_connection(
        compat.LeanTLSFactory, tls_creators
    )
    assert inner_server.data == b"hello up" and inner_client.data == b"hello down"
    assert inner_server.transport is server and inner_client.transport is client
    for tls in (server, client):
        assert set(providedBy(tls.transport)) <= set(providedBy(tls))
        assert ISSLTransport.providedBy(tls)


def test_lean_tls_protocol_declares_interfaces_once(tls_creators, monkeypatch):
    calls = []
    real = compat.directlyProvides
    monkeypatch.setattr(compat, "directlyProvides", lambda *a: calls.append(a) or real(*a))
    _tls_connection(compat.LeanTLSFactory, tls_creators)
    assert len(calls) == 2  # one per connection: server and client


def test_wrap_client_tls_connects_to_the_protocol_inside_tls(tls_creators):
    from twisted.internet.interfaces import IStreamClientEndpoint

    _server_opts, client_opts = tls_creators
    endpoint = _Endpoint()
    connected = []
    wrapped = compat.wrap_client_tls(client_opts, endpoint)
    assert IStreamClientEndpoint.providedBy(wrapped)
    wrapped.connect(Factory.forProtocol(_Collect)).addCallback(connected.append)
    (tls,) = endpoint.protocols
    assert isinstance(tls, compat.LeanTLSProtocol)
    assert connected == [tls.wrappedProtocol] and isinstance(connected[0], _Collect)
