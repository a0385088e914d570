"""Handshakes on a server port: TLS failures logged and counted (Twisted drops them
silently), and handshakes admitted through a gate that bounds how many run at once."""

from __future__ import annotations

from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IProtocol,
    IProtocolNegotiationFactory,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tcm.tls import pki
from tcm.tls.resumption import refused_token

__all__ = ["HandshakeGate", "HandshakeLogger"]


class HandshakeGate(Protocol):
    """Admission control of handshakes (``tcm.server.admission.HandshakeGate``): each
    accepted connection is admitted (and may wait its turn), then counted until its
    handshake is done or it is gone."""

    def admit(self, transport: Any) -> Any:
        """A connection was accepted, nothing read yet; its ticket. ``transport``: the TCP
        connection, which the gate may pause."""

    def done(self, ticket: Any) -> None:
        """The ticket's handshake completed or its connection is gone."""


@implementer(IHandshakeListener)
class _HandshakeWatcher(ProtocolWrapper):
    """Notices a connection that the TLS layer below it closed with an OpenSSL error."""

    ticket: Any = None  # the admission gate's count of this handshake, if there is a gate

    def makeConnection(self, transport: Any) -> None:
        # `transport` is the TLS layer, which has read nothing yet; below it the TCP
        # connection, which the gate pauses while this connection waits for its turn.
        gate = self.factory.gate
        if gate is not None:
            self.ticket = gate.admit(transport.transport)
        # Not ProtocolWrapper's makeConnection: the wrapped protocol gets the TLS connection
        # itself as its transport, so that its writes and lookups go straight there, and no
        # interface declarations are copied onto this watcher (a walk of zope.interface's
        # specifications per connection). The watcher stays below the wrapped protocol only
        # for what the TLS layer tells it: data, handshake done, connection lost.
        TwistedProtocol.makeConnection(self, transport)
        self.wrappedProtocol.makeConnection(transport)

    def handshakeCompleted(self) -> None:
        kinds = self.factory.completed
        kind = pki.handshake_kind(self.transport)
        kinds[kind] = kinds.get(kind, 0) + 1
        refused = refused_token(self.transport)
        if refused is not None:
            self.factory.tokenRefused(self.transport, refused)
        if self.ticket is not None:
            self.factory.gate.done(self.ticket)
            self.ticket = None
        # The wrapper provides IHandshakeListener, so pass it on to those who want it.
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.ticket is not None:
            self.factory.gate.done(self.ticket)
            self.ticket = None
        if reason.check(SSL.Error) and self.transport is not None:
            self.factory.handshakeFailed(self.transport.getPeer(), reason.value)
        super().connectionLost(reason)


@implementer(IProtocolNegotiationFactory)
class HandshakeLogger(WrappingFactory[_HandshakeWatcher]):
    """Wraps the factory *inside* TLS and logs TLS failures, which Twisted does silently.

    A client certificate from a foreign CA, an old protocol version or a client that does
    not speak TLS at all fail the handshake before any application code runs; this logs
    one warning line per failure and counts them by OpenSSL reason in ``failures``.
    """

    protocol = _HandshakeWatcher
    _log = Logger()

    def __init__(self, wrappedFactory: object, gate: HandshakeGate | None = None):
        super().__init__(wrappedFactory)
        #: OpenSSL reason -> number of connections that failed with it.
        self.failures: dict[str, int] = {}
        #: completed handshakes by kind: "full" (certificates), "ticket" (a session of
        #: this process resumed), "token" (a resumption token: tcm.tls.resumption)
        self.completed: dict[str, int] = {}
        #: why the resumption tokens agents offered were not taken -> how many times
        #: (each such handshake went on with certificates: a "full" one)
        self.tokens_refused: dict[str, int] = {}
        #: admission control: each connection waits its turn, then counts until its
        #: handshake is done (tcm/server/admission.py)
        self.gate = gate

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN protocols of the wrapped factory. Twisted asks the factory right inside TLS;
        without this a client that offers ALPN (curl, browsers) fails the handshake."""
        inner = IProtocolNegotiationFactory(self.wrappedFactory, None)
        return list(inner.acceptableProtocols()) if inner is not None else [b"http/1.1"]

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:  # type: ignore[override]
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:  # the wrapped factory refused the connection
            return None
        return self.protocol(self, wrapped)

    # WrappingFactory keeps every live protocol in a dict; nothing here needs that, and
    # at tens of thousands of connections it is memory for nothing.
    def registerProtocol(self, p: ProtocolWrapper) -> None:
        pass

    def unregisterProtocol(self, p: ProtocolWrapper) -> None:
        pass

    def handshakeFailed(self, peer: IAddress, error: BaseException) -> None:
        """Count and log one TLS failure."""
        reason = pki.describe_tls_error(error)
        self.failures[reason] = self.failures.get(reason, 0) + 1
        self._log.warn(
            "TLS handshake with {peer} failed: {reason}", peer=_format_address(peer), reason=reason
        )

    def tokenRefused(self, transport: Any, why: str) -> None:
        """Count and log a resumption token this listener could not take (the handshake
        went on with the agent's certificate: it costs a full handshake, nothing more)."""
        self.tokens_refused[why] = self.tokens_refused.get(why, 0) + 1
        self._log.info(
            "resumption token of agent {agent} at {peer} not taken ({why}): full handshake",
            agent=pki.peer_common_name(transport) or "-",
            peer=_format_address(transport.getPeer()),
            why=why,
        )


def _format_address(address: IAddress) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
