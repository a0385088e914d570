"""Listen addresses as Twisted endpoint strings, and tcm's TLS as an endpoint type.

Every tcm service (`--listen`, repeatable) takes what `serverFromString` takes. The `tcm:`
type, registered as a Twisted plugin (`twisted/plugins/tcm_endpoints.py`), wraps any other
server endpoint in the TLS of the tcm service listening on it: its certificate, client
certificates optional and verified against the tcm CA, TLS 1.2 and later, failed handshakes
logged (and admitted a few at a time where the service does that)::

    tcm:8443                          tcp:8443 with tcm's TLS (backlog 4096)
    tcm:8443:interface=127.0.0.1
    tcm:tcp6:8443:interface=\\:\\:       IPv6 (colons escaped)
    tcm:unix:/run/tcm/agents.sock     a UNIX socket
    tcm:systemd:domain=INET:index=0   a socket systemd opened (socket activation)

A `tcm:` endpoint knows no certificate by itself: the service that listens hands it its own
(`TLSServerEndpoint.secured`), so the same string means the server's certificate on the
server and the gateway's on the gateway. Any other string (`tcp:`, `unix:`, `systemd:`)
listens without TLS where the service allows it (docs/operating.md, "Listen addresses").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

PREFIX = "tcm"
# A reconnect storm brings thousands of agents at once: more than the default 50 wait in the
# kernel's queue while handshakes run (the same backlog as --port has always had).
BACKLOG = 4096
# Endpoint types whose parser takes a backlog.
_BACKLOG_TYPES = ("tcp", "tcp6", "unix")
_TCP_TYPES = ("tcp", "tcp6")


class NoServiceTLS(Exception):
    """A `tcm:` endpoint was asked to listen outside a tcm service (no certificate)."""


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Another server endpoint with tcm's TLS on top; the service gives the TLS options.

    ``address`` is ``(interface, port)`` when the wrapped endpoint is TCP: what a service
    calls itself by (its URLs, its certificate's names) when it listens only here.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        tls: IOpenSSLServerConnectionCreator | None = None,
        address: tuple[str, int] | None = None,
    ):
        self.wrapped = wrapped
        self.tls = tls
        self.address = address

    def secured(self, tls: IOpenSSLServerConnectionCreator) -> TLSServerEndpoint:
        """The same endpoint with this service's TLS options."""
        return TLSServerEndpoint(self.wrapped, tls, self.address)

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        """Listen on the wrapped endpoint; each connection speaks TLS first."""
        if self.tls is None:
            return fail(
                NoServiceTLS(
                    "a tcm: endpoint gets its certificate from the tcm service listening on it "
                    "(twistd tcm-server --listen tcm:...)"
                )
            )
        from tcm.compat import LeanTLSFactory

        return self.wrapped.listen(LeanTLSFactory(self.tls, False, protocolFactory))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class TLSEndpointParser:
    """`tcm:[TYPE:]ARGS`: the endpoint TYPE:ARGS (TYPE tcp when ARGS start with a port) with
    tcm's TLS on top."""

    prefix = PREFIX

    def parseStreamServer(
        self, reactor: Any, *args: object, **kwargs: object
    ) -> IStreamServerEndpoint:
        parts = [str(a) for a in args]  # serverFromString passes strings
        options = {k: str(v) for k, v in kwargs.items()}
        if not parts or not parts[0]:
            raise ValueError(
                "tcm: wants a port or an endpoint, e.g. tcm:8443 or tcm:systemd:domain=INET:index=0"
            )
        kind = parts[0]
        if kind.isdigit():  # tcm:8443 is tcm:tcp:8443
            parts, kind = ["tcp", *parts], "tcp"
        if kind == PREFIX:
            raise ValueError("tcm:tcm:... would put TLS inside TLS")
        if kind in _BACKLOG_TYPES and "backlog" not in options:
            options["backlog"] = str(BACKLOG)
        wrapped = serverFromString(reactor, _unparse(parts, options))
        address = None
        port = parts[1] if len(parts) > 1 else options.get("port")
        if kind in _TCP_TYPES and port is not None:
            address = (options.get("interface", ""), int(port))
        return TLSServerEndpoint(wrapped, address=address)


def _unparse(args: Sequence[str], kwargs: dict[str, str]) -> str:
    """An endpoint description from parsed arguments (colons and backslashes escaped)."""
    return ":".join(
        [quoteStringArgument(a) for a in args]
        + [f"{quoteStringArgument(k)}={quoteStringArgument(v)}" for k, v in kwargs.items()]
    )


def port_description(port: int, interface: str) -> str:
    """The endpoint string `--port P --interface ADDR` stands for."""
    return f"{PREFIX}:tcp:{port}:interface={quoteStringArgument(interface)}:backlog={BACKLOG}"


@attrs.frozen
class ListenAddresses:
    """Where a service listens (endpoint strings, in order) and what it calls itself by
    (interface and port for its URLs and certificate names)."""

    endpoints: list[str]
    interface: str
    port: int


def listen_addresses(
    reactor: Any,
    listen: Sequence[str],
    port: int | None,
    interface: str | None,
    default_port: int,
    default_interface: str = "127.0.0.1",
    plain: bool = True,
    option: str = "--listen",
) -> ListenAddresses:
    """Resolve `--listen`, `--port` and `--interface` of a tap; ValueError says what is wrong.

    `--port`/`--interface` listen as they always did (tcm's TLS on that TCP port) when either
    is given or no `--listen` is; `--listen` adds endpoints, or replaces the port when it is
    given alone. The service's own address is the port's, else the first TCP `tcm:`
    endpoint's, else the defaults. ``plain`` False refuses endpoints without tcm's TLS.
    """
    parsed = [(d, parse(reactor, d, option)) for d in listen]
    if not plain:
        for description, endpoint in parsed:
            if not isinstance(endpoint, TLSServerEndpoint):
                raise ValueError(
                    f"{option} {description!r}: this service identifies agents by their client "
                    f"certificates, which only tcm's TLS carries: use {PREFIX}:{description}"
                )
    if port is not None or interface is not None or not listen:
        port = default_port if port is None else port
        interface = default_interface if interface is None else interface
        return ListenAddresses([port_description(port, interface), *listen], interface, port)
    for _, endpoint in parsed:
        if isinstance(endpoint, TLSServerEndpoint) and endpoint.address is not None:
            iface, number = endpoint.address
            return ListenAddresses(list(listen), iface or "0.0.0.0", number)
    return ListenAddresses(list(listen), default_interface, default_port)


def parse(reactor: Any, description: str, option: str = "--listen") -> IStreamServerEndpoint:
    """`serverFromString`, with every way a description can be wrong as ValueError."""
    try:
        return serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        why = str(e) or type(e).__name__
        if isinstance(e, (KeyError, IndexError)):  # systemd: no such descriptor name or index
            why = f"no such inherited socket ({why})"
        raise ValueError(f"{option} {description!r} is not a listen address: {why}") from None


def listeners(
    reactor: Any,
    descriptions: Sequence[str],
    tls: IOpenSSLServerConnectionCreator,
    secured: IProtocolFactory,
    plain: IProtocolFactory | None = None,
) -> list[StreamServerEndpointService]:
    """One listening service per endpoint string, in order. `tcm:` endpoints get ``tls`` and
    serve ``secured`` (the service's factory inside TLS, e.g. its handshake logger); the
    others serve ``plain``, or are refused (ValueError) where it is None."""
    services = []
    for description in descriptions:
        endpoint = parse(reactor, description)
        if isinstance(endpoint, TLSServerEndpoint):
            services.append(StreamServerEndpointService(endpoint.secured(tls), secured))
        elif plain is not None:
            services.append(StreamServerEndpointService(endpoint, plain))
        else:
            raise ValueError(f"--listen {description!r}: this service listens only with tcm:")
    return services
