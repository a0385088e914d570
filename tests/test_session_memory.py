"""What an idle session keeps on the server: nothing of the HTTP upgrade that opened it, no
handshake leftovers, and TLS memory BIOs released once the handshake is over; and the session
still works after each of these (real TLS, the real server in-process)."""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.web.http import Request

from tcm.compat import LeanTLSProtocol
from tcm.server.ca import CertificateAuthority
from tcm.tls.buffers import release_handshake_buffers
from tcm.tls.server import server_tls_options
from tests.inproc import inproc_server  # noqa: F401


def _server_side(server, agent_id):
    session = server.parts.presence.registry.get(agent_id)
    assert session is not None
    protocol = session.transport
    tls = protocol.transport  # the TLS layer itself: the handshake watcher hands it up
    assert isinstance(tls, LeanTLSProtocol)
    return session, protocol, tls


@pytest_twisted.ensureDeferred
async def test_open_session_keeps_nothing_of_the_upgrade(inproc_server):  # noqa: F811
    client, _welcome, identity = await inproc_server.session()
    session, protocol, tls = _server_side(inproc_server, identity.agent_id)
    # The HTTP channel that carried the upgrade is no longer the TLS connection's producer,
    # and with it the channel and its request are gone.
    assert tls._producer is None
    gc.collect()
    upgrades = [o for o in gc.get_objects() if isinstance(o, Request) and o.uri == b"/agent/v1/ws"]
    assert upgrades == []
    # Autobahn's copies of the opening handshake are dropped; what it still uses is kept.
    assert protocol.http_headers is None
    assert protocol.http_request_data is None
    assert protocol.websocket_protocols is None
    assert protocol.websocket_protocol_in_use == "tcm.v1"
    # The TLS memory BIOs were replaced by empty ones once the handshake was flushed.
    assert protocol.tls_buffer_releases >= 1
    # ... and the session works both ways.
    reply = await client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200, reply
    assert reply["data"]["body"] == {"agent_id": identity.agent_id, "transport": "websocket"}
    assert session.state.value == "open"
    # Between messages the connection keeps only what differs from its class's defaults
    # (compat.compact_websocket_state): a dict of the smallest table past the minimum.
    assert len(protocol.__dict__) <= 21, sorted(protocol.__dict__)
    assert "send_queue" not in protocol.__dict__


# -- release_handshake_buffers on bare OpenSSL connections --------------------------------


@pytest.fixture(scope="module")
def pair_factory(tmp_path_factory):
    ca = CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("ca")))
    key_pem, cert_pem = ca.issue_server_certificate(["tcm.example"])
    server_ctx = server_tls_options(key_pem, cert_pem, [ca.cert_pem]).getContext()
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_verify(SSL.VERIFY_NONE)

    def make():
        server = SSL.Connection(server_ctx, None)
        server.set_accept_state()
        client = SSL.Connection(client_ctx, None)
        client.set_connect_state()
        for _ in range(10):
            for a, b in ((client, server), (server, client)):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                _pump(a, b)
        assert server.get_protocol_version_name() == "TLSv1.3"
        return server, client

    return make


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    while True:
        try:
            data = a.bio_read(65536)
        except SSL.WantReadError:
            return
        b.bio_write(data)


def _recv(conn: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(conn.recv(65536))
        except SSL.WantReadError:
            return b"".join(chunks)


def test_released_connection_still_carries_data_both_ways(pair_factory):
    server, client = pair_factory()
    _pump(server, client)  # session tickets out of the server's BIO
    _recv(client)
    old = (server._into_ssl, server._from_ssl)
    assert release_handshake_buffers(server) is True
    assert (server._into_ssl, server._from_ssl) != old
    client.send(b"hello server")
    _pump(client, server)
    assert _recv(server) == b"hello server"
    server.send(b"hello agent" * 1000)
    _pump(server, client)
    assert _recv(client) == b"hello agent" * 1000


def test_not_released_while_bytes_wait_in_a_bio(pair_factory):
    server, client = pair_factory()
    _pump(server, client)
    _recv(client)
    # Bytes received but not yet decrypted: swapping the BIO would lose them.
    client.send(b"pending")
    server.bio_write(client.bio_read(65536))
    assert release_handshake_buffers(server) is False
    assert _recv(server) == b"pending"
    # Bytes encrypted but not yet sent.
    server.send(b"unsent")
    assert release_handshake_buffers(server) is False
    _pump(server, client)
    assert _recv(client) == b"unsent"
    # Both empty again: released.
    assert release_handshake_buffers(server) is True


def test_other_objects_are_left_alone():
    assert release_handshake_buffers(object()) is False
    assert release_handshake_buffers(None) is False
