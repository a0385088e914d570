"""Reaching the server through an HTTP proxy: a CONNECT tunnel as a client endpoint.

``HTTPProxy.endpoint_to(reactor, host, port)`` is an ``IStreamClientEndpoint`` whose
connections run through the proxy. It is a drop-in for ``HostnameEndpoint``:
``tcm.agent.link.server_endpoint`` wraps it with ``wrapClientTLS``, so TLS runs end to end
*through* the tunnel with the agent's own client certificate and trust (the proxy sees
only ciphertext), and ``ClientService`` reconnects through it exactly as without a proxy.

How one connection goes: connect to the proxy with ``HostnameEndpoint``, send
``CONNECT host:port HTTP/1.1`` (with ``Proxy-Authorization: Basic`` when the proxy URL
has credentials), read the response head. On a 2xx answer the real protocol is built
and connected to the very same transport; every later byte, and the loss of the
connection, reach it through the tunnel protocol, which from then on only passes them
on. Any other answer, a closed connection or a timeout fails the attempt with
``ProxyError``.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs
from twisted.internet.address import HostnameAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, NoProtocol
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["DEFAULT_PORT", "MAX_RESPONSE_HEAD", "HTTPProxy", "ProxyError", "TunnelEndpoint"]

#: The port of an ``http://HOST`` proxy URL without one (Squid's and tinyproxy's default).
DEFAULT_PORT = 3128

#: A CONNECT response head (status line and headers) longer than this is refused.
MAX_RESPONSE_HEAD = 16 * 1024

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(r"HTTP/\d\.\d (\d{3})(?: (.*))?")
_BAD_HOST_CHARACTERS = re.compile(r"[\x00-\x20\x7f/?#@]")


class ProxyError(ConnectionError):
    """The proxy would not or could not open a tunnel; the message says which and why.

    ``status`` is the proxy's HTTP status code when it answered, else None.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _hide(password: str | None) -> str:
    return "None" if password is None else "'***'"


@attrs.frozen
class HTTPProxy:
    """An HTTP proxy that opens CONNECT tunnels, optionally with Basic authentication.

    ``str()`` and ``repr()`` never show the password.
    """

    host: str = attrs.field(converter=lambda host: _unbracket(str(host)))
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=_hide)

    def __attrs_post_init__(self) -> None:
        if not self.host or _BAD_HOST_CHARACTERS.search(self.host):
            raise ValueError(f"not a usable proxy host: {self.host!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"proxy port must be 1-65535, not {self.port}")
        if self.username is not None and ":" in self.username:
            # Basic authentication joins user and password with the first colon.
            raise ValueError("a proxy user name cannot contain ':'")

    @classmethod
    def parse(cls, url: str) -> HTTPProxy:
        """The proxy of ``http://[USER[:PASSWORD]@]HOST[:PORT]``.

        USER and PASSWORD are percent-decoded (write ``%40`` for ``@``, ``%3A`` for ``:``);
        the port defaults to 3128. Other schemes (``https://`` proxies, SOCKS) are refused
        with a ValueError, as is anything after the address.
        """
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as e:
            raise ValueError(f"not a proxy URL {_redact(url)!r}: {e}") from None
        if parts.scheme.lower() != "http":
            raise ValueError(
                f"proxy URL must be http://[USER:PASSWORD@]HOST[:PORT], not {_redact(url)!r}"
                + (" (only plain-HTTP proxies are supported)" if parts.scheme else "")
            )
        if not parts.hostname:
            raise ValueError(f"proxy URL {_redact(url)!r} names no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"proxy URL {_redact(url)!r} must end after HOST[:PORT]")
        username = None if parts.username is None else unquote(parts.username)
        password = None if parts.password is None else unquote(parts.password)
        return cls(parts.hostname, DEFAULT_PORT if port is None else port, username, password)

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port``) of the proxy, for messages."""
        return _authority(self.host, self.port)

    def __str__(self) -> str:
        if self.username is None:
            return f"http://{self.address}"
        user = quote(self.username, safe="")
        secret = "" if self.password is None else ":***"
        return f"http://{user}{secret}@{self.address}"

    def authorization(self) -> bytes | None:
        """The ``Proxy-Authorization`` header value, or None without a user name."""
        if self.username is None:
            return None
        credentials = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(credentials)

    def endpoint_to(
        self, reactor: Any, host: str, port: int, timeout: float | None = 30.0
    ) -> IStreamClientEndpoint:
        """An endpoint whose connections reach ``host:port`` through this proxy."""
        return TunnelEndpoint(reactor, self, host, port, timeout=timeout)


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connections to ``host:port`` through a CONNECT tunnel of ``proxy``.

    ``timeout`` (seconds, None for none) bounds the whole attempt: reaching the proxy and
    its answer. ``connect()`` fires with the protocol the factory built, once the tunnel
    is open and the protocol connected; it fails with ``ProxyError`` (or ``NoProtocol``
    when the factory declines), and cancelling it aborts the attempt.
    """

    def __init__(
        self,
        reactor: Any,
        proxy: HTTPProxy,
        host: str,
        port: int,
        timeout: float | None = 30.0,
    ):
        host = _unbracket(host)
        if not host or _BAD_HOST_CHARACTERS.search(host):
            raise ValueError(f"not a usable host to tunnel to: {host!r}")
        if not 0 < port < 65536:
            raise ValueError(f"port to tunnel to must be 1-65535, not {port}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, not {timeout}")
        self._reactor = reactor
        self.proxy = proxy
        self.host = host
        self.port = port
        self.timeout = timeout
        #: ``host:port`` as sent in the CONNECT request (IDNA-encoded, IPv6 bracketed).
        self.target = _authority(_ascii_host(host), port)

    def __repr__(self) -> str:
        return f"<TunnelEndpoint to {self.target} through {self.proxy}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open a tunnel and connect a protocol of ``protocolFactory`` to it."""
        attempt = _Tunnel(self, protocolFactory)
        attempt.start(self._reactor)
        return attempt.result

    def request(self) -> bytes:
        """The CONNECT request head."""
        target = self.target.encode("ascii")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        authorization = self.proxy.authorization()
        if authorization is not None:
            lines.append(b"Proxy-Authorization: " + authorization)
        return b"\r\n".join(lines) + b"\r\n\r\n"


class _OneProtocol(ClientFactory):
    """Hands ``HostnameEndpoint`` the one tunnel protocol of an attempt."""

    def __init__(self, tunnel: _Tunnel):
        self._tunnel = tunnel

    def buildProtocol(self, addr: Any) -> _Tunnel:
        return self._tunnel


class _Tunnel(Protocol):
    """One connection attempt: CONNECT, then a pass-through to the real protocol.

    Rather than putting the real protocol in its place on the transport (which would
    depend on private attributes of each transport and of ``HostnameEndpoint``'s own
    wrapper), this protocol stays and forwards ``dataReceived`` and ``connectionLost``.
    The real protocol writes to the real transport directly.
    """

    _log = Logger()
    # The TCP transport to the proxy (ITCPTransport: abortConnection), None until made.
    transport: Any = None

    def __init__(self, endpoint: TunnelEndpoint, factory: IProtocolFactory):
        self._endpoint = endpoint
        self._factory = factory
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._decided = False  # result fired, or the attempt was cancelled
        self._buffer = b""
        self._head_bytes = 0  # bytes of earlier (1xx) response heads
        self._real: IProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None

    # -- the attempt ------------------------------------------------------------------

    def start(self, reactor: Any) -> None:
        proxy, timeout = self._endpoint.proxy, self._endpoint.timeout
        if timeout is not None:
            self._timer = reactor.callLater(timeout, self._timed_out)
        to_proxy = HostnameEndpoint(
            reactor, proxy.host, proxy.port, timeout=30 if timeout is None else timeout
        )
        # Kept for cancelling until it fires; HostnameEndpoint's Deferred counts as called
        # already while it waits on the attempts it chained, so .called tells nothing.
        self._connecting = connecting = to_proxy.connect(_OneProtocol(self))
        connecting.addCallbacks(self._reached_proxy, self._proxy_unreachable)

    def _reached_proxy(self, protocol: Any) -> None:
        self._connecting = None

    def _proxy_unreachable(self, reason: Failure) -> None:
        self._connecting = None
        if not self._decided:
            message = f"cannot connect to proxy {self._endpoint.proxy.address}"
            self._fail(ProxyError(f"{message}: {reason.getErrorMessage()}"), reason.value)

    def _timed_out(self) -> None:
        self._timer = None
        proxy, timeout = self._endpoint.proxy.address, self._endpoint.timeout
        if self.transport is None:
            message = f"could not connect to proxy {proxy} within {timeout:g} s"
        else:
            message = (
                f"proxy {proxy} did not answer CONNECT to {self._endpoint.target} "
                f"within {timeout:g} s"
            )
        self._fail(ProxyError(message))

    def _cancel(self, result: Deferred[IProtocol]) -> None:
        # Deferred.cancel fails the result with CancelledError once this returns.
        self._decided = True
        self._stop_timer()
        self._log.debug(
            "CONNECT to {target} through {proxy} cancelled",
            target=self._endpoint.target,
            proxy=str(self._endpoint.proxy),
        )
        self._abort()

    def _fail(self, error: Exception, cause: BaseException | None = None) -> None:
        if self._decided:
            return
        self._decided = True
        self._stop_timer()
        error.__cause__ = cause
        self._log.warn(
            "CONNECT to {target} through {proxy} failed: {error}",
            target=self._endpoint.target,
            proxy=str(self._endpoint.proxy),
            error=str(error),
        )
        # Decided first, so the connection loss or connect failure this causes is ignored.
        self.result.errback(Failure(error))
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()
        elif self._connecting is not None:
            self._connecting.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # -- IProtocol --------------------------------------------------------------------

    def connectionMade(self) -> None:
        if self._decided:  # cancelled or timed out while the TCP connection was made
            self.transport.abortConnection()
            return
        self.transport.write(self._endpoint.request())

    def dataReceived(self, data: bytes) -> None:
        if self._real is not None:
            self._real.dataReceived(data)
        elif not self._decided:
            self._buffer += data
            self._read_head()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._real is not None:
            real, self._real = self._real, None
            real.connectionLost(reason)
            return
        message = (
            f"proxy {self._endpoint.proxy.address} closed the connection before answering "
            f"CONNECT to {self._endpoint.target}"
        )
        if not reason.check(ConnectionDone):
            message += f" ({reason.getErrorMessage()})"
        self._fail(ProxyError(message), reason.value)

    # -- the proxy's answer -----------------------------------------------------------

    def _read_head(self) -> None:
        while not self._decided:
            if not b"HTTP/".startswith(self._buffer[:5]):
                self._invalid(self._buffer.split(b"\n", 1)[0])
                return
            end = _END_OF_HEAD.search(self._buffer)
            size = self._head_bytes + (len(self._buffer) if end is None else end.end())
            if size > MAX_RESPONSE_HEAD:
                self._fail(
                    ProxyError(
                        f"proxy {self._endpoint.proxy.address} sent a response head over "
                        f"{MAX_RESPONSE_HEAD} bytes to CONNECT to {self._endpoint.target}"
                    )
                )
                return
            if end is None:
                return
            head, self._buffer = self._buffer[: end.start()], self._buffer[end.end() :]
            self._head_bytes = size
            lines = [line.rstrip("\r") for line in head.decode("latin-1").split("\n")]
            match = _STATUS_LINE.fullmatch(lines[0].rstrip())
            if match is None:
                self._invalid(head.split(b"\n", 1)[0])
                return
            status, reason = int(match.group(1)), (match.group(2) or "").strip()
            if 100 <= status < 200:
                continue  # an interim response; the real one follows
            if 200 <= status < 300:
                self._open(status, reason)
            else:
                self._refused(status, reason, _headers(lines[1:]))
            return

    def _invalid(self, line: bytes) -> None:
        shown = line.rstrip(b"\r")[:100]
        self._fail(
            ProxyError(
                f"proxy {self._endpoint.proxy.address} sent an invalid response to CONNECT "
                f"to {self._endpoint.target}: {shown!r}"
            )
        )

    def _refused(self, status: int, reason: str, headers: dict[str, str]) -> None:
        proxy = self._endpoint.proxy
        answer = f"{status} {reason}".strip()
        # A proxy must answer bad credentials with 407, but tinyproxy up to 1.11.2 (the
        # Debian and Ubuntu package) answers 401 (tinyproxy#532): both mean "not you".
        if status == 407 or (status == 401 and proxy.username is not None):
            if proxy.username is None:
                offer = headers.get("proxy-authenticate")
                message = f"proxy {proxy.address} requires authentication ({answer})" + (
                    f", it offers {offer}" if offer else ""
                )
            else:
                message = (
                    f"proxy {proxy.address} rejected the credentials of user "
                    f"{proxy.username!r} ({answer})"
                )
        else:
            message = f"proxy {proxy.address} refused CONNECT to {self._endpoint.target}: {answer}"
        self._fail(ProxyError(message, status))

    def _open(self, status: int, reason: str) -> None:
        self._decided = True
        self._stop_timer()
        rest, self._buffer = self._buffer, b""
        endpoint = self._endpoint
        address = HostnameAddress(_ascii_host(endpoint.host).encode("ascii"), endpoint.port)
        try:
            real = self._factory.buildProtocol(address)
            if real is None:
                raise NoProtocol()
            self._real = real
            real.makeConnection(self.transport)
        except Exception:
            # As HostnameEndpoint does: the caller gets the error, the connection goes.
            self.result.errback(Failure())
            self.transport.abortConnection()
            return
        self._log.info(
            "CONNECT to {target} through {proxy}: {status} {reason}",
            target=self._endpoint.target,
            proxy=str(self._endpoint.proxy),
            status=status,
            reason=reason,
        )
        self.result.callback(real)
        # Bytes that came with the head belong to the real protocol, after it was handed
        # out, as on a plain connection; unless it closed the connection meanwhile.
        if rest and self._real is not None and not getattr(self.transport, "disconnecting", 0):
            self._real.dataReceived(rest)


def _headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers.setdefault(name.strip().lower(), value.strip())
    return headers


def _ascii_host(host: str) -> str:
    """``host`` as it goes on the wire: IP literals as they are, names IDNA-encoded."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise ValueError(f"not a usable host name {host!r}: {e}") from None


def _unbracket(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, for error messages."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)
