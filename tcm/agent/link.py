"""How the agent calls its server's agent API: one call, two transports.

`ServerLink.call(method, path, body)` sends the call as a `request` envelope over the live
session when there is one, and as an HTTPS request with the agent's client certificate when
there is not (or when the session drops while the call is out: every agent API call is
idempotent, so it is simply sent again). Code above this cannot tell which transport carried it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from tcm.compat import wrap_client_tls
from tcm.interfaces import IAgentAPI
from tcm.tls import pki

# the agent's names for them, as before
from tcm.tls.identity import CurrentClientTLS as CurrentClientTLS
from tcm.tls.identity import Identity as Identity


@attrs.frozen
class Response:
    status: int
    body: Any
    transport: str  # "websocket" or "https"


class CallFailed(Exception):
    """An agent API call that got no answer (connection refused, lost, timed out)."""


split_url = pki.split_url


@attrs.define
class Traffic:
    """Bytes on the wire (TLS records included) of one connection."""

    sent: int = 0
    received: int = 0


class _CountingProtocol(ProtocolWrapper):
    def makeConnection(self, transport) -> None:
        # ProtocolWrapper.makeConnection first copies the transport's interfaces onto this
        # wrapper (directlyProvides), a zope spec computation per connection that the TLS
        # layer above does not need: a tenth of a reconnect storm's CPU in a swarm.
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        self.factory.traffic.received += len(data)
        super().dataReceived(data)

    def write(self, data: bytes) -> None:
        self.factory.traffic.sent += len(data)
        super().write(data)

    def writeSequence(self, data) -> None:
        data = list(data)
        self.factory.traffic.sent += sum(len(d) for d in data)
        super().writeSequence(data)


class _CountingFactory(WrappingFactory):
    protocol = _CountingProtocol
    # made per connection: no "Starting factory" line per connection (the log call and its
    # level filter were a seventh of a swarm's CPU in a reconnect storm)
    noisy = False

    def __init__(self, wrapped: Any, traffic: Traffic):
        super().__init__(wrapped)
        self.traffic = traffic


@implementer(IStreamClientEndpoint)
class CountingEndpoint:
    """Counts the bytes of each connection it makes; used under TLS, so it sees the wire."""

    def __init__(self, inner: Any, total: Traffic | None = None):
        self._inner = inner
        self.current = Traffic()
        self._total = total  # count every connection into one (the HTTPS fallback's)

    def connect(self, factory: Any):
        self.current = traffic = self._total or Traffic()
        d = self._inner.connect(_CountingFactory(factory, traffic))
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)


def server_endpoint(
    reactor: Any,
    url: str,
    identity: Identity,
    proxy: Any = None,
    count: bool = False,
    bind: str | None = None,
    traffic: Traffic | None = None,
):
    """The TLS client endpoint for a server URL, through an HTTP proxy when one is given,
    from source address `bind` when one is given (the swarm spreads its agents over several).

    With count=True the TLS endpoint stands on a CountingEndpoint (returned second)."""
    host, port = split_url(url)
    if proxy is not None:
        inner = proxy.endpoint_to(reactor, host, port)
    else:
        inner = tcp_endpoint(reactor, host, port, bind)
    if traffic is not None:  # add this connection's bytes to a running total
        inner = CountingEndpoint(inner, traffic)
    counting = CountingEndpoint(inner) if count else None
    # tokens and sessions kept per HOST:PORT: a server and a gateway or task server on
    # one host each resume only their own
    endpoint = wrap_client_tls(identity.tls_options(host, port), counting or inner)
    return (endpoint, counting) if count else endpoint


def tcp_endpoint(reactor: Any, host: str, port: int, bind: str | None = None, timeout: float = 30):
    """A TCP endpoint: an address literal is connected to directly (HostnameEndpoint would
    still resolve it in the thread pool, one job per connection attempt); a name is resolved
    with HostnameEndpoint (happy eyeballs over its addresses)."""
    bind_address = (bind, 0) if bind else None
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout, bind_address)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout, bind_address)
    return HostnameEndpoint(reactor, host, port, timeout=timeout, bindAddress=bind_address)


class HttpsClient:
    """JSON calls to the agent API over HTTPS with mutual TLS. The HTTP client (connection
    pool, agent, cookie jar) is made at the first call, and treq and `twisted.web` imported
    then: an agent whose session stays up never makes one (issue 17; webclient.py)."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        base_url: str,
        identity: Identity,
        proxy: Any = None,
        timeout: float = 30.0,
        bind: str | None = None,
    ):
        self._reactor = reactor
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.traffic = Traffic()  # bytes on the wire of every HTTPS connection, TLS included
        self._identity = identity
        self._proxy = proxy
        self._bind = bind
        self._pool: Any = None
        self._http: Any = None

    def _client(self) -> Any:
        if self._http is None:
            from tcm.agent import webclient

            self._pool = webclient.persistent_pool(self._reactor)
            endpoints = webclient.EndpointFactory(
                self._reactor, self._identity, self._proxy, self._bind, self.traffic
            )
            self._http = webclient.http_client(self._reactor, endpoints, self._pool)
        return self._http

    @inlineCallbacks
    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers: dict[bytes | str, list[bytes | str]] = (
            {b"content-type": [b"application/json"]} if data is not None else {}
        )
        try:
            resp = yield self._client().request(
                method,
                self.base_url + path,
                data=data,
                headers=headers,
                timeout=timeout or self.timeout,
            )
            raw = yield resp.content()
        except Exception as e:
            raise CallFailed(f"{method} {path} over HTTPS: {pki.describe_tls_error(e)}") from e
        parsed: Any = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode("utf-8", "replace")
        return Response(resp.code, parsed, "https")

    def close(self) -> Deferred:
        if self._pool is None:  # never called: nothing to close
            return succeed(None)
        return self._pool.closeCachedConnections()


@implementer(IAgentAPI)
class ServerLink:
    """Agent API calls over the live session, or HTTPS without one."""

    _log = Logger()

    def __init__(self, https: HttpsClient):
        self.https = https
        self.session: Any = None  # an open AgentConnection, set by the agent's connection
        self.task_session: Any = None  # the open task-client session, if any

    @inlineCallbacks
    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float | None = None,
        via: Any = None,
    ):
        """Over `via` (the session a job came on) while it is open, else the core
        session, else HTTPS."""
        for session in (via, self.session) if via is not None else (self.session,):
            if session is not None and session.is_open():
                try:
                    return (yield session.request(method, path, body, timeout))
                except CallFailed as e:
                    self._log.info(
                        "{method} {path}: {e}; trying the next way",
                        method=method,
                        path=path,
                        e=e,
                    )
        return (yield self.https.call(method, path, body, timeout))

    def call_over_https(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Deferred:
        """Over HTTPS whatever the session (the poller's calls, which stand for it)."""
        return self.https.call(method, path, body, timeout)
