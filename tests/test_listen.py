"""Listen addresses as endpoint strings (`--listen`) and the `tcm:` TLS endpoint type.

- the `tcm:` parser is a Twisted plugin and passes verifyObject; what it parses to;
- `--port`/`--interface` as before, `--listen` beside or instead of them;
- a bad endpoint string is a usage error naming it in every tap; the gateway and the task
  server refuse endpoints without tcm's TLS;
- a real server on four `--listen` endpoints (two loopback ports, a UNIX socket with tcm's
  TLS, a UNIX socket without): agents on both ports run a job, the admin API answers with the
  server's certificate on the TLS socket and without TLS on the plain one (where an agent's
  call finds no client certificate), and a failed handshake on the second port is logged.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess

import pytest
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface.verify import verifyObject

from tcm.tls.endpoints import (
    BACKLOG,
    NoServiceTLS,
    TLSEndpointParser,
    TLSServerEndpoint,
    listen_addresses,
    port_description,
)
from tests.harness import PYTHON, AgentProc, Server, free_port, wait_until

# -- the endpoint type ------------------------------------------------------------------------


def test_the_tcm_parser_is_a_twisted_plugin():
    parsers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "tcm"]
    assert len(parsers) == 1 and isinstance(parsers[0], TLSEndpointParser)
    assert verifyObject(IStreamServerEndpointStringParser, parsers[0])


def test_tcm_wraps_any_server_endpoint():
    reactor = MemoryReactor()
    short = serverFromString(reactor, "tcm:8443:interface=127.0.0.1")
    assert isinstance(short, TLSServerEndpoint) and verifyObject(IStreamServerEndpoint, short)
    assert isinstance(short.wrapped, TCP4ServerEndpoint)
    assert short.address == ("127.0.0.1", 8443)
    # secured: TLS over the wrapped endpoint, with the backlog --port has always had
    short.secured(CertificateOptions()).listen(Factory())
    port, factory, backlog, interface = reactor.tcpServers[-1]
    assert (port, backlog, interface) == (8443, BACKLOG, "127.0.0.1")
    assert isinstance(factory, TLSMemoryBIOFactory)
    serverFromString(reactor, "tcm:tcp:9000:backlog=7").secured(CertificateOptions()).listen(
        Factory()
    )
    assert reactor.tcpServers[-1][2] == 7
    unix = serverFromString(reactor, "tcm:unix:/run/tcm/a\\:b.sock")
    assert isinstance(unix.wrapped, UNIXServerEndpoint) and unix.address is None
    v6 = serverFromString(reactor, port_description(8443, "::"))
    assert v6.address == ("::", 8443)


def test_a_tcm_endpoint_outside_a_service_says_why():
    endpoint = serverFromString(MemoryReactor(), "tcm:8443")
    failure = endpoint.listen(Factory())
    err = []
    failure.addErrback(err.append)
    assert err and err[0].check(NoServiceTLS)
    assert "gets its certificate from the tcm service" in err[0].getErrorMessage()


def test_port_and_listen_beside_or_instead():
    r = MemoryReactor()
    # no --listen: --port/--interface exactly as before
    a = listen_addresses(r, [], None, None, 8443)
    assert (a.endpoints, a.interface, a.port) == (
        [port_description(8443, "127.0.0.1")],
        "127.0.0.1",
        8443,
    )
    # --listen alone replaces the port; the service calls itself by the first tcm: TCP one
    a = listen_addresses(r, ["tcm:unix:/x", "tcm:9000:interface=10.0.0.1"], None, None, 8443)
    assert (a.endpoints, a.interface, a.port) == (
        ["tcm:unix:/x", "tcm:9000:interface=10.0.0.1"],
        "10.0.0.1",
        9000,
    )
    # beside --port (or --interface) the port listens too
    a = listen_addresses(r, ["tcm:unix:/x"], 7000, None, 8443)
    assert a.endpoints == [port_description(7000, "127.0.0.1"), "tcm:unix:/x"] and a.port == 7000
    a = listen_addresses(r, ["tcm:unix:/x"], None, "0.0.0.0", 8443)
    assert a.endpoints[0] == port_description(8443, "0.0.0.0")
    # no TCP address at all: the defaults name the service
    a = listen_addresses(r, ["tcm:unix:/x"], None, None, 8443)
    assert (a.endpoints, a.port) == (["tcm:unix:/x"], 8443)


def _usage_error(options, argv):
    with pytest.raises(usage.UsageError) as e:
        options.parseOptions(argv)
    return str(e.value)


def test_bad_endpoints_are_usage_errors_naming_them(tmp_path):
    from tcm.allinone import Options as AllInOne
    from tcm.gateway.tap import Options as Gateway
    from tcm.server.tap import Options as Server_
    from tcm.taskserver.tap import Options as TaskServer

    d = ["--state-dir", str(tmp_path)]
    gw = [*d, "--upstream", "a=https://a:1"]
    for options, base in ((Server_, d), (TaskServer, d), (Gateway, gw), (AllInOne, d)):
        why = _usage_error(options(), [*base, "--listen", "bogus:8443"])
        assert (
            why == "--listen 'bogus:8443' is not a listen address: Unknown endpoint type: 'bogus'"
        )
        why = _usage_error(options(), [*base, "--listen", "tcm:8443:colour=red"])
        assert why.startswith("--listen 'tcm:8443:colour=red' is not a listen address:")
        assert "colour" in why
        why = _usage_error(options(), [*base, "--listen", "tcm:systemd:domain=INET:index=3"])
        assert "no such inherited socket" in why
    # agents are identified by client certificates: the gateway and task server want tcm:
    for options, base in ((TaskServer, d), (Gateway, gw)):
        why = _usage_error(options(), [*base, "--listen", "tcp:8000"])
        assert "only tcm's TLS carries: use tcm:tcp:8000" in why
    assert "not with --listen" in _usage_error(
        Gateway(), [*gw, "--listen", "tcm:8000", "--workers", "2"]
    )
    # the all-in-one's task server and gateway reach the server over loopback TCP
    assert "links to the server over loopback" in _usage_error(
        AllInOne(), [*d, "--listen", "tcm:unix:/tmp/x.sock"]
    )
    assert "--gateway-listen 'tcp:9': this service identifies agents" in _usage_error(
        AllInOne(), [*d, "--gateway-listen", "tcp:9"]
    )
    # good ones parse, and --port keeps its meaning
    opts = Server_()
    opts.parseOptions([*d, "--port", "9443", "--listen", "tcm:unix:/tmp/y.sock"])
    assert opts["addresses"].endpoints == [
        port_description(9443, "127.0.0.1"),
        "tcm:unix:/tmp/y.sock",
    ]
    opts = Server_()
    opts.parseOptions(d)
    assert opts["addresses"].endpoints == [port_description(8443, "127.0.0.1")]


# -- a real server on four endpoints ------------------------------------------------------------


def _tls_unix(path: str, ca: str) -> http.client.HTTPSConnection:
    context = ssl.create_default_context(cafile=ca)

    class Connection(http.client.HTTPSConnection):
        def connect(self):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(path)
            self.sock = context.wrap_socket(sock, server_hostname="localhost")

    return Connection("localhost", timeout=10)


def _plain_unix(path: str) -> http.client.HTTPConnection:
    class Connection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(path)

    return Connection("localhost", timeout=10)


def _get(conn: http.client.HTTPConnection, path: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"null")


@pytest.mark.integration
def test_a_server_serves_agents_and_admins_on_every_listen_endpoint(stack):
    base, add = stack
    second = free_port()
    tls_sock = os.path.join(str(base), "tls.sock")
    plain_sock = os.path.join(str(base), "plain.sock")
    server = Server(str(base))
    server.args = [
        "tcm-server",
        "--state-dir",
        server.state_dir,
        "--listen",
        f"tcm:{server.port}:interface=127.0.0.1",
        "--listen",
        f"tcm:tcp:{second}:interface=127.0.0.1",
        "--listen",
        f"tcm:unix:{tls_sock}",
        "--listen",
        f"unix:{plain_sock}",
    ]
    add(server).start()  # the first tcm: TCP endpoint is the one server.json names

    token = server.token(uses=2)
    first_agent = AgentProc(str(base), "first", server, token)
    second_agent = AgentProc(str(base), "second")
    second_agent.args += ["--server", f"https://127.0.0.1:{second}", "--ca-cert", server.ca]
    second_agent.args += ["--token", token]
    add(first_agent).start()
    add(second_agent).start()
    job = json.loads(server.cli("run", "ping", "--targets", "all", "--wait", "--json"))
    assert job["counts"]["succeeded"] == 2, job
    assert {a["id"] for a in server.agents()} == {first_agent.agent_id, second_agent.agent_id}

    with open(os.path.join(server.state_dir, "admin.token")) as f:
        admin = f.read().strip()
    with open(os.path.join(server.state_dir, "server.pem"), "rb") as f:
        server_cert = ssl.PEM_cert_to_DER_cert(f.read().decode())

    # the TLS UNIX socket: the server's own certificate, the admin API
    conn = _tls_unix(tls_sock, server.ca)
    status, agents = _get(conn, "/api/v1/agents", admin)
    assert status == 200 and len(agents["agents"]) == 2
    assert conn.sock.getpeercert(binary_form=True) == server_cert
    status, _ = _get(_tls_unix(tls_sock, server.ca), "/api/v1/agents")
    assert status == 401

    # the plain UNIX socket: the admin API without TLS (a proxy's or a local tool's), but no
    # agent identity: there is no client certificate to take it from
    status, agents = _get(_plain_unix(plain_sock), "/api/v1/agents", admin)
    assert status == 200 and len(agents["agents"]) == 2
    status, _ = _get(_plain_unix(plain_sock), "/agent/v1/whoami")
    assert status in (401, 403)

    # the second port is under the handshake logger too
    failed = server.count("TLS handshake with")
    with socket.create_connection(("127.0.0.1", second), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.recv(100)
    wait_until(lambda: server.count("TLS handshake with") > failed, 10, 0.05, "a logged failure")


# -- systemd socket activation ------------------------------------------------------------------

# What systemd does for a socket-activated service: the listening socket as descriptor 3,
# LISTEN_FDS=1, its name in LISTEN_FDNAMES and LISTEN_PID naming the process that execs twistd.
_ACTIVATE = (
    "import os, sys; os.dup2(int(sys.argv[1]), 3); "
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='tcm.socket'); "
    "os.execv(sys.executable, [sys.executable, '-c', "
    "'from twisted.scripts.twistd import run; run()', *sys.argv[2:]])"
)


class _ActivatedServer(Server):
    """twistd tcm-server started the way systemd starts a socket-activated service."""

    def __init__(self, base: str, activated: socket.socket, listen: list[str]):
        super().__init__(base)
        self.activated = activated
        self.args = ["tcm-server", "--state-dir", self.state_dir]
        for description in listen:
            self.args += ["--listen", description]

    def start(self) -> None:
        fd = self.activated.fileno()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-c", _ACTIVATE, str(fd), "-n", "--pidfile=", *self.args],
                pass_fds=(fd,),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                cwd=os.path.dirname(self.log_path),
            )
        self.wait_ready()


@pytest.mark.integration
def test_systemd_socket_activation_with_tcm_tls(stack):
    base, add = stack
    activated = socket.socket()
    activated.bind(("127.0.0.1", 0))
    activated.listen(128)
    port = activated.getsockname()[1]
    second = free_port()
    try:
        # a TCP endpoint beside it names the server for the CLI (server.json)
        server = add(
            _ActivatedServer(
                str(base),
                activated,
                ["tcm:systemd:domain=INET:index=0", f"tcm:{second}:interface=127.0.0.1"],
            )
        )
        server.port = second
        server.start()
    finally:
        activated.close()  # the server holds its own copy now
    # the agent reaches the server through the socket systemd (here: the test) opened
    agent = AgentProc(str(base), "activated")
    agent.args += ["--server", f"https://127.0.0.1:{port}", "--ca-cert", server.ca]
    agent.args += ["--token", server.token()]
    add(agent).start()
    job = json.loads(server.cli("run", "ping", "--targets", "all", "--wait", "--json"))
    assert job["counts"]["succeeded"] == 1, job
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        context = ssl.create_default_context(cafile=server.ca)
        with context.wrap_socket(s, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
