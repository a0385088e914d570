"""A real management server inside the test process, for pytest-twisted tests.

``start_server(state_dir, **config)`` builds the service that ``twistd tcm-server`` runs
(``make_server_service``) on an ephemeral loopback port, starts it with the running reactor
and fires once it listens; ``InProcServer.stop()`` closes every client connection the
helpers opened, stops the service and waits for it. Between the two the helpers speak to
it as real clients do, over real TLS:

- ``admin(method, path, body)``: the admin REST API with the bearer token;
- ``agent_https(method, path, body, identity)``: the agent API over HTTPS;
- ``enroll_identity()``: a key, a CSR, a fresh enrollment token, POST /agent/v1/enroll;
- ``ws_connect(identity, protocols)``: a WSS connection with Autobahn's client protocol,
  recording every message and how the connection closed;
- ``send_hello(client)`` and ``client.request(method, path)``: a session, as an agent has.

Every wait is bounded (``within``): a server that does not answer fails the test, never
hangs it.

Use the ``inproc_server`` fixture, or ``start_server`` in a fixture of your own to change
the configuration.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import pytest_twisted
import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from tcm.protocol import codes
from tcm.server.adminapi import AdminAPI
from tcm.server.agentapi import AgentAPI
from tcm.server.service import ServerConfig, make_server_service
from tcm.tls import pki

TIMEOUT = 5.0  # seconds: the bound of every single wait in these helpers
HOST = "127.0.0.1"


def within(d: Deferred, seconds: float = TIMEOUT) -> Deferred:
    """``d``, failed with TimeoutError (and cancelled) when it has not fired in time."""
    return d.addTimeout(seconds, reactor)


@inlineCallbacks
def wait_for(predicate, seconds: float = TIMEOUT, interval: float = 0.01, what: str = "it"):
    """Poll ``predicate()`` on the reactor until it is true; fires with its value."""
    deadline = reactor.seconds() + seconds
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() >= deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        yield deferLater(reactor, interval, lambda: None)


class AgentIdentity(NamedTuple):
    """An enrolled agent: its id and the certificate and key it connects with."""

    agent_id: str
    cert_pem: bytes
    key_pem: bytes


# -- HTTPS -------------------------------------------------------------------------------


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """Trust the tcm CA (only); present a client certificate when given one."""

    def __init__(self, ca_pem: bytes, cert_pem: bytes | None, key_pem: bytes | None):
        self._args = (ca_pem, cert_pem, key_pem)

    def creatorForNetloc(self, hostname: bytes, port: int):
        return pki.client_tls_options(hostname.decode("ascii"), *self._args)


class HttpReply(NamedTuple):
    """Status and body of an HTTPS response; ``body`` is parsed when it is JSON."""

    status: int
    body: Any
    headers: Any


# -- WebSocket ---------------------------------------------------------------------------


class WsClient(WebSocketClientProtocol):
    """A WSS client that records everything: messages, the handshake outcome, the close."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, Any] | bytes | str] = []
        self.opened_ok = False
        self.response = None  # Autobahn's ConnectionResponse, after a 101
        self.close_info: tuple[bool, int | None, str | None] | None = None
        self.settled: Deferred = Deferred()  # open, or closed before it opened
        self.closed: Deferred = Deferred()  # fires with close_info
        self._waiting: list[tuple[Any, Deferred]] = []
        self.pings = 0  # pings the server sent (answered by Autobahn)

    # Autobahn callbacks
    def onConnect(self, response):
        self.response = response

    def onOpen(self):
        self.opened_ok = True
        if not self.settled.called:
            self.settled.callback(self)

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        super().onPing(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            msg: Any = payload
        else:
            try:
                msg = json.loads(payload)
            except ValueError:
                msg = payload.decode("utf-8", "replace")
        self.messages.append(msg)
        self._check_waiting()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.close_info = (wasClean, code, reason)
        if not self.settled.called:
            self.settled.callback(self)
        if not self.closed.called:
            self.closed.callback(self.close_info)
        self._check_waiting()

    # helpers
    @property
    def close_code(self) -> int | None:
        return self.close_info[1] if self.close_info else None

    @property
    def close_reason(self) -> str | None:
        return self.close_info[2] if self.close_info else None

    def send_json(self, obj: Any) -> None:
        self.sendMessage(json.dumps(obj).encode(), isBinary=False)

    def send_raw(self, payload: bytes, binary: bool = False) -> None:
        self.sendMessage(payload, isBinary=binary)

    def wait_message(self, match=None, seconds: float = TIMEOUT) -> Deferred:
        """The first message (JSON object) satisfying ``match`` (a callable or a dict of
        fields it must have), received already or later. Fails when the connection closes
        first or nothing comes in time; a matched message is taken off ``messages``."""
        if isinstance(match, dict):
            fields = match

            def match(m):
                return isinstance(m, dict) and all(m.get(k) == v for k, v in fields.items())

        elif match is None:

            def match(m):
                return True

        d: Deferred = Deferred()
        self._waiting.append((match, d))
        self._check_waiting()
        return within(d, seconds)

    def wait_reply(self, msg_id: str, seconds: float = TIMEOUT) -> Deferred:
        """The message answering ``msg_id`` (its ``in_reply_to``)."""
        return self.wait_message({"in_reply_to": msg_id}, seconds)

    def wait_closed(self, seconds: float = TIMEOUT) -> Deferred:
        """Fires with (wasClean, code, reason) once the connection is closed."""
        d: Deferred = Deferred()

        def fire(info):
            d.callback(info)
            return info

        if self.close_info is not None:
            d.callback(self.close_info)
        else:
            self.closed.addCallback(fire)
        return within(d, seconds)

    def _check_waiting(self) -> None:
        still = []
        for match, d in self._waiting:
            if d.called:
                continue
            found = next((m for m in self.messages if match(m)), None)
            if found is not None:
                self.messages.remove(found)
                d.callback(found)
            elif self.close_info is not None:
                d.errback(
                    AssertionError(
                        f"connection closed {self.close_info} before the "
                        f"expected message; got {self.messages!r}"
                    )
                )
            else:
                still.append((match, d))
        self._waiting = still

    @inlineCallbacks
    def request(self, method: str, path: str, body: Any = None, msg_id: str | None = None):
        """One agent API call as a ``request`` envelope; fires with the reply envelope."""
        data: dict[str, Any] = {"method": method, "path": path}
        if body is not None:
            data["body"] = body
        msg_id = msg_id or os.urandom(8).hex()
        self.send_json({"id": msg_id, "type": "request", "data": data})
        return (yield self.wait_reply(msg_id))

    def shut(self, seconds: float = TIMEOUT) -> Deferred:
        """Close (politely, then by dropping TCP) and wait until the connection is gone."""
        if self.close_info is None and self.transport is not None:
            if self.opened_ok:
                self.sendClose(codes.CLOSE_NORMAL)
                timer = reactor.callLater(1.0, self._drop)
                self.closed.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
            else:
                self._drop()
        return self.wait_closed(seconds)

    def _drop(self) -> None:
        if self.close_info is None and self.transport is not None:
            self.transport.abortConnection()


def hello_envelope(capabilities=("ping",), msg_id: str | None = None) -> dict[str, Any]:
    return {
        "id": msg_id or os.urandom(8).hex(),
        "type": "hello",
        "data": {
            "agent_version": "test",
            "protocol": 1,
            "capabilities": [{"name": c} for c in capabilities],
            "hostname": "test-host",
            "platform": "test",
        },
    }


@inlineCallbacks
def send_hello(client: WsClient, capabilities=("ping",)):
    """Send ``hello``; fires with the ``welcome`` envelope."""
    hello = hello_envelope(capabilities)
    client.send_json(hello)
    welcome = yield client.wait_reply(hello["id"])
    assert welcome["type"] == "welcome", welcome
    return welcome


# -- the server --------------------------------------------------------------------------


class InProcServer:
    """A running ``make_server_service`` and clients for it."""

    def __init__(self, service, port: int):
        self.service = service
        self.parts = service.parts  # the services make_server_service built, by name
        self.port = port
        self.listener = next(s for s in service if isinstance(s, StreamServerEndpointService))
        #: the server's HandshakeLogger (the factory just inside TLS)
        self.handshakes = self.listener.factory
        self.ca_pem: bytes = self.parts.certificates.ca_pem
        self.admin_token: str = self.parts.access.admin_token
        self.base_url = f"https://{HOST}:{port}"
        self._clients: list[WsClient] = []
        self._pools: list[HTTPConnectionPool] = []

    # -- HTTPS ---------------------------------------------------------------------------
    def _http(
        self,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        ca_pem: bytes | None = None,
    ):
        # One request per connection: nothing keeps a connection open past a test.
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._pools.append(pool)
        agent = Agent(reactor, _TLSPolicy(ca_pem or self.ca_pem, cert_pem, key_pem), pool=pool)
        return treq.client.HTTPClient(agent)

    @inlineCallbacks
    def https(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers=None,
        cert_pem: bytes | None = None,
        key_pem: bytes | None = None,
        raw: bytes | None = None,
    ):
        """One HTTPS request; ``body`` is sent as JSON, ``raw`` as it is."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = dict(headers or {})
        if body is not None or raw is not None:
            headers.setdefault(b"content-type", [b"application/json"])
        client = self._http(cert_pem, key_pem)
        resp = yield within(
            client.request(
                method, self.base_url + path, data=data, headers=headers, timeout=TIMEOUT
            )
        )
        content = yield within(resp.content())
        parsed: Any = content
        ctype = resp.headers.getRawHeaders(b"content-type", [b""])[0]
        if ctype.startswith(b"application/json"):
            parsed = json.loads(content)
        return HttpReply(resp.code, parsed, resp.headers)

    _DEFAULT = object()

    def admin(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: Any = _DEFAULT,
        raw: bytes | None = None,
    ) -> Deferred:
        """The admin API: ``token`` defaults to the server's admin token; None sends none."""
        if token is InProcServer._DEFAULT:
            token = self.admin_token
        headers = {}
        if token is not None:
            headers[b"authorization"] = [f"Bearer {token}".encode()]
        return self.https(method, path, body, headers=headers, raw=raw)

    def agent_https(
        self,
        method: str,
        path: str,
        body: Any = None,
        identity: AgentIdentity | None = None,
        raw: bytes | None = None,
    ):
        """The agent API over HTTPS, with ``identity``'s client certificate if given."""
        cert = (identity.cert_pem, identity.key_pem) if identity else (None, None)
        return self.https(method, path, body, cert_pem=cert[0], key_pem=cert[1], raw=raw)

    # -- enrollment ----------------------------------------------------------------------
    @inlineCallbacks
    def create_token(self, ttl: float | None = None, uses: int | None = None) -> Any:
        body: dict[str, Any] = {"description": "test"}
        if ttl is not None:
            body["ttl"] = ttl
        if uses is not None:
            body["uses"] = uses
        reply = yield self.admin("POST", "/api/v1/tokens", body)
        assert reply.status == 201, reply
        return reply.body["token"]

    @inlineCallbacks
    def enroll_identity(self, hostname: str = "test-host"):
        """A new agent: key, CSR, a one-use token made through the API, enrollment."""
        token = yield self.create_token(uses=1)
        key = pki.generate_key()
        csr = pki.make_csr(key).decode()
        reply = yield self.agent_https(
            "POST", "/agent/v1/enroll", {"token": token, "csr": csr, "hostname": hostname}
        )
        assert reply.status == 201, reply
        return AgentIdentity(
            reply.body["agent_id"], reply.body["certificate"].encode(), pki.key_to_pem(key)
        )

    # -- WebSocket -----------------------------------------------------------------------
    @inlineCallbacks
    def ws_connect(
        self,
        identity: AgentIdentity | tuple[bytes, bytes] | None = None,
        protocols=(codes.SUBPROTOCOL,),
        ca_pem: bytes | None = None,
        **options: Any,
    ):
        """A WSS connection to /agent/v1/ws; fires with the WsClient once it is open or
        closed (a refused upgrade, a failed TLS handshake). ``identity`` may also be a
        (cert_pem, key_pem) pair. Fails only if the TCP connection cannot be made."""
        if identity is None:
            cert_pem = key_pem = None
        elif isinstance(identity, AgentIdentity):
            cert_pem, key_pem = identity.cert_pem, identity.key_pem
        else:
            cert_pem, key_pem = identity
        creator = pki.client_tls_options(HOST, ca_pem or self.ca_pem, cert_pem, key_pem)
        endpoint = wrapClientTLS(
            creator, TCP4ClientEndpoint(reactor, HOST, self.port, timeout=TIMEOUT)
        )
        factory = WebSocketClientFactory(
            f"wss://{HOST}:{self.port}/agent/v1/ws", protocols=list(protocols)
        )
        factory.protocol = WsClient
        factory.setProtocolOptions(
            failByDrop=False,
            openHandshakeTimeout=TIMEOUT,
            closeHandshakeTimeout=2,
            autoPingInterval=0,
            **options,
        )
        client = yield within(endpoint.connect(factory))
        self._clients.append(client)
        yield within(client.settled)
        return client

    @inlineCallbacks
    def session(self, identity: AgentIdentity | None = None, capabilities=("ping",)):
        """An open, welcomed session; enrolls a new agent unless given one.
        Fires with (client, welcome, identity)."""
        if identity is None:
            identity = yield self.enroll_identity()
        client = yield self.ws_connect(identity)
        assert client.opened_ok, client.close_info
        welcome = yield send_hello(client, capabilities)
        return client, welcome, identity

    @inlineCallbacks
    def check_serving(self):
        """The server still serves others: a new, well-behaved agent enrolls, gets a
        ``welcome`` and an answer to an agent API call over its session."""
        client, welcome, identity = yield self.session()
        assert welcome["data"]["agent_id"] == identity.agent_id
        reply = yield client.request("GET", "/agent/v1/whoami")
        assert reply["type"] == "response", reply
        assert reply["data"]["status"] == 200, reply
        assert reply["data"]["body"] == {"agent_id": identity.agent_id, "transport": "websocket"}
        yield client.shut()

    # -- lifecycle -----------------------------------------------------------------------
    @inlineCallbacks
    def stop(self):
        """Close the helpers' connections, then stop the service and wait for it."""
        for client in self._clients:
            try:
                yield client.shut()
            except Exception:
                client._drop()
        for pool in self._pools:
            yield within(pool.closeCachedConnections())
        yield within(self.service.stopService())


@inlineCallbacks
def start_server(state_dir: str, **config: Any):
    """Start a server (``ServerConfig`` fields as keywords) on an ephemeral port; fires
    with the running InProcServer once it listens."""
    config.setdefault("port", 0)
    config.setdefault("interface", HOST)
    service = make_server_service(ServerConfig(state_dir=str(state_dir), **config), reactor)
    # A server that cannot start stops the reactor (ServerService._fatal): right for
    # twistd, fatal for a test run that shares one reactor. Record the failure instead.
    failed: list[Any] = []
    service._fatal = failed.append
    service.startService()
    # The listener starts only once the store is migrated and the working set loaded.
    listener = next(s for s in service if isinstance(s, StreamServerEndpointService))
    yield wait_for(
        lambda: failed or (listener.running and listener._waitingForPort is not None),
        what="the server to start listening",
    )
    if failed:
        failed[0].raiseException()
    # _waitingForPort (documented ivar) fires with the listening port; pass its result on
    # untouched, stopService needs it.
    listening: Deferred = Deferred()

    def got_port(port):
        listening.callback(port)
        return port

    listener._waitingForPort.addCallback(got_port)
    port = yield within(listening)
    return InProcServer(service, port.getHost().port)


@pytest_twisted.async_yield_fixture
async def inproc_server(tmp_path):
    """A running server with the default configuration."""
    server = await start_server(str(tmp_path / "server"))
    try:
        yield server
    finally:
        await server.stop()


def routers(state_dir: str) -> tuple[AdminAPI, AgentAPI]:
    """The two routers as make_server_service wires them (nothing listens: a memory reactor)."""
    parts = make_server_service(
        ServerConfig(state_dir=state_dir, port=0), reactor=MemoryReactorClock()
    ).parts
    agent_api = parts.site.resource.children[b"agent"].children[b"v1"]._api  # type: ignore[attr-defined]
    return parts.admin_api, agent_api
