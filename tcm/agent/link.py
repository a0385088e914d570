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
import treq
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tcm.interfaces import IAgentAPI
from tcm.tls import pki


@attrs.frozen
class Response:
    status: int
    body: Any
    transport: str  # "websocket" or "https"


class CallFailed(Exception):
    """An agent API call that got no answer (connection refused, lost, timed out)."""


@attrs.define
class Identity:
    """What the agent presents and trusts on every connection."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    _options: dict[str, Any] = attrs.field(factory=dict, repr=False)
    # The TLS session of the last welcomed session per host, offered for resumption at the
    # next connection there: the server skips signing and verifying certificates (issue 17).
    _tls_sessions: dict[str, Any] = attrs.field(factory=dict, repr=False)

    def tls_options(self, hostname: str) -> CurrentClientTLS:
        """TLS client options for `hostname`, as the identity is at each connection (an
        endpoint made once presents a renewed certificate from its next connection on)."""
        return CurrentClientTLS(self, hostname)

    def options_now(self, hostname: str):
        """The options for `hostname` now, made once per certificate: each one holds an
        OpenSSL context (certificate, key, trust store), costly to build per connection."""
        options = self._options.get(hostname)
        if options is None:
            options = self._options[hostname] = pki.client_tls_options(
                hostname, self.ca_pem, self.cert_pem, self.key_pem
            )
        return options

    def renewed(self, cert_pem: bytes, key_pem: bytes) -> None:
        """A renewed certificate and its key: presented on every new connection from now."""
        self.cert_pem, self.key_pem = cert_pem, key_pem
        self._options.clear()
        self.forget_tls_sessions()  # a resumed session would carry the old certificate

    def forget_tls_sessions(self) -> None:
        """Offer no session: the next connection to each host is a full handshake."""
        self._tls_sessions.clear()

    def tls_session_for(self, hostname: str) -> Any:
        """The TLS session to offer `hostname` for resumption, or None."""
        return self._tls_sessions.get(hostname)

    def remember_tls_session(self, transport: Any) -> bool:
        """Keep the TLS session of a connection the server welcomed, to resume it at the
        next connection to the same host. By the welcome, TLS 1.3's session tickets (sent
        right after the handshake) have arrived. True if one was kept."""
        try:
            handle = transport.getHandle()
            hostname = getattr(handle, RESUME_KEY, None)
            session = handle.get_session() if hostname is not None else None
        except Exception:  # not TLS, or a connection already gone: nothing to keep
            return False
        if session is None or hostname is None:
            return False
        self._tls_sessions[hostname] = session
        return True


@implementer(IOpenSSLClientConnectionCreator)
class CurrentClientTLS:
    """An identity's client TLS for one host, looked up at each connection."""

    __slots__ = ("_identity", "_hostname")

    def __init__(self, identity: Identity, hostname: str):
        self._identity = identity
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        identity, hostname = self._identity, self._hostname
        connection = identity.options_now(hostname).clientConnectionForTLS(tlsProtocol)
        session = identity.tls_session_for(hostname)
        if session is not None:
            connection.set_session(session)  # offered; a server that cannot resume says so
        setattr(connection, RESUME_KEY, hostname)
        return connection


#: The attribute of a client TLS connection naming the host its session may be resumed at.
RESUME_KEY = "_tcm_resume_host"


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
    endpoint = wrapClientTLS(identity.tls_options(host), counting or inner)
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


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    def __init__(
        self,
        reactor: Any,
        identity: Identity,
        proxy: Any,
        bind: str | None = None,
        traffic: Traffic | None = None,
    ):
        self._reactor = reactor
        self._identity = identity
        self._proxy = proxy
        self._bind = bind
        self._traffic = traffic

    def endpointForURI(self, uri):
        url = f"https://{uri.host.decode()}:{uri.port}"
        return server_endpoint(
            self._reactor,
            url,
            self._identity,
            self._proxy,
            bind=self._bind,
            traffic=self._traffic,
        )


class HttpsClient:
    """JSON calls to the agent API over HTTPS with mutual TLS."""

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
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 2
        pool.cachedConnectionTimeout = 60
        self._pool = pool
        self.traffic = Traffic()  # bytes on the wire of every HTTPS connection, TLS included
        agent = Agent.usingEndpointFactory(
            reactor, _EndpointFactory(reactor, identity, proxy, bind, self.traffic), pool=pool
        )
        self._http = treq.client.HTTPClient(agent)

    @inlineCallbacks
    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers: dict[bytes | str, list[bytes | str]] = (
            {b"content-type": [b"application/json"]} if data is not None else {}
        )
        try:
            resp = yield self._http.request(
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
