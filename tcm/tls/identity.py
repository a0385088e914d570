"""A TLS identity that can change while connections come and go: agents and relay nodes.

`Identity` holds the trusted CA, the certificate and its key. The TLS objects handed to
endpoints (`CurrentClientTLS`, `CurrentServerTLS`) look the identity up at each new
connection, so a renewed certificate is presented from the next connection on while open
ones keep theirs. The OpenSSL contexts behind them are built once per certificate: each
holds a certificate, a key and a trust store, costly to build per connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

from tcm.tls import pki, resumption

#: What a listener resumes handshakes with: (the keys of its tokens, the clock they are
#: judged by), as ``tcm.tls.server.server_tls_options`` takes it
Resumption = tuple[resumption.ResumptionKeys, Callable[[], float]]

#: One copy of each CA bundle identities trust (at most 64): a swarm's thousands of agents
#: each read the same ca.pem, and the bundle is the key of their shared TLS context.
_CA_COPIES: dict[bytes, bytes] = {}


def _one_copy(ca_pem: bytes) -> bytes:
    kept = _CA_COPIES.get(ca_pem)
    if kept is None:
        kept = ca_pem
        if len(_CA_COPIES) < 64:
            _CA_COPIES[ca_pem] = ca_pem
    return kept


@attrs.define
class Identity:
    """What an agent or a node presents and trusts on every connection."""

    ca_pem: bytes = attrs.field(converter=_one_copy)
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    _options: dict[Any, Any] = attrs.field(factory=dict, repr=False)
    # The TLS session of the last welcomed session per host (or HOST:PORT, `tls_options`),
    # offered for resumption at the next connection there: the server skips signing and
    # verifying certificates (issue 17).
    _tls_sessions: dict[str, Any] = attrs.field(factory=dict, repr=False)
    # The resumption token of the last welcome per host (or HOST:PORT), (identity, psk,
    # offered until): resumes even after the server restarted (tcm.tls.resumption).
    _tokens: dict[str, tuple[bytes, bytes, float]] = attrs.field(factory=dict, repr=False)
    clock: Callable[[], float] = attrs.field(default=time.time, repr=False)

    def tls_options(self, hostname: str, port: int | None = None) -> CurrentClientTLS:
        """TLS client options for `hostname`, as the identity is at each connection (an
        endpoint made once presents a renewed certificate from its next connection on).
        With `port`, what it resumes with is kept per HOST:PORT (a server, a gateway and a
        task server on one host each seal their own tokens), else per host."""
        return CurrentClientTLS(self, hostname, hostname if port is None else f"{hostname}:{port}")

    def server_tls(
        self,
        client_cas: Sequence[bytes],
        groups: str | None = None,
        resumption: Resumption | None = None,
    ) -> CurrentServerTLS:
        """TLS server options presenting this identity, verifying client certificates of
        `client_cas`, offering key exchange `groups` (None: OpenSSL's list), resuming
        handshakes with the tokens `resumption` (keys, clock) opens, as the identity is at
        each connection."""
        return CurrentServerTLS(self, tuple(client_cas), groups, resumption)

    def options_now(self, hostname: str):
        """The client options for `hostname` now, made once per certificate."""
        options = self._options.get(hostname)
        if options is None:
            options = self._options[hostname] = pki.client_tls_options(
                hostname, self.ca_pem, self.cert_pem, self.key_pem
            )
        return options

    def server_options_now(
        self,
        client_cas: tuple[bytes, ...],
        groups: str | None = None,
        resumption: Resumption | None = None,
    ):
        """The server options now, made once per certificate."""
        from tcm.tls.server import server_tls_options

        key = ("server", client_cas, groups, resumption)
        options = self._options.get(key)
        if options is None:
            if self.cert_pem is None or self.key_pem is None:
                raise ValueError("an identity without a certificate cannot serve TLS")
            options = self._options[key] = server_tls_options(
                self.key_pem, self.cert_pem, list(client_cas), groups=groups, resumption=resumption
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
        self._tokens.clear()

    def token_for(self, hostname: str) -> tuple[bytes, bytes] | None:
        """The resumption token (identity, psk) to offer `hostname` (or HOST:PORT, as the
        connection's `tls_options` keep them), or None."""
        token = self._tokens.get(hostname)
        if token is None:
            return None
        if self.clock() >= token[2]:
            del self._tokens[hostname]
            return None
        return token[0], token[1]

    def tls_session_for(self, hostname: str) -> Any:
        """The TLS session to offer `hostname` (or HOST:PORT) for resumption, or None."""
        return self._tls_sessions.get(hostname)

    def remember_tls_session(self, transport: Any, resume: Any = None) -> bool:
        """Keep the TLS session of a connection the server welcomed, to resume it at the
        next connection to the same host. By the welcome, TLS 1.3's session tickets (sent
        right after the handshake) have arrived. `resume`: the welcome's resumption token,
        offered instead from then on (it survives a restart of the server). True if either
        was kept."""
        try:
            handle = transport.getHandle()
            hostname = getattr(handle, RESUME_KEY, None)
            session = handle.get_session() if hostname is not None else None
        except Exception:  # not TLS, or a connection already gone: nothing to keep
            return False
        if hostname is None:
            return False
        token = resumption.read_token_message(resume)
        if token is not None:
            identity, psk, lifetime = token
            self._tokens[hostname] = (identity, psk, self.clock() + lifetime)
        else:
            # what is there seals no token (now: an older gateway, say): offer its ticket
            # from now on, not a token it could not open
            self._tokens.pop(hostname, None)
        if session is None:
            return token is not None
        self._tls_sessions[hostname] = session
        return True


@implementer(IOpenSSLClientConnectionCreator)
class CurrentClientTLS:
    """An identity's client TLS for one host, looked up at each connection."""

    __slots__ = ("_identity", "_hostname", "_resume_at")

    def __init__(self, identity: Identity, hostname: str, resume_at: str | None = None):
        self._identity = identity
        self._hostname = hostname
        self._resume_at = resume_at or hostname  # the key of its tokens and sessions

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        identity, hostname, resume_at = self._identity, self._hostname, self._resume_at
        connection = identity.options_now(hostname).clientConnectionForTLS(tlsProtocol)
        token = identity.token_for(resume_at)
        if token is not None:
            resumption.offer(connection, *token)  # one the server cannot open: certificates
        else:
            session = identity.tls_session_for(resume_at)
            if session is not None:
                connection.set_session(session)  # offered; a server that cannot resume says so
        setattr(connection, RESUME_KEY, resume_at)
        return connection


#: The attribute of a client TLS connection naming where its session may be resumed (the
#: host, or HOST:PORT).
RESUME_KEY = "_tcm_resume_host"


@implementer(IOpenSSLServerConnectionCreator)
class CurrentServerTLS:
    """An identity's server TLS, looked up at each connection."""

    __slots__ = ("_identity", "_cas", "_groups", "_resumption")

    def __init__(
        self,
        identity: Identity,
        client_cas: tuple[bytes, ...],
        groups: str | None,
        resumption: Resumption | None = None,
    ):
        self._identity = identity
        self._cas = client_cas
        self._groups = groups
        self._resumption = resumption
        # a key that does not fit fails here
        identity.server_options_now(client_cas, groups, resumption)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        options = self._identity.server_options_now(self._cas, self._groups, self._resumption)
        return SSL.Connection(options.getContext(), None)
