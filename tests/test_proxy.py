"""The CONNECT tunnel endpoint (``tcm.agent.proxy``).

Unit tests drive the tunnel with ``MemoryReactorClock`` and ``StringTransport``; the
integration tests run HTTPS and a WebSocket with mutual TLS end to end through a real
tinyproxy to a real TLS server on loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest
import pytest_twisted
import treq
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.internet import ClientService
from twisted.internet import defer, reactor
from twisted.internet.address import HostnameAddress, IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import SSL4ServerEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    NoProtocol,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcm.agent.link import HttpsClient, Identity
from tcm.agent.proxy import MAX_RESPONSE_HEAD, HTTPProxy, ProxyError, TunnelEndpoint
from tcm.server.ca import CertificateAuthority
from tcm.tls import pki
from tcm.tls.server import server_tls_options

TIMEOUT = 10  # seconds; every wait on the real reactor is bounded by it


# -- unit tests: the tunnel on a memory reactor -----------------------------------------------


class Recorder(Protocol):
    """The "real" protocol: records what reaches it."""

    def __init__(self):
        self.made = False
        self.received: list[bytes] = []
        self.lost: Failure | None = None

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = reason


class RecorderFactory(Factory):
    def __init__(self):
        self.addresses: list[object] = []
        self.built: list[Recorder] = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        self.built.append(Recorder())
        return self.built[-1]


class Attempt:
    """One ``connect()`` through a proxy on a memory reactor."""

    def __init__(
        self, proxy=None, host="tcm.example", port=8443, timeout=30.0, factory=None, wrap=None
    ):
        self.reactor = MemoryReactorClock()
        self.proxy = proxy or HTTPProxy("proxy.corp", 3128)
        self.endpoint = self.proxy.endpoint_to(self.reactor, host, port, timeout=timeout)
        self.factory = factory or RecorderFactory()
        endpoint = self.endpoint if wrap is None else wrap(self.endpoint)
        self.result = endpoint.connect(self.factory)
        [(self.proxy_host, self.proxy_port, self.tcp_factory, _, _)] = self.reactor.tcpClients
        self.transport: StringTransport | None = None

    def reach_proxy(self) -> StringTransport:
        """The TCP connection to the proxy is made."""
        self.transport = StringTransport()
        tunnel = self.tcp_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 3128))
        tunnel.makeConnection(self.transport)
        self.tunnel = tunnel
        return self.transport

    def answer(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.tunnel.dataReceived(chunk)

    def error(self) -> ProxyError:
        failure = self.failure()
        assert failure.check(ProxyError), failure
        return failure.value

    def failure(self) -> Failure:
        failures: list[Failure] = []
        self.result.addErrback(failures.append)
        assert failures, "the attempt has not failed"
        return failures[0]

    def protocol(self):
        results: list[object] = []
        self.result.addCallback(results.append)
        assert results, "the attempt has not succeeded"
        return results[0]


OK = b"HTTP/1.1 200 Connection established\r\nProxy-Agent: test\r\n\r\n"


def test_endpoint_provides_the_interface():
    endpoint = HTTPProxy("proxy.corp").endpoint_to(MemoryReactorClock(), "tcm.example", 443)
    assert isinstance(endpoint, TunnelEndpoint)
    assert verifyObject(IStreamClientEndpoint, endpoint)


def test_connects_to_the_proxy_and_sends_connect():
    attempt = Attempt()
    assert attempt.proxy_port == 3128
    transport = attempt.reach_proxy()
    assert transport.value() == (
        b"CONNECT tcm.example:8443 HTTP/1.1\r\nHost: tcm.example:8443\r\n\r\n"
    )
    assert not attempt.result.called


def test_connect_request_carries_basic_credentials():
    attempt = Attempt(HTTPProxy.parse("http://agent%40corp:s%3Acret@proxy.corp:8080"))
    assert attempt.proxy_port == 8080
    # base64("agent@corp:s:cret")
    assert attempt.reach_proxy().value() == (
        b"CONNECT tcm.example:8443 HTTP/1.1\r\n"
        b"Host: tcm.example:8443\r\n"
        b"Proxy-Authorization: Basic YWdlbnRAY29ycDpzOmNyZXQ=\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    "host, authority",
    [
        ("::1", b"[::1]:8443"),
        ("[2001:db8::7]", b"[2001:db8::7]:8443"),
        ("10.1.2.3", b"10.1.2.3:8443"),
    ],
)
def test_ip_literals_in_connect(host, authority):
    attempt = Attempt(host=host)
    assert attempt.reach_proxy().value().startswith(b"CONNECT " + authority + b" HTTP/1.1\r\n")


def test_200_hands_the_connection_to_the_real_protocol():
    attempt = Attempt()
    transport = attempt.reach_proxy()
    # The first bytes of the far end come in the same chunk as the end of the head.
    attempt.answer(OK[:10], OK[10:] + b"early")
    real = attempt.protocol()
    assert isinstance(real, Recorder) and real.made
    assert real.transport is transport
    assert real.received == [b"early"]
    assert attempt.factory.addresses == [HostnameAddress(b"tcm.example", 8443)]
    attempt.answer(b"later", b"and later")
    assert real.received == [b"early", b"later", b"and later"]
    real.transport.write(b"to the far end")
    assert transport.value().endswith(b"\r\n\r\nto the far end")
    assert attempt.reactor.getDelayedCalls() == []  # the timeout is off
    attempt.tunnel.connectionLost(Failure(ConnectionLost("gone")))
    assert real.lost is not None and real.lost.check(ConnectionLost)


def test_head_split_byte_by_byte_and_an_interim_response():
    attempt = Attempt()
    attempt.reach_proxy()
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + b"HTTP/1.0 200 OK\n\nx"
    attempt.answer(*(answer[i : i + 1] for i in range(len(answer))))
    assert attempt.protocol().received == [b"x"]


def test_refusal_carries_the_status_text():
    attempt = Attempt()
    transport = attempt.reach_proxy()
    attempt.answer(
        b"HTTP/1.1 403 Access violation\r\nContent-Type: text/html\r\n\r\n<html>no</html>"
    )
    error = attempt.error()
    assert str(error) == (
        "proxy proxy.corp:3128 refused CONNECT to tcm.example:8443: 403 Access violation"
    )
    assert error.status == 403
    assert isinstance(error, ConnectionError)
    assert transport.disconnecting and transport.disconnected  # aborted
    assert attempt.factory.built == []
    attempt.answer(b"more body")  # ignored
    attempt.tunnel.connectionLost(Failure(ConnectionDone()))  # ignored: already failed


def test_407_without_credentials():
    attempt = Attempt()
    attempt.reach_proxy()
    attempt.answer(
        b"HTTP/1.0 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="Tinyproxy"\r\n\r\n'
    )
    error = attempt.error()
    assert error.status == 407
    assert str(error) == (
        "proxy proxy.corp:3128 requires authentication (407 Proxy Authentication Required), "
        'it offers Basic realm="Tinyproxy"'
    )


@pytest.mark.parametrize(
    "status_line", [b"HTTP/1.1 407 Proxy Authentication Required", b"HTTP/1.0 401 Unauthorized"]
)
def test_rejected_credentials(status_line):
    attempt = Attempt(HTTPProxy("proxy.corp", 3128, "agent", "wrong"))
    attempt.reach_proxy()
    attempt.answer(status_line + b"\r\n\r\n")
    error = attempt.error()
    assert "rejected the credentials of user 'agent'" in str(error)
    assert status_line[9:].decode() in str(error)
    assert "wrong" not in str(error)


@pytest.mark.parametrize(
    "answer, shown",
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "b'SSH-2.0-OpenSSH_9.6'"),  # refused at once, no head end
        (b"\x16\x03\x01\x00", "b'\\x16\\x03\\x01\\x00'"),  # a TLS server
        (b"HTTP/1.1 OK\r\n\r\n", "b'HTTP/1.1 OK'"),
        (b"HTTP/1.1 2000 Yes\r\n\r\n", "b'HTTP/1.1 2000 Yes'"),
    ],
)
def test_garbage_answer(answer, shown):
    attempt = Attempt()
    transport = attempt.reach_proxy()
    attempt.answer(answer)
    error = attempt.error()
    assert str(error) == (
        f"proxy proxy.corp:3128 sent an invalid response to CONNECT to tcm.example:8443: {shown}"
    )
    assert error.status is None
    assert transport.disconnected


def test_oversized_head():
    attempt = Attempt()
    transport = attempt.reach_proxy()
    attempt.answer(b"HTTP/1.1 200 OK\r\n")
    for _ in range(MAX_RESPONSE_HEAD // 1000):
        attempt.answer(b"X-Padding: " + b"a" * 1000 + b"\r\n")
        assert not attempt.result.called
    attempt.answer(b"X-Padding: " + b"a" * 1000 + b"\r\n")
    assert "sent a response head over 16384 bytes" in str(attempt.error())
    assert transport.disconnected


def test_head_that_ends_past_the_limit_is_refused_too():
    attempt = Attempt()
    attempt.reach_proxy()
    attempt.answer(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_RESPONSE_HEAD + b"\r\n\r\n")
    assert "over 16384 bytes" in str(attempt.error())


def test_connection_closed_before_the_answer():
    attempt = Attempt()
    attempt.reach_proxy()
    attempt.answer(b"HTTP/1.1 20")
    attempt.tunnel.connectionLost(Failure(ConnectionDone()))
    assert str(attempt.error()) == (
        "proxy proxy.corp:3128 closed the connection before answering CONNECT to tcm.example:8443"
    )


def test_proxy_unreachable():
    attempt = Attempt()
    [connector] = attempt.reactor.connectors
    attempt.tcp_factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    attempt.reactor.advance(0.3)  # HostnameEndpoint looks at its attempts every 0.3 s
    error = attempt.error()
    assert str(error).startswith("cannot connect to proxy proxy.corp:3128: Connection was refused")
    assert isinstance(error.__cause__, ConnectionRefusedError)


def test_timeout_waiting_for_the_answer():
    attempt = Attempt(timeout=7)
    transport = attempt.reach_proxy()
    attempt.reactor.advance(6.9)
    assert not attempt.result.called
    attempt.reactor.advance(0.1)
    assert str(attempt.error()) == (
        "proxy proxy.corp:3128 did not answer CONNECT to tcm.example:8443 within 7 s"
    )
    assert transport.disconnected
    attempt.answer(OK)  # too late: ignored
    assert attempt.factory.built == []


def test_timeout_reaching_the_proxy():
    attempt = Attempt(timeout=5)
    [connector] = attempt.reactor.connectors
    attempt.reactor.advance(5)
    assert str(attempt.error()) == "could not connect to proxy proxy.corp:3128 within 5 s"
    assert connector.stoppedConnecting


def test_cancel_while_waiting_for_the_answer():
    attempt = Attempt()
    transport = attempt.reach_proxy()
    attempt.result.cancel()
    assert attempt.failure().check(CancelledError)
    assert transport.disconnected
    assert attempt.reactor.getDelayedCalls() == []
    attempt.tunnel.connectionLost(Failure(ConnectionLost()))  # ignored


def test_cancel_while_reaching_the_proxy():
    attempt = Attempt()
    [connector] = attempt.reactor.connectors
    attempt.result.cancel()
    assert attempt.failure().check(CancelledError)
    assert connector.stoppedConnecting
    assert attempt.reactor.getDelayedCalls() == []


def test_client_service_stop_cancels_the_attempt():
    """ClientService cancels a pending connect() when it stops: the tunnel must go."""
    reactor_ = MemoryReactorClock()
    endpoint = HTTPProxy("proxy.corp").endpoint_to(reactor_, "tcm.example", 443)
    service = ClientService(endpoint, RecorderFactory(), clock=reactor_)
    service.startService()
    [(_, _, tcp_factory, _, _)] = reactor_.tcpClients
    transport = StringTransport()
    tcp_factory.buildProtocol(None).makeConnection(transport)
    assert transport.value().startswith(b"CONNECT tcm.example:443 ")
    stopped = service.stopService()
    assert transport.disconnected
    assert stopped.called


def test_factory_that_declines():
    class Declines(Factory):
        def buildProtocol(self, addr):
            return None

    attempt = Attempt(factory=Declines())
    transport = attempt.reach_proxy()
    attempt.answer(OK)
    assert attempt.failure().check(NoProtocol)
    assert transport.disconnected


def test_under_wrap_client_tls():
    """TLSMemoryBIOProtocol is the real protocol: it speaks TLS through the tunnel."""
    attempt = Attempt(wrap=lambda inner: wrapClientTLS(optionsForClientTLS("tcm.example"), inner))
    transport = attempt.reach_proxy()
    request = transport.value()
    attempt.answer(OK)
    # wrapClientTLS unwraps the TLS protocol: the caller gets its own protocol.
    assert attempt.protocol() is attempt.factory.built[0]
    client_hello = transport.value()[len(request) :]
    assert client_hello[:1] == b"\x16"  # a TLS handshake record
    assert b"tcm.example" in client_hello  # SNI


def test_logs_the_outcome_without_the_password():
    proxy = HTTPProxy("proxy.corp", 3128, "agent", "s3cret")
    with capturedLogs() as events:
        ok = Attempt(proxy)
        ok.reach_proxy()
        ok.answer(OK)
        refused = Attempt(proxy)
        refused.reach_proxy()
        refused.answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        refused.error()
    mine = [e for e in events if e.get("log_namespace", "").startswith("tcm.agent.proxy")]
    assert [e["log_format"] for e in mine] == [
        "CONNECT to {target} through {proxy}: {status} {reason}",
        "CONNECT to {target} through {proxy} failed: {error}",
    ]
    assert mine[0]["status"] == 200 and mine[0]["target"] == "tcm.example:8443"
    assert mine[0]["proxy"] == "http://agent:***@proxy.corp:3128"
    assert mine[1]["error"].endswith("502 Bad Gateway")
    assert "s3cret" not in repr(mine)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {len(data)})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    return [piece for piece in pieces if piece]


@settings(max_examples=300)
@given(answer=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_any_answer_ends_in_a_tunnel_an_error_or_more_waiting(answer, cuts):
    attempt = Attempt()
    attempt.reach_proxy()
    for chunk in _split(answer, cuts):
        attempt.answer(chunk)  # never raises
    outcome: list[object] = []
    attempt.result.addBoth(outcome.append)
    if not outcome:  # only the beginning of an answer is worth waiting for
        assert b"HTTP/".startswith(answer[:5])
    elif isinstance(outcome[0], Failure):
        assert outcome[0].check(ProxyError)
    else:  # the real protocol got the end of the answer, after a head
        assert outcome[0] is attempt.factory.built[0]
        assert answer.endswith(b"".join(outcome[0].received))
        assert answer.startswith(b"HTTP/")


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@settings(max_examples=300)
@given(
    interim=st.booleans(),
    status=st.integers(200, 299),
    reason=_text,
    headers=st.lists(st.tuples(_token, _text), max_size=5),
    payload=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 600), max_size=10),
)
def test_payload_after_any_2xx_head_reaches_the_real_protocol_intact(
    interim, status, reason, headers, payload, cuts
):
    head = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    head += f"HTTP/1.1 {status} {reason}\r\n".encode()
    head += b"".join(f"{name}: {value}\r\n".encode() for name, value in headers) + b"\r\n"
    attempt = Attempt()
    attempt.reach_proxy()
    for chunk in _split(head + payload, cuts):
        attempt.answer(chunk)
    assert b"".join(attempt.protocol().received) == payload


# -- HTTPProxy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://proxy.corp:8080", HTTPProxy("proxy.corp", 8080)),
        ("http://proxy.corp:8080/", HTTPProxy("proxy.corp", 8080)),
        ("HTTP://Proxy.Corp", HTTPProxy("proxy.corp", 3128)),
        ("http://10.0.0.1:3128", HTTPProxy("10.0.0.1", 3128)),
        ("http://[::1]:8888", HTTPProxy("::1", 8888)),
        ("http://agent:pw@proxy.corp:3128", HTTPProxy("proxy.corp", 3128, "agent", "pw")),
        ("http://a%40corp:p%3A%2Fw%40@p:1", HTTPProxy("p", 1, "a@corp", "p:/w@")),
        ("http://agent@proxy.corp:3128", HTTPProxy("proxy.corp", 3128, "agent", None)),
        ("  http://proxy.corp:1  ", HTTPProxy("proxy.corp", 1)),
    ],
)
def test_parse(url, expected):
    assert HTTPProxy.parse(url) == expected


@pytest.mark.parametrize(
    "url, message",
    [
        ("https://proxy.corp:3128", "must be http://"),
        ("socks5://proxy.corp:1080", "must be http://"),
        ("proxy.corp:3128", "must be http://"),
        ("http://", "names no host"),
        ("http://:3128", "names no host"),
        ("http://proxy.corp:99999", "not a proxy URL"),
        ("http://proxy.corp:port", "not a proxy URL"),
        ("http://proxy.corp:3128/path", "must end after HOST[:PORT]"),
        ("http://proxy.corp:3128?x=1", "must end after HOST[:PORT]"),
        ("http://a%3Ab:pw@proxy.corp:3128", "cannot contain ':'"),
    ],
)
def test_parse_refuses(url, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        HTTPProxy.parse(url)


def test_parse_errors_hide_the_password():
    with pytest.raises(ValueError) as info:
        HTTPProxy.parse("https://agent:s3cret@proxy.corp:3128")
    assert "s3cret" not in str(info.value)
    assert "agent:***@proxy.corp" in str(info.value)


def test_str_and_repr_hide_the_password():
    proxy = HTTPProxy.parse("http://a%40corp:s3cret@proxy.corp:3128")
    assert str(proxy) == "http://a%40corp:***@proxy.corp:3128"
    assert "s3cret" not in repr(proxy)
    assert "password='***'" in repr(proxy)
    assert str(HTTPProxy("::1", 8888)) == "http://[::1]:8888"
    assert str(HTTPProxy("p", 1, "agent")) == "http://agent@p:1"
    assert HTTPProxy.parse(str(HTTPProxy("::1", 8888))) == HTTPProxy("::1", 8888)


def test_bad_values():
    with pytest.raises(ValueError):
        HTTPProxy("proxy.corp", 0)
    with pytest.raises(ValueError):
        HTTPProxy("proxy corp", 3128)
    with pytest.raises(ValueError):
        HTTPProxy("proxy.corp").endpoint_to(MemoryReactorClock(), "tcm.example\r\nX: y", 443)
    with pytest.raises(ValueError):
        HTTPProxy("proxy.corp").endpoint_to(MemoryReactorClock(), "tcm.example", 70000)
    with pytest.raises(ValueError, match="not a usable host name"):
        HTTPProxy("proxy.corp").endpoint_to(MemoryReactorClock(), "a" * 64 + ".example", 443)
    endpoint = HTTPProxy("proxy.corp").endpoint_to(MemoryReactorClock(), "bücher.example", 443)
    assert endpoint.target == "xn--bcher-kva.example:443"
    with pytest.raises(ValueError):
        HTTPProxy("proxy.corp").endpoint_to(MemoryReactorClock(), "tcm.example", 443, timeout=0)


# -- integration: a real tinyproxy, a real TLS server -----------------------------------------

TINYPROXY = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/bin:/usr/sbin")
# tinyproxy is part of the test environment (.ci/run installs it): missing, the tests fail.
needs_tinyproxy = pytest.mark.usefixtures("tinyproxy_installed")


@pytest.fixture
def tinyproxy_installed():
    if TINYPROXY is None:
        pytest.fail("tinyproxy is not installed: apt-get install tinyproxy (.ci/run does)")


class Tinyproxy:
    """One tinyproxy in the foreground (``-d``) on a free loopback port."""

    def __init__(self, directory, connect_ports, basic_auth=None):
        self.directory = directory
        self.connect_ports = list(connect_ports)
        self.basic_auth = basic_auth
        self.log = os.path.join(directory, "tinyproxy.log")
        self.output = os.path.join(directory, "tinyproxy.out")
        self.process: subprocess.Popen | None = None

    def config(self, port: int) -> str:
        lines = [
            f"Port {port}",
            "Listen 127.0.0.1",
            "Allow 127.0.0.1",
            "Timeout 30",
            "MaxClients 20",
            "LogLevel Info",
            f'LogFile "{self.log}"',
            f'PidFile "{os.path.join(self.directory, "tinyproxy.pid")}"',
            # Without ConnectPort lines tinyproxy tunnels to any port.
            *(f"ConnectPort {p}" for p in self.connect_ports),
        ]
        if self.basic_auth is not None:
            lines.append("BasicAuth {} {}".format(*self.basic_auth))
        return "\n".join(lines) + "\n"

    def start(self) -> int:
        """Start it; its port once it accepts connections."""
        self.port = self._start()
        return self.port

    def _start(self) -> int:
        for _ in range(3):  # the free port may be taken before tinyproxy binds it
            port = _free_port()
            path = os.path.join(self.directory, "tinyproxy.conf")
            with open(path, "w") as f:
                f.write(self.config(port))
            if os.path.exists(self.log):
                os.unlink(self.log)
            # Config errors go to stderr, before tinyproxy opens its log file.
            with open(self.output, "wb") as output:
                self.process = subprocess.Popen(
                    [TINYPROXY, "-d", "-c", path],
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            if self._accepting():
                return port
            self.stop()
        with open(self.output, errors="replace") as f:
            raise RuntimeError(f"tinyproxy did not start:\n{f.read()}\n{self.log_text()}")

    def _accepting(self) -> bool:
        # tinyproxy logs this line once its socket listens; waiting for it rather than
        # probing the port keeps stray connections out of the tests.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if "Accepting connections" in self.log_text():
                return True
            time.sleep(0.01)
        return False

    def log_text(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(TIMEOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tinyproxy(tmp_path):
    """``tinyproxy(connect_ports, basic_auth=None)`` -> a running Tinyproxy; killed after."""
    started: list[Tinyproxy] = []

    def start(connect_ports, basic_auth=None) -> Tinyproxy:
        directory = tmp_path / f"tinyproxy{len(started)}"
        directory.mkdir()
        proxy = Tinyproxy(str(directory), connect_ports, basic_auth)
        started.append(proxy)
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("ca")))


@pytest.fixture(scope="module")
def agent_identity(ca):
    key = pki.generate_key()
    cert_pem = ca.sign_csr(pki.make_csr(key), "agent-through-proxy")
    return Identity(ca.cert_pem, cert_pem, pki.key_to_pem(key))


class WhoAmI(resource.Resource):
    """JSON with the CN of the client certificate the server saw."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        cn = pki.peer_common_name(request.channel.transport)
        return json.dumps({"cn": cn}).encode()


class EchoWithName(WebSocketServerProtocol):
    def onConnect(self, request):
        self.peer_cn = pki.peer_common_name(self.transport)

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload + b" from " + (self.peer_cn or "nobody").encode())


class WebSocketClient(WebSocketClientProtocol):
    def onOpen(self):
        self.sendMessage(b"hello")

    def onMessage(self, payload, isBinary):
        self.factory.answer.callback(payload)
        self.sendClose(1000)

    def onClose(self, wasClean, code, reason):
        self.factory.closed.callback((wasClean, code))


@pytest_twisted.async_yield_fixture
async def tls_server(ca):
    """A twisted.web Site with mutual TLS on a loopback port: ``/whoami`` and ``/ws``."""
    key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
    root = resource.Resource()
    root.putChild(b"whoami", WhoAmI())
    ws_factory = WebSocketServerFactory()
    ws_factory.protocol = EchoWithName
    root.putChild(b"ws", WebSocketResource(ws_factory))
    site = server.Site(root, timeout=TIMEOUT)
    endpoint = SSL4ServerEndpoint(
        reactor, 0, server_tls_options(key_pem, cert_pem, [ca.cert_pem]), interface="127.0.0.1"
    )
    port = await endpoint.listen(site)
    yield port.getHost().port
    await port.stopListening()


@implementer(IAgentEndpointFactory)
class ThroughProxy:
    """Agent endpoints: TLS with the agent's identity, inside a tunnel through ``proxy``."""

    def __init__(self, proxy: HTTPProxy, identity: Identity):
        self.proxy = proxy
        self.identity = identity

    def endpointForURI(self, uri):
        host = uri.host.decode()
        return wrapClientTLS(
            pki.client_tls_options(
                host, self.identity.ca_pem, self.identity.cert_pem, self.identity.key_pem
            ),
            self.proxy.endpoint_to(reactor, host, uri.port, timeout=TIMEOUT),
        )


def get_json(proxy: HTTPProxy, identity: Identity, url: str) -> defer.Deferred:
    """GET ``url`` through ``proxy``; fires with (status, parsed body)."""
    agent = Agent.usingEndpointFactory(reactor, ThroughProxy(proxy, identity))

    async def run():
        # treq reads the body: readBody warns when a small body is in before it is called.
        response = await treq.client.HTTPClient(agent).get(url)
        return response.code, await response.json()

    return defer.ensureDeferred(run()).addTimeout(TIMEOUT, reactor)


@needs_tinyproxy
@pytest_twisted.inlineCallbacks
def test_https_through_tinyproxy_with_mutual_tls(tinyproxy, tls_server, agent_identity):
    running = tinyproxy([tls_server])
    proxy = HTTPProxy("127.0.0.1", running.port)
    status, body = yield get_json(proxy, agent_identity, f"https://127.0.0.1:{tls_server}/whoami")
    assert status == 200
    assert body == {"cn": "agent-through-proxy"}  # the client certificate went end to end
    assert f"CONNECT 127.0.0.1:{tls_server} HTTP/1.1" in running.log_text()  # not around it


@needs_tinyproxy
@pytest_twisted.inlineCallbacks
def test_agent_https_client_through_tinyproxy(tinyproxy, tls_server, agent_identity):
    """The agent's own HTTPS client (tcm.agent.link) takes the proxy as it is."""
    proxy = HTTPProxy("127.0.0.1", tinyproxy([tls_server]).port)
    client = HttpsClient(reactor, f"https://127.0.0.1:{tls_server}", agent_identity, proxy)
    try:
        response = yield client.call("GET", "/whoami", timeout=TIMEOUT)
    finally:
        yield client.close()
    assert (response.status, response.body) == (200, {"cn": "agent-through-proxy"})


@needs_tinyproxy
@pytest_twisted.inlineCallbacks
def test_basic_auth(tinyproxy, tls_server, agent_identity):
    port = tinyproxy([tls_server], basic_auth=("agent", "s3cret")).port
    url = f"https://127.0.0.1:{tls_server}/whoami"

    proxy = HTTPProxy.parse(f"http://agent:s3cret@127.0.0.1:{port}")
    status, body = yield get_json(proxy, agent_identity, url)
    assert (status, body) == (200, {"cn": "agent-through-proxy"})

    with pytest.raises(ProxyError) as refused:
        yield get_json(HTTPProxy("127.0.0.1", port), agent_identity, url)
    assert refused.value.status == 407
    assert "requires authentication (407 Proxy Authentication Required)" in str(refused.value)

    with pytest.raises(ProxyError) as wrong:
        yield get_json(HTTPProxy("127.0.0.1", port, "agent", "wrong"), agent_identity, url)
    # tinyproxy up to 1.11.2 answers a wrong password with 401, not 407 (tinyproxy#532).
    assert wrong.value.status in (401, 407)
    assert "rejected the credentials of user 'agent'" in str(wrong.value)
    assert "wrong" not in str(wrong.value)


@needs_tinyproxy
@pytest_twisted.inlineCallbacks
def test_connect_to_a_port_the_proxy_does_not_allow(tinyproxy, tls_server, agent_identity):
    proxy = HTTPProxy("127.0.0.1", tinyproxy([443]).port)
    with pytest.raises(ProxyError) as refused:
        yield get_json(proxy, agent_identity, f"https://127.0.0.1:{tls_server}/whoami")
    assert str(refused.value) == (
        f"proxy 127.0.0.1:{proxy.port} refused CONNECT to 127.0.0.1:{tls_server}: "
        f"403 Access violation"
    )


@needs_tinyproxy
@pytest_twisted.inlineCallbacks
def test_websocket_through_tinyproxy(tinyproxy, tls_server, agent_identity):
    proxy = HTTPProxy("127.0.0.1", tinyproxy([tls_server]).port)
    factory = WebSocketClientFactory(f"wss://127.0.0.1:{tls_server}/ws")
    factory.protocol = WebSocketClient
    factory.answer = defer.Deferred().addTimeout(TIMEOUT, reactor)
    factory.closed = defer.Deferred().addTimeout(TIMEOUT, reactor)
    endpoint = wrapClientTLS(
        agent_identity.tls_options("127.0.0.1"), proxy.endpoint_to(reactor, "127.0.0.1", tls_server)
    )
    protocol = yield endpoint.connect(factory).addTimeout(TIMEOUT, reactor)
    assert isinstance(protocol, WebSocketClient)
    answer = yield factory.answer
    assert answer == b"hello from agent-through-proxy"
    was_clean, code = yield factory.closed
    assert (was_clean, code) == (True, 1000)


@pytest_twisted.inlineCallbacks
def test_proxy_that_is_not_listening():
    proxy = HTTPProxy("127.0.0.1", _free_port())
    endpoint = proxy.endpoint_to(reactor, "127.0.0.1", 443, timeout=TIMEOUT)
    with pytest.raises(ProxyError, match=f"cannot connect to proxy 127.0.0.1:{proxy.port}"):
        yield endpoint.connect(Factory.forProtocol(Protocol))
