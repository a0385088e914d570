"""Real TLS handshakes over loopback: one port, optional client certificates from the tcm CA.

The server side is the stack tcm runs: TLS (``server_tls_options``) -> ``HandshakeLogger``
-> the application factory, listening with ``TLSServerEndpoint`` (``tcm:`` endpoints: TCP
with ``tcm.compat.LeanTLSFactory``).
"""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, reactor, ssl
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import capturedLogs
from twisted.web import http, resource, server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tcm.compat import LeanTLSProtocol
from tcm.server.admission import HandshakeGate
from tcm.server.ca import CertificateAuthority
from tcm.tls import pki
from tcm.tls.endpoints import TLSServerEndpoint
from tcm.tls.handshake import HandshakeLogger
from tcm.tls.server import server_tls_options

TIMEOUT = 5  # seconds; every wait in this module is bounded by it


# -- certificates ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("ca")))


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory):
    return CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("foreign")), "other")


@pytest.fixture(scope="module")
def agent(ca):
    """(cert_pem, key_pem) of an enrolled agent."""
    key = pki.generate_key()
    return ca.sign_csr(pki.make_csr(key), "agent-0001"), pki.key_to_pem(key)


@pytest.fixture(scope="module")
def server_options(ca):
    key_pem, cert_pem = ca.issue_server_certificate(["tcm.example"])
    return server_tls_options(key_pem, cert_pem, [ca.cert_pem])


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _admin_pki():
    """The admin's own PKI: root -> intermediate -> server certificate for 127.0.0.1.

    Returns (root_pem, intermediate_pem, server_key_pem, server_cert_pem).
    """
    now = datetime.datetime.now(datetime.UTC)

    def issue(subject, issuer, public_key, signing_key, path_length, sans=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=path_length is not None, path_length=path_length),
                critical=True,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    root_key, mid_key, leaf_key = pki.generate_key(), pki.generate_key(), pki.generate_key()
    root = issue("Admin Root", "Admin Root", root_key.public_key(), root_key, 1)
    mid = issue("Admin Issuing CA", "Admin Root", mid_key.public_key(), root_key, 0)
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = issue("tcm.corp.example", "Admin Issuing CA", leaf_key.public_key(), mid_key, None, sans)
    return (
        pki.cert_to_pem(root),
        pki.cert_to_pem(mid),
        pki.key_to_pem(leaf_key),
        pki.cert_to_pem(leaf),
    )


# -- server side ----------------------------------------------------------------------------


class Connections:
    """Server-side connections of one test, so the test can wait until all are closed."""

    def __init__(self):
        self.closing: list[defer.Deferred] = []
        self.seen: list[Echo] = []

    def opened(self) -> defer.Deferred:
        d = defer.Deferred()
        self.closing.append(d)
        return d

    def settle(self) -> defer.Deferred:
        """Fires once every connection the server accepted so far is closed."""
        d = defer.gatherResults(list(self.closing))
        return d.addTimeout(TIMEOUT, reactor)


@implementer(IHandshakeListener)
class Echo(Protocol):
    """Echoes, and records what it can see of the TLS connection under it."""

    handshake_done = False

    def __init__(self, connections: Connections):
        self.connections = connections

    def connectionMade(self):
        self.closed = self.connections.opened()

    def handshakeCompleted(self):
        self.handshake_done = True

    def dataReceived(self, data):
        self.peer_cn = pki.peer_common_name(self.transport)
        self.tls = pki.negotiated_tls(self.transport)
        # OpenSSL hands out no peer chain on a resumed session; the leaf stays available.
        self.peer_chain = self.transport.getHandle().get_peer_cert_chain()
        self.connections.seen.append(self)
        self.transport.write(data)

    def connectionLost(self, reason):
        self.closed.callback(None)


class EchoFactory(Factory):
    connections: Connections

    def buildProtocol(self, addr):
        return Echo(self.connections)


class Server:
    def __init__(self, port, logger: HandshakeLogger, connections: Connections):
        self.port = port
        self.logger = logger
        self.connections = connections

    @property
    def number(self) -> int:
        return self.port.getHost().port


@pytest_twisted.async_yield_fixture
async def listen():
    """``listen(options, factory=None)`` -> Deferred[Server]; everything stops at teardown."""
    servers: list[Server] = []

    def start(options, factory=None, gate=None) -> defer.Deferred:
        connections = Connections()
        if factory is None:
            factory = EchoFactory()
        factory.connections = connections
        logger = HandshakeLogger(factory, gate)
        endpoint = TLSServerEndpoint(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), options)

        def started(port):
            servers.append(Server(port, logger, connections))
            return servers[-1]

        return endpoint.listen(logger).addCallback(started)

    yield start
    for s in servers:
        await s.connections.settle()
        await s.port.stopListening()
        assert s.logger.protocols == {}  # no per-connection bookkeeping in the logger


# -- client side ----------------------------------------------------------------------------


class Client(Protocol):
    """Sends one line, waits for the echo, closes."""

    received = b""
    tls = None
    ca_names = None
    session = None
    alpn = None

    def __init__(self, payload: bytes = b"ping\n"):
        self.payload = payload
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += data
        handle = self.transport.getHandle()
        self.tls = pki.negotiated_tls(self.transport)
        self.ca_names = handle.get_client_ca_list(as_cryptography=True)
        self.session = handle.get_session()
        self.alpn = self.transport.negotiatedProtocol
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(self)


def exchange(server: Server, creator, payload: bytes = b"ping\n") -> defer.Deferred:
    """Connect to ``server`` with the TLS ``creator``; fires with the closed Client."""
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", server.number))
    d = connectProtocol(endpoint, Client(payload))
    d.addCallback(lambda client: client.done)
    return d.addTimeout(TIMEOUT, reactor)


@implementer(IOpenSSLClientConnectionCreator)
class ResumingCreator:
    """Offers the session of an earlier connection, as a reconnecting agent would."""

    def __init__(self, inner):
        self.inner = inner
        self.session = None

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self.inner.clientConnectionForTLS(tlsProtocol)
        if self.session is not None:
            connection.set_session(self.session)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class OldTLSCreator:
    """A client that speaks TLS 1.0-1.1 only.

    At OpenSSL's default security level such a client cannot even send its ClientHello
    ("no protocols available"), which would make a refusal test pass without the server.
    Security level 0 lets it send one, so the server is the one that refuses.
    """

    def clientConnectionForTLS(self, tlsProtocol):
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        return SSL.Connection(context)


def _check_echoed(client: Client) -> None:
    assert client.received == b"ping\n"
    assert client.reason.check(ConnectionDone)


# -- (a) - (f): one port, optional client certificates ---------------------------------------


@pytest_twisted.inlineCallbacks
def test_agent_certificate_is_seen_by_the_server(ca, agent, server_options, listen):
    server = yield listen(server_options)
    client = yield exchange(server, pki.client_tls_options("tcm.example", ca.cert_pem, *agent))
    _check_echoed(client)
    [echo] = server.connections.seen
    assert echo.peer_cn == "agent-0001"
    assert echo.handshake_done  # HandshakeLogger passes handshakeCompleted on
    # ... and hands the TLS layer itself to the protocol above as its transport
    assert isinstance(echo.transport, LeanTLSProtocol)
    assert echo.tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert echo.tls["cipher"]
    assert client.tls == echo.tls
    yield server.connections.settle()
    assert server.logger.failures == {}


@pytest_twisted.inlineCallbacks
def test_identities_share_one_context_and_each_presents_its_own(ca, server_options, listen):
    """Agents trusting the same CA share the OpenSSL context (issue 17: a context per
    identity was about 30 KB); each connection still carries its own identity's certificate."""
    server = yield listen(server_options)
    names = ["agent-0101", "agent-0102", "agent-0103"]
    creators = []
    for name in names:
        key = pki.generate_key()
        cert = ca.sign_csr(pki.make_csr(key), name)
        key_pem = pki.key_to_pem(key)
        creators.append(pki.client_tls_options("tcm.example", ca.cert_pem, cert, key_pem))
    contexts = set()
    for creator in creators:
        assert isinstance(creator, pki.PresentingClientTLS)
        contexts.add(id(creator._shared))
    assert len(contexts) == 1
    clients = yield defer.gatherResults([exchange(server, c) for c in creators + creators[:1]])
    for client in clients:
        _check_echoed(client)
    assert sorted(echo.peer_cn for echo in server.connections.seen) == sorted([*names, names[0]])
    yield server.connections.settle()
    assert server.logger.failures == {}


def test_a_key_that_is_not_the_certificates_is_refused(ca, agent):
    cert_pem, _ = agent
    other = pki.key_to_pem(pki.generate_key())
    with pytest.raises(pki.CertificateError, match="does not belong"):
        pki.client_tls_options("tcm.example", ca.cert_pem, cert_pem, other)


class WatchedGate(HandshakeGate):
    """The real gate, noting the most handshakes it ever counted at once."""

    most = 0

    def _start(self, ticket):
        super()._start(ticket)
        self.most = max(self.most, self.in_progress)


@pytest_twisted.inlineCallbacks
def test_gated_port_serves_every_client_a_few_handshakes_at_a_time(
    ca, agent, server_options, listen
):
    gate = WatchedGate(reactor, limit=2)
    server = yield listen(server_options, gate=gate)
    creator = pki.client_tls_options("tcm.example", ca.cert_pem, *agent)
    clients = yield defer.gatherResults([exchange(server, creator) for _ in range(12)])
    for client in clients:
        _check_echoed(client)
    assert len(server.connections.seen) == 12
    assert {echo.peer_cn for echo in server.connections.seen} == {"agent-0001"}
    assert gate.most == 2  # never more than the limit, and the limit was reached
    assert gate.queued >= 1  # some waited their turn
    yield server.connections.settle()
    assert gate.in_progress == 0 and gate.waiting == 0
    assert server.logger.failures == {}


@pytest_twisted.inlineCallbacks
def test_client_without_certificate_is_let_in(ca, server_options, listen):
    server = yield listen(server_options)
    client = yield exchange(server, pki.client_tls_options("localhost", ca.cert_pem))
    _check_echoed(client)
    [echo] = server.connections.seen
    assert echo.peer_cn is None
    assert echo.tls["version"] in ("TLSv1.2", "TLSv1.3")
    # The server asked for a certificate and named the CA it accepts.
    assert client.ca_names == [ca.certificate.subject]


@pytest_twisted.inlineCallbacks
def test_certificate_from_a_foreign_ca_fails_and_is_logged(ca, foreign_ca, server_options, listen):
    key = pki.generate_key()
    foreign_cert = foreign_ca.sign_csr(pki.make_csr(key), "agent-0001")
    server = yield listen(server_options)
    with capturedLogs() as events:
        creator = pki.client_tls_options(
            "localhost", ca.cert_pem, foreign_cert, pki.key_to_pem(key)
        )
        client = yield exchange(server, creator)
        yield server.connections.settle()
    assert client.reason.check(SSL.Error)
    assert "unknown ca" in pki.describe_tls_error(client.reason.value)
    assert client.received == b""
    assert server.connections.seen == []
    assert server.logger.failures == {"certificate verify failed": 1}
    [warning] = [e for e in events if e.get("log_namespace", "").endswith("HandshakeLogger")]
    assert warning["log_format"] == "TLS handshake with {peer} failed: {reason}"
    assert warning["peer"].startswith("127.0.0.1:")
    assert warning["reason"] == "certificate verify failed"


@pytest_twisted.inlineCallbacks
def test_client_that_trusts_another_ca_refuses_the_server(foreign_ca, server_options, listen):
    server = yield listen(server_options)
    client = yield exchange(server, pki.client_tls_options("localhost", foreign_ca.cert_pem))
    assert client.reason.check(SSL.Error)
    assert pki.describe_tls_error(client.reason.value) == "certificate verify failed"
    yield server.connections.settle()
    assert server.logger.failures == {"tlsv1 alert unknown ca": 1}


@pytest_twisted.inlineCallbacks
def test_tls_1_1_client_is_refused(server_options, listen):
    server = yield listen(server_options)
    client = yield exchange(server, OldTLSCreator())
    assert client.reason.check(SSL.Error)
    assert "protocol version" in pki.describe_tls_error(client.reason.value)
    yield server.connections.settle()
    assert server.logger.failures == {"unsupported protocol": 1}


@pytest_twisted.inlineCallbacks
def test_server_certificate_validates_by_ip(ca, server_options, listen):
    server = yield listen(server_options)
    for address in ("127.0.0.1", "::1", "[::1]"):
        client = yield exchange(server, pki.client_tls_options(address, ca.cert_pem))
        _check_echoed(client)
    # An address the certificate does not name is refused: the IP check is real.
    client = yield exchange(server, pki.client_tls_options("192.0.2.7", ca.cert_pem))
    assert client.reason.check(VerificationError)
    client = yield exchange(server, pki.client_tls_options("other.example", ca.cert_pem))
    assert client.reason.check(VerificationError)


# -- beyond the basics -----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_admin_certificate_from_another_ca(ca, foreign_ca, agent, listen):
    """The admin's own server certificate and chain; agents still verified by the tcm CA."""
    root_pem, intermediate_pem, key_pem, cert_pem = _admin_pki()
    options = server_tls_options(key_pem, cert_pem, [ca.cert_pem], [intermediate_pem])
    server = yield listen(options)
    client = yield exchange(server, pki.client_tls_options("127.0.0.1", root_pem, *agent))
    _check_echoed(client)
    assert server.connections.seen[0].peer_cn == "agent-0001"
    # A bundle naming both CAs (as an agent package may carry) works as well.
    creator = pki.client_tls_options("127.0.0.1", ca.cert_pem + root_pem, *agent)
    _check_echoed((yield exchange(server, creator)))

    # Client certificates count only when the tcm CA issued them.
    key = pki.generate_key()
    foreign_cert = foreign_ca.sign_csr(pki.make_csr(key), "agent-0001")
    creator = pki.client_tls_options("127.0.0.1", root_pem, foreign_cert, pki.key_to_pem(key))
    assert (yield exchange(server, creator)).reason.check(SSL.Error)

    # Without the intermediate the chain does not reach the admin's root.
    no_chain = yield listen(server_tls_options(key_pem, cert_pem, [ca.cert_pem]))
    client = yield exchange(no_chain, pki.client_tls_options("127.0.0.1", root_pem))
    assert client.reason.check(SSL.Error)


@pytest_twisted.inlineCallbacks
def test_sessions_resume_with_the_client_certificate(ca, agent, server_options, listen):
    server = yield listen(server_options)
    creator = ResumingCreator(pki.client_tls_options("127.0.0.1", ca.cert_pem, *agent))
    first = yield exchange(server, creator)
    _check_echoed(first)
    creator.session = first.session
    second = yield exchange(server, creator)
    _check_echoed(second)
    full, resumed = server.connections.seen
    assert full.peer_chain is not None  # a full handshake: the client sent its certificate
    assert resumed.peer_chain is None  # resumed: no certificate on the wire ...
    assert resumed.peer_cn == "agent-0001"  # ... and the verified identity is still known


class WhoAmI(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        transport = request.channel.transport
        cn = pki.peer_common_name(transport) or "anonymous"
        return f"{cn} {pki.negotiated_tls(transport)['version']}".encode()


class TrackedChannel(http.HTTPChannel):
    def connectionMade(self):
        self.closed = self.site.connections.opened()
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.closed.callback(None)


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    def __init__(self, ca_pem, cert_pem=None, key_pem=None):
        self.args = (ca_pem, cert_pem, key_pem)

    def creatorForNetloc(self, hostname, port):
        return pki.client_tls_options(hostname.decode("ascii"), *self.args)


# readBody warns when the whole (tiny) body arrived before it was called: Twisted's quirk.
@pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")
@pytest_twisted.inlineCallbacks
def test_http_resource_sees_the_agent_through_the_wrapper(ca, agent, server_options, listen):
    site = server.Site(WhoAmI())
    site.protocol = TrackedChannel
    srv = yield listen(server_options, site)
    url = f"https://127.0.0.1:{srv.number}/".encode()
    pool = HTTPConnectionPool(reactor, persistent=False)
    bodies = []
    for policy in (TLSPolicy(ca.cert_pem, *agent), TLSPolicy(ca.cert_pem)):
        d = Agent(reactor, policy, pool=pool).request(b"GET", url)
        response = yield d.addTimeout(TIMEOUT, reactor)
        bodies.append((yield readBody(response)))
    yield pool.closeCachedConnections()
    assert bodies[0].split()[0] == b"agent-0001"
    assert bodies[0].split()[1] in (b"TLSv1.2", b"TLSv1.3")
    assert bodies[1].split()[0] == b"anonymous"


@pytest_twisted.inlineCallbacks
def test_alpn_clients_get_through_the_wrapper(ca, server_options, listen):
    """Browsers and curl offer ALPN. Twisted answers it from the factory right inside TLS
    and fails the handshake ("internal error") when that factory names no protocol, so
    the HandshakeLogger passes on the wrapped factory's list."""
    creator = ssl.optionsForClientTLS(
        "localhost",
        trustRoot=ssl.Certificate.loadPEM(ca.cert_pem),
        acceptableProtocols=[b"http/1.1"],
    )
    site = server.Site(WhoAmI())
    site.protocol = TrackedChannel
    web = yield listen(server_options, site)
    client = yield exchange(web, creator, b"GET / HTTP/1.0\r\n\r\n")
    assert client.received.startswith(b"HTTP/1.0 200 OK\r\n")
    assert client.alpn == b"http/1.1"
    # A factory that names no protocols gets http/1.1 rather than a failed handshake.
    echo = yield listen(server_options)
    client = yield exchange(echo, creator)
    _check_echoed(client)
    assert client.alpn == b"http/1.1"


# -- issue 17: the agent offers its last session; key exchange groups ------------------------


class RememberingClient(Client):
    """A client that hands its connection to the agent's identity, as the agent does once
    the server welcomed its session; records the key exchange group."""

    group = None

    def __init__(self, identity):
        super().__init__()
        self.identity = identity

    def dataReceived(self, data):
        from OpenSSL._util import ffi, lib

        name = lib.SSL_get0_group_name(self.transport.getHandle()._ssl)
        self.group = ffi.string(name).decode() if name != ffi.NULL else None
        self.kept = self.identity.remember_tls_session(self.transport)
        super().dataReceived(data)


def _exchange_as(server: Server, identity, host: str) -> defer.Deferred:
    endpoint = wrapClientTLS(
        identity.tls_options(host), TCP4ClientEndpoint(reactor, "127.0.0.1", server.number)
    )
    d = connectProtocol(endpoint, RememberingClient(identity))
    d.addCallback(lambda client: client.done)
    return d.addTimeout(TIMEOUT, reactor)


@pytest_twisted.inlineCallbacks
def test_agent_offers_its_last_session_and_forgets_it_when_renewed(
    ca, agent, server_options, listen
):
    from tcm.agent.link import Identity

    server = yield listen(server_options)
    identity = Identity(ca.cert_pem, *agent)
    first = yield _exchange_as(server, identity, "127.0.0.1")
    _check_echoed(first)
    assert first.kept  # the session (with its ticket) kept for the next connection
    second = yield _exchange_as(server, identity, "127.0.0.1")
    _check_echoed(second)
    identity.renewed(*agent)  # a new certificate: a resumed session would carry the old one
    third = yield _exchange_as(server, identity, "127.0.0.1")
    _check_echoed(third)
    full, resumed, after_renewal = server.connections.seen
    assert full.peer_chain is not None
    assert resumed.peer_chain is None and resumed.peer_cn == "agent-0001"
    assert after_renewal.peer_chain is not None  # a full handshake again


@pytest_twisted.inlineCallbacks
def test_tls_groups_choose_the_key_exchange(ca, agent, listen):
    from tcm.agent.link import Identity

    key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
    server = yield listen(server_tls_options(key_pem, cert_pem, [ca.cert_pem], groups="X25519"))
    client = yield _exchange_as(server, Identity(ca.cert_pem, *agent), "127.0.0.1")
    _check_echoed(client)
    assert client.group == "x25519"


def test_unknown_tls_groups_are_refused_at_start(ca):
    from twisted.python import usage

    from tcm.server.tap import Options
    from tcm.tls.pki import CertificateError
    from tcm.tls.server import tls_groups

    assert tls_groups("X25519:P-256") == "X25519:P-256"
    with pytest.raises(ValueError, match="not known to this OpenSSL"):
        tls_groups("X25519:nosuchgroup")
    key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
    with pytest.raises(CertificateError, match="not known"):
        server_tls_options(key_pem, cert_pem, [ca.cert_pem], groups="nosuchgroup")
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--state-dir", "/nonexistent", "--tls-groups", "nosuchgroup"])


def test_identities_keep_one_copy_of_the_ca_bundle(ca, agent):
    """Each agent of a swarm reads its own ca.pem: the identities keep one copy of it."""
    from tcm.tls.identity import Identity

    a = Identity(bytes(bytearray(ca.cert_pem)), *agent)
    b = Identity(bytes(bytearray(ca.cert_pem)), *agent)
    assert a.ca_pem == ca.cert_pem and a.ca_pem is b.ca_pem


# -- issue 17: resumption tokens, across a restart -------------------------------------------


class TokenEcho(Echo):
    """Answers with a resumption token for the agent on the connection, made the way the
    server's welcome makes it (tcm.server.hub), instead of the echo."""

    def dataReceived(self, data):
        import json
        import time

        from tcm.tls.resumption import token_message

        self.peer_cn = pki.peer_common_name(self.transport)
        self.fingerprint = pki.peer_fingerprint(self.transport)
        self.peer_chain = self.transport.getHandle().get_peer_cert_chain()
        self.kind = pki.handshake_kind(self.transport)
        self.connections.seen.append(self)
        peer = pki.resumption_peer(self.transport)
        token = token_message(*self.factory_keys.issue(peer, time.time()))
        self.transport.write(json.dumps(token).encode() + b"\n")


class TokenEchoFactory(Factory):
    connections: Connections

    def __init__(self, keys):
        self.keys = keys

    def buildProtocol(self, addr):
        protocol = TokenEcho(self.connections)
        protocol.factory_keys = self.keys
        return protocol


class TokenClient(Client):
    """Keeps the token it is answered with in the agent's identity, as the agent keeps a
    welcome's; records how its handshake went."""

    def __init__(self, identity):
        super().__init__()
        self.identity = identity

    def dataReceived(self, data):
        import json

        self.kind = pki.handshake_kind(self.transport)
        self.identity.remember_tls_session(self.transport, json.loads(data))
        super().dataReceived(data)


def _token_exchange(server: Server, identity) -> defer.Deferred:
    endpoint = wrapClientTLS(
        identity.tls_options("127.0.0.1"), TCP4ClientEndpoint(reactor, "127.0.0.1", server.number)
    )
    d = connectProtocol(endpoint, TokenClient(identity))
    d.addCallback(lambda client: client.done)
    return d.addTimeout(TIMEOUT, reactor)


@pytest.fixture(scope="module")
def token_server_identity(ca):
    return ca.issue_server_certificate(["127.0.0.1"])


def _token_server(listen, ca, identity, master: bytes, groups=None, clock=None):
    import time

    from tcm.tls.resumption import ResumptionKeys

    keys = ResumptionKeys(master)  # a new process: new contexts, new ticket keys
    key_pem, cert_pem = identity
    options = server_tls_options(
        key_pem, cert_pem, [ca.cert_pem], groups=groups, resumption=(keys, clock or time.time)
    )
    return listen(options, TokenEchoFactory(keys))


@pytest_twisted.inlineCallbacks
def test_a_token_resumes_on_the_next_server_without_certificates(
    ca, agent, token_server_identity, listen
):
    from tcm.tls.identity import Identity

    master = b"m" * 32
    identity = Identity(ca.cert_pem, *agent)
    before = yield _token_server(listen, ca, token_server_identity, master)
    first = yield _token_exchange(before, identity)
    assert first.kind == "full" and identity.token_for("127.0.0.1") is not None
    # the same secret in another server (a restart): the token resumes there
    after = yield _token_server(listen, ca, token_server_identity, master)
    second = yield _token_exchange(after, identity)
    assert second.reason.check(ConnectionDone)
    assert second.kind == "token"
    [full] = before.connections.seen
    [resumed] = after.connections.seen
    assert full.peer_chain is not None and full.kind == "full"
    assert resumed.peer_chain is None  # no certificate on the wire ...
    assert resumed.kind == "token"
    # ... and the agent is known by what the token names: its id and its certificate
    assert resumed.peer_cn == "agent-0001"
    assert (
        resumed.fingerprint == full.fingerprint == pki.fingerprint(pki.load_certificate(agent[0]))
    )
    assert pki.peer_subject(resumed.transport) == pki.peer_subject(full.transport)
    yield after.connections.settle()
    assert after.logger.completed == {"token": 1} and after.logger.failures == {}


@pytest_twisted.inlineCallbacks
def test_a_token_another_server_cannot_open_means_a_full_handshake(
    ca, agent, token_server_identity, listen
):
    from tcm.tls.identity import Identity

    identity = Identity(ca.cert_pem, *agent)
    first = yield _token_server(listen, ca, token_server_identity, b"a" * 32)
    yield _token_exchange(first, identity)
    other = yield _token_server(listen, ca, token_server_identity, b"b" * 32)
    with capturedLogs() as events:
        client = yield _token_exchange(other, identity)
        yield other.connections.settle()
    assert client.reason.check(ConnectionDone) and client.kind == "full"
    [seen] = other.connections.seen
    assert seen.peer_chain is not None and seen.peer_cn == "agent-0001"
    # the listener says why, once, naming the agent (its certificate) and its address
    assert other.logger.tokens_refused == {"sealed with other keys": 1}
    assert other.logger.completed == {"full": 1} and other.logger.failures == {}
    [line] = [e for e in events if "resumption token" in e.get("log_format", "")]
    assert line["agent"] == "agent-0001" and line["why"] == "sealed with other keys"
    assert line["peer"].startswith("127.0.0.1:") and line["log_level"].name == "info"
    # a server that asks for another hello (its group is not among the client's key
    # shares) gets no PSK in it: a full handshake, not a failure
    retry = yield _token_server(listen, ca, token_server_identity, b"b" * 32, groups="P-256")
    client = yield _token_exchange(retry, identity)
    assert client.reason.check(ConnectionDone) and client.kind == "full"


@pytest_twisted.inlineCallbacks
def test_an_expired_or_forged_token_means_a_full_handshake_and_a_log_line(
    ca, agent, token_server_identity, listen
):
    import os
    import time

    from tcm.tls.identity import Identity

    master = b"e" * 32
    identity = Identity(ca.cert_pem, *agent)
    first = yield _token_server(listen, ca, token_server_identity, master)
    yield _token_exchange(first, identity)
    # the same keys, 31 days later (the agent's clock kept it: the server judges)
    later = yield _token_server(
        listen, ca, token_server_identity, master, clock=lambda: time.time() + 31 * 86400
    )
    client = yield _token_exchange(later, identity)
    yield later.connections.settle()
    assert client.reason.check(ConnectionDone) and client.kind == "full"
    assert later.logger.tokens_refused == {"expired": 1}
    # an identity made up (a forged token, with some key): not sealed by these keys
    server = yield _token_server(listen, ca, token_server_identity, master)
    identity._tokens["127.0.0.1"] = (b"\x01" + os.urandom(80), os.urandom(48), time.time() + 60)
    client = yield _token_exchange(server, identity)
    yield server.connections.settle()
    assert client.reason.check(ConnectionDone) and client.kind == "full"
    assert server.logger.tokens_refused == {"sealed with other keys": 1}
    assert server.logger.completed == {"full": 1} and server.logger.failures == {}
    [seen] = server.connections.seen
    assert seen.peer_cn == "agent-0001" and seen.peer_chain is not None


@pytest_twisted.inlineCallbacks
def test_a_token_with_the_wrong_key_fails_the_handshake(ca, agent, token_server_identity, listen):
    import time

    from tcm.tls.identity import Identity
    from tcm.tls.resumption import Resumed, ResumptionKeys

    master = b"k" * 32
    server = yield _token_server(listen, ca, token_server_identity, master)
    cert = pki.load_certificate(agent[0])
    peer = Resumed("agent-0001", None, pki.fingerprint(cert), pki.not_after(cert))
    # a genuine identity (seen on the wire: identities are sent in the clear) with a key
    # guessed: the server opens it, and the binder does not verify
    token, _, lifetime = ResumptionKeys(master).issue(peer, time.time())
    identity = Identity(ca.cert_pem, *agent)
    identity._tokens["127.0.0.1"] = (token, b"x" * 48, time.time() + lifetime)
    assert identity.token_for("127.0.0.1") == (token, b"x" * 48)
    client = yield _token_exchange(server, identity)
    assert client.reason.check(SSL.Error)
    assert server.connections.seen == []
    yield server.connections.settle()
    assert sum(server.logger.failures.values()) == 1
