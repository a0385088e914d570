"""Every use of a private attribute of Twisted, Autobahn or pyOpenSSL, in one place.

tcm reaches below these libraries' public APIs where a public way does not exist and the
cost of doing without is real (memory per idle connection at tens of thousands of sessions,
a state machine with no transition for an event). Each such use is one named function here,
whose docstring says what it reaches and why; each has a canary in ``tests/test_compat.py``
that fails, naming the function, when an upgrade removes the attribute or changes what it
does. Nothing else in tcm touches these attributes.

This module imports no other tcm module.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import directlyProvides, implementer, providedBy

__all__ = [
    "AutobahnOpenHook",
    "autobahn_connection_made",
    "autobahn_data_received",
    "bind_websocket_options",
    "client_options_context",
    "compact_websocket_state",
    "drop_websocket_handshake",
    "ignore_lost_notification",
    "LeanTLSFactory",
    "LeanTLSProtocol",
    "request_disconnected",
    "reschedule_auto_ping",
    "ping_is_proof_of_life",
    "psk_find_session",
    "psk_use_session",
    "set_tls_groups",
    "swap_memory_bios",
    "tls_session_reused",
    "wrap_client_tls",
]


# -- pyOpenSSL -----------------------------------------------------------------------------

try:  # pyOpenSSL's cffi binding of libssl: not public API, so used only if it is all there
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    #: The libssl calls swap_memory_bios makes.
    BIO_CALLS = ("BIO_new", "BIO_s_mem", "BIO_get_mem_data", "BIO_free", "SSL_set_bio")
    _HAVE_BIO = all(hasattr(_lib, name) for name in BIO_CALLS)
except ImportError:  # pragma: no cover - a pyOpenSSL without it: nothing is swapped
    _HAVE_BIO = False


def swap_memory_bios(connection: object) -> bool:
    """Give a memory-BIO ``SSL.Connection`` two fresh, empty memory BIOs; True if done.

    Reaches pyOpenSSL's private cffi binding (``OpenSSL._util.ffi``/``lib``: ``BIO_new``,
    ``BIO_s_mem``, ``BIO_get_mem_data``, ``BIO_free``, ``SSL_set_bio``) and the
    connection's private ``_ssl``, ``_into_ssl`` and ``_from_ssl`` (its ``SSL*`` and its two
    BIOs). Why: a memory BIO keeps the capacity of the largest chunk it ever held and
    pyOpenSSL has no call to shrink or replace it; ``SSL_set_bio`` frees the old pair.
    Done only when both BIOs are empty, so no byte is lost. False (nothing done) when the
    binding or the attributes are missing, for a socket BIO, or when either BIO holds data.
    """
    if not _HAVE_BIO or not isinstance(connection, SSL.Connection):
        return False
    ssl_ptr = getattr(connection, "_ssl", None)
    into = getattr(connection, "_into_ssl", None)
    out = getattr(connection, "_from_ssl", None)
    if ssl_ptr is None or into is None or out is None:  # a socket BIO, or another pyOpenSSL
        return False
    pending = _ffi.new("char **")
    if _lib.BIO_get_mem_data(into, pending) != 0 or _lib.BIO_get_mem_data(out, pending) != 0:
        return False
    new_into = _lib.BIO_new(_lib.BIO_s_mem())
    new_out = _lib.BIO_new(_lib.BIO_s_mem())
    if new_into == _ffi.NULL or new_out == _ffi.NULL:  # out of memory: keep the old ones
        for bio in (new_into, new_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(ssl_ptr, new_into, new_out)  # frees the old pair
    connection._into_ssl = new_into  # type: ignore[attr-defined]
    connection._from_ssl = new_out  # type: ignore[attr-defined]
    return True


#: The libssl calls of TLS 1.3's external PSKs (psk_find_session, psk_use_session).
PSK_CALLS = (
    "SSL_CTX_set_psk_find_session_callback",
    "SSL_CTX_set_psk_use_session_callback",
    "SSL_CTX_set_session_id_context",
    "Cryptography_SSL_SESSION_new",
    "SSL_SESSION_set1_master_key",
    "SSL_SESSION_set_cipher",
    "SSL_SESSION_set_protocol_version",
    "SSL_SESSION_free",
    "SSL_CIPHER_find",
    "TLS1_3_VERSION",
)
try:
    _HAVE_PSK = all(hasattr(_lib, name) for name in PSK_CALLS) and hasattr(
        SSL.Connection, "_reverse_mapping"
    )
except NameError:  # pragma: no cover - no binding at all
    _HAVE_PSK = False

_PSK_FIND = "_tcm_psk_find"  # the Context attribute holding (find, suite)
_PSK_USE = "_tcm_psk_use"  # the Context attribute holding (use, suite)


def _psk_session(ssl: Any, psk: bytes, suite: bytes) -> Any:
    """A new TLS 1.3 SSL_SESSION for `psk` and the cipher suite `suite` (its two bytes),
    handed to OpenSSL by the caller; NULL when it cannot be made."""
    cipher = _lib.SSL_CIPHER_find(ssl, suite)
    if cipher == _ffi.NULL:
        return _ffi.NULL
    session = _lib.Cryptography_SSL_SESSION_new()
    if session == _ffi.NULL:
        return _ffi.NULL
    if not (
        _lib.SSL_SESSION_set1_master_key(session, psk, len(psk))
        and _lib.SSL_SESSION_set_cipher(session, cipher)
        and _lib.SSL_SESSION_set_protocol_version(session, _lib.TLS1_3_VERSION)
    ):
        _lib.SSL_SESSION_free(session)
        return _ffi.NULL
    return session


def _psk_connection(ssl: Any) -> Any:
    # pyOpenSSL's own callbacks find their Connection the same way
    return SSL.Connection._reverse_mapping.get(ssl)  # type: ignore[attr-defined]


if _HAVE_PSK:

    @_ffi.callback("int(SSL *, unsigned char *, size_t, SSL_SESSION **)")
    def _find_session(ssl: Any, identity: Any, length: int, found: Any) -> int:
        found[0] = _ffi.NULL
        try:
            connection = _psk_connection(ssl)
            installed = getattr(connection.get_context(), _PSK_FIND, None) if connection else None
            if installed is None:
                return 1
            find, suite = installed
            psk = find(connection, bytes(_ffi.buffer(identity, length)))
            if psk is not None:
                found[0] = _psk_session(ssl, psk, suite)
        except Exception:  # never raise into OpenSSL: the handshake goes on without a PSK
            found[0] = _ffi.NULL
        return 1

    @_ffi.callback("int(SSL *, EVP_MD *, unsigned char **, size_t *, SSL_SESSION **)")
    def _use_session(ssl: Any, md: Any, identity: Any, length: Any, session: Any) -> int:
        session[0] = _ffi.NULL
        try:
            if md != _ffi.NULL:
                # a second hello (HelloRetryRequest): the suite the server chose has a hash
                # this binding cannot compare with the PSK's, so go on without it
                return 1
            connection = _psk_connection(ssl)
            installed = getattr(connection.get_context(), _PSK_USE, None) if connection else None
            if installed is None:
                return 1
            use, suite = installed
            offered = use(connection)
            if offered is None:
                return 1
            token, psk = offered[0], offered[1]
            made = _psk_session(ssl, psk, suite)
            if made == _ffi.NULL:
                return 1
            # OpenSSL copies the identity after this returns: keep the buffer alive with
            # the connection
            buffer = _ffi.new("unsigned char[]", token)
            connection._tcm_psk_identity = buffer
            identity[0] = buffer
            length[0] = len(token)
            session[0] = made
        except Exception:
            session[0] = _ffi.NULL
        return 1


def psk_find_session(
    context: SSL.Context, find: Callable[[SSL.Connection, bytes], bytes | None], suite: bytes
) -> bool:
    """Let a server context resume TLS 1.3 handshakes with external PSKs: ``find(connection,
    identity)`` returns the PSK of an identity a client offers (a session with cipher suite
    `suite` is made for it), or None (the handshake goes on with certificates). True if set.

    Reaches pyOpenSSL's private cffi binding (``SSL_CTX_set_psk_find_session_callback``,
    ``Cryptography_SSL_SESSION_new``, ``SSL_SESSION_set1_master_key``,
    ``SSL_SESSION_set_cipher``, ``SSL_SESSION_set_protocol_version``, ``SSL_CIPHER_find``),
    the context's ``_context`` and ``SSL.Connection._reverse_mapping`` (how pyOpenSSL's own
    callbacks find their Connection). Why: OpenSSL's session tickets are sealed with keys
    made per process, which pyOpenSSL gives no way to set, so nothing resumes across a
    restart; pyOpenSSL has no PSK API of its own (tcm.tls.resumption)."""
    if not _HAVE_PSK:
        return False
    setattr(context, _PSK_FIND, (find, suite))
    _lib.SSL_CTX_set_psk_find_session_callback(context._context, _find_session)  # type: ignore[attr-defined]
    return True


def psk_use_session(
    context: SSL.Context, use: Callable[[SSL.Connection], Any], suite: bytes
) -> bool:
    """Let a client context's connections offer a TLS 1.3 external PSK: ``use(connection)``
    returns (identity, psk) to offer, or None. Empties the context's session id context:
    OpenSSL refuses to resume a session whose context differs from the connection's, a
    session made for a PSK has none, and on a client it serves nothing else. Set before the
    context makes its first connection (a connection copies it when made). True if set.

    Reaches what psk_find_session does, with ``SSL_CTX_set_psk_use_session_callback`` and
    ``SSL_CTX_set_session_id_context`` (pyOpenSSL refuses set_session_id on a used context)."""
    if not _HAVE_PSK:
        return False
    setattr(context, _PSK_USE, (use, suite))
    raw = context._context  # type: ignore[attr-defined]
    _lib.SSL_CTX_set_session_id_context(raw, b"", 0)
    _lib.SSL_CTX_set_psk_use_session_callback(raw, _use_session)
    return True


def tls_session_reused(connection: SSL.Connection) -> bool:
    """Whether this TLS connection's handshake resumed a session (a ticket or a PSK).

    Reaches the binding's ``SSL_session_reused`` and the connection's ``_ssl``: pyOpenSSL
    only has it for a session set before the handshake."""
    return bool(_lib.SSL_session_reused(connection._ssl))  # type: ignore[attr-defined]


def set_tls_groups(context: SSL.Context, groups: str) -> bool:
    """Set the key exchange groups a context offers, in OpenSSL's colon-separated form;
    False when this OpenSSL knows one of them not.

    Reaches the binding's ``SSL_CTX_set1_curves_list`` and the context's ``_context``:
    pyOpenSSL's ``set_tmp_ecdh`` takes one curve object, not a list, and knows no hybrid
    post-quantum group."""
    return bool(
        _lib.SSL_CTX_set1_curves_list(
            context._context,  # type: ignore[attr-defined]
            groups.encode("ascii", "replace"),
        )
    )


def client_options_context(options: Any) -> SSL.Context | None:
    """The OpenSSL context behind ``twisted.internet.ssl.optionsForClientTLS``'s options,
    or None.

    Reaches ``ClientTLSOptions._createConnection`` (a bound method of the
    ``CertificateOptions`` that hold the context). Why: a client context's settings must
    be made before its first connection, and Twisted hands out only connections."""
    make = getattr(options, "_createConnection", None)
    holder = getattr(make, "__self__", None)
    get_context = getattr(holder, "getContext", None)
    return get_context() if get_context is not None else None


# -- Twisted -------------------------------------------------------------------------------


def ignore_lost_notification(protocol: object) -> None:
    """Keep ``ClientService`` from hearing of this connection's loss.

    Reaches ``_lostNotification`` of Twisted's private ``_ReconnectingProtocolProxy``, the
    protocol ``ClientService`` hands to ``prepareConnection``. Why: when the Deferred that
    ``prepareConnection`` returned fails, ``ClientService`` counts a failed attempt and
    backs off; it has no transition for the loss of that same connection, which follows.
    Nothing happens for a protocol without the attribute.
    """
    if hasattr(protocol, "_lostNotification"):
        protocol._lostNotification = _ignore  # type: ignore[attr-defined]


def _ignore(reason: object) -> None:
    pass


class LeanTLSProtocol(BufferingTLSTransport):
    """Twisted's TLS protocol (``BufferingTLSTransport``, the one ``TLSMemoryBIOFactory``
    makes: small writes aggregated), declaring its transport's interfaces once per connection.

    Replaces ``TLSMemoryBIOProtocol.makeConnection``, reaching its private
    ``factory._creatorCallable``, ``_tlsConnection``, ``_appSendBuffer``,
    ``_connectWrapped`` and ``_checkHandshakeStatus``. Why: Twisted's calls
    ``directlyProvides`` once for each interface of the transport (each call replacing the
    last) and then once more for all of them through ``ProtocolWrapper.makeConnection``:
    ten declarations for a TCP connection, each a walk of zope.interface's specifications.
    They were a third of the server's CPU for accepting a connection (py-spy of a restart of
    10,000 agents, where accepting them took seconds before the first handshake). Here: one,
    with the same result (the transport's interfaces and the class's own)."""

    def makeConnection(self, transport: Any) -> None:
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()


class LeanTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` making ``LeanTLSProtocol``: for listeners
    (``LeanTLSFactory(creator, False, factory)``) and, through ``wrap_client_tls``, clients.

    ``TLSMemoryBIOFactory`` also keeps every live protocol in a dict (``WrappingFactory``):
    not here, where tens of thousands of connections would hold it for nothing."""

    protocol = LeanTLSProtocol

    def registerProtocol(self, p: Any) -> None:
        pass

    def unregisterProtocol(self, p: Any) -> None:
        pass


@implementer(IStreamClientEndpoint)
class _LeanTLSEndpoint:
    __slots__ = ("_creator", "_wrapped")

    def __init__(self, creator: Any, wrapped: IStreamClientEndpoint):
        self._creator = creator
        self._wrapped = wrapped

    def connect(self, protocolFactory: Any) -> Any:
        d: Any = self._wrapped.connect(LeanTLSFactory(self._creator, True, protocolFactory))
        return d.addCallback(_inside_tls)


def _inside_tls(tls: Any) -> Any:
    return tls.wrappedProtocol


def wrap_client_tls(creator: Any, wrapped: IStreamClientEndpoint) -> IStreamClientEndpoint:
    """``twisted.internet.endpoints.wrapClientTLS`` with ``LeanTLSProtocol``: connecting
    yields the protocol inside TLS, as Twisted's does."""
    return _LeanTLSEndpoint(creator, wrapped)


def request_disconnected(request: object) -> bool:
    """Whether the client of a ``twisted.web`` request went away before the response.

    Reaches ``Request._disconnected``, set by ``Request.connectionLost``. Why: a response
    written after that is dropped with an error logged; ``notifyFinish`` tells it too,
    but only to those who subscribed before. False for anything without the attribute.
    """
    return bool(getattr(request, "_disconnected", False))


# -- Autobahn ------------------------------------------------------------------------------


def autobahn_connection_made(protocol: Any, details: Any) -> None:
    """Autobahn's per-connection start, without what its ``connectionMade`` adds.

    Reaches ``_transport_details`` (set here to ``details``, an Autobahn
    ``TransportDetails``, which Autobahn's own ``connectionMade`` would build with a TLS
    channel binding; ``peer`` is set from it as Autobahn does) and calls the private
    ``_connectionMade``, Autobahn's framework-independent start. Why: Autobahn prepares a
    WAMP TLS channel binding (which needs the TLS protocol itself as transport, while the
    server wraps it) and formats a debug line on every connection; tcm uses neither.
    """
    protocol._transport_details = details
    protocol.peer = details.peer
    protocol._connectionMade()


def autobahn_data_received(protocol: Any, data: bytes) -> None:
    """Feed received bytes to Autobahn's frame parser.

    Calls the private ``_dataReceived``, which Autobahn's public ``dataReceived`` calls
    after formatting a debug line for every chunk, shown or not. Why: that line costs
    more than parsing the chunk, once per message per connection.
    """
    protocol._dataReceived(data)


#: What Autobahn keeps of the opening handshake once it is done (the raw request and
#: response, the parsed headers, the offered protocols and extensions, the client's key).
HANDSHAKE_LEFTOVERS = (
    "http_headers",
    "http_request_data",
    "http_response_data",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_protocols",
    "websocket_extensions",
    "websocket_origin",
    "_wskey",
)


# Autobahn's protocol classes are only partly typed; to the type checker the mixin stands on Any.
_Base: Any = Any if TYPE_CHECKING else object


class AutobahnOpenHook(_Base):
    """Mix in before Autobahn's Twisted WebSocket protocol class: overrides its private
    ``_onOpen``, the step Autobahn runs when the opening handshake is done, before the
    public ``onOpen``.

    Why: Autobahn's ``_onOpen`` reads the TLS channel binding and the peer certificate into
    its transport details for WAMP (through the transport, which on the server is a wrapper
    and not the TLS protocol itself); tcm uses neither. Instead the handshake's leftovers
    are dropped (``drop_websocket_handshake``) and the connection's state compacted
    (``compact_websocket_state``), then ``onOpen`` runs as before.
    """

    def _onOpen(self) -> None:
        drop_websocket_handshake(self)
        compact_websocket_state(self)
        self.onOpen()


def drop_websocket_handshake(protocol: Any) -> None:
    """Set Autobahn's copies of the opening handshake (``HANDSHAKE_LEFTOVERS``, among them
    the private ``_wskey``) to None on an open connection.

    Why: nothing reads them after the handshake; at tens of thousands of sessions they are
    a kilobyte or two each. ``AutobahnOpenHook`` calls it at open; only attributes the
    connection holds itself are touched.
    """
    state = protocol.__dict__
    for name in HANDSHAKE_LEFTOVERS:
        if name in state:
            state[name] = None


#: Autobahn's per-connection state as an idle, open connection holds it: flags not raised,
#: no close code, no timer pending, no frame in progress, and the handshake's leftovers once
#: dropped. These values are class attributes of ``AutobahnOpenHook``, so that
#: ``compact_websocket_state`` can leave them out of each connection's ``__dict__``.
IDLE_STATE: dict[str, Any] = {
    **dict.fromkeys(HANDSHAKE_LEFTOVERS),
    **dict.fromkeys(
        (
            "_perMessageCompress",
            "autoPingPending",
            "autoPingPendingCall",
            "autoPingPendingSent",
            "autoPingTimeoutCall",
            "closeHandshakeTimeoutCall",
            "current_frame",
            "frame_data",
            "localCloseCode",
            "localCloseReason",
            "openHandshakeTimeoutCall",
            "remoteCloseCode",
            "remoteCloseReason",
            "trackedTimings",
            "message_data",
            "wasNotCleanReason",
        )
    ),
    **dict.fromkeys(
        (
            "_isMessageCompressed",
            "closedByMe",
            "droppedByMe",
            "failedByMe",
            "inside_message",
            "triggered",
            "utf8validateIncomingCurrentMessage",
            "wasClean",
            "wasCloseHandshakeTimeout",
            "wasMaxFramePayloadSizeExceeded",
            "wasMaxMessagePayloadSizeExceeded",
            "wasOpenHandshakeTimeout",
            "wasServerConnectionDropTimeout",
            "wasServingFlashSocketPolicyFile",
        ),
        False,
    ),
    "autoPingPendingSeq": 0,
    "send_state": 0,  # SEND_STATE_GROUND
    "data": b"",
}

#: Autobahn's state of the message being received, set at each message's (or frame's)
#: start and read until its end: between messages a connection keeps none of it (the last
#: frame's unmasker among it; Autobahn makes one at each frame's header).
MESSAGE_STATE: dict[str, Any] = {
    "current_frame_masker": None,
    "frame_length": 0,
    "message_data_total_length": 0,
    "message_is_binary": False,
}

for _name, _value in {**IDLE_STATE, **MESSAGE_STATE}.items():
    setattr(AutobahnOpenHook, _name, _value)


def compact_websocket_state(protocol: Any) -> None:
    """Give an open connection a fresh ``__dict__`` without the attributes that hold the
    very object its class holds under that name (Autobahn's idle values, ``IDLE_STATE``,
    and the class defaults of tcm's own protocols): reads find the class's, the first write
    puts the attribute back on the connection. Between messages, the received message's
    state (``MESSAGE_STATE``) goes too.

    Why: Autobahn sets some sixty attributes per connection; a dict that grew to that many
    keeps a table for them (1.6 KB) though most hold None, False or 0 for the connection's
    whole idle life. Rebuilt with the twenty or fewer that differ it takes 464 bytes.
    ``AutobahnOpenHook`` calls it at open, after ``drop_websocket_handshake``; a frame
    received adds some back, and ``tcm.wsbase`` compacts again when a read leaves the
    connection between frames.
    """
    cls = type(protocol)
    state = protocol.__dict__
    between = state.get("current_frame") is None and not state.get("inside_message")
    protocol.__dict__ = {
        name: value
        for name, value in state.items()
        if getattr(cls, name, state) is not value and not (between and name in MESSAGE_STATE)
    }


#: The protocol classes bind_websocket_options made, by base class and options: factories
#: with the same options share one (a swarm's thousands of agents, one factory each).
_BOUND_CLASSES: dict[tuple[Any, ...], type] = {}
_BOUND_CLASSES_MAX = 256  # past that, classes are made but not kept for sharing


def bind_websocket_options(factory: Any) -> None:
    """Give ``factory`` a subclass of its protocol that carries the factory's WebSocket
    options as class attributes, and an empty ``CONFIG_ATTRS``; factories with equal options
    share it. Called again (an option changed), it binds from the same base class.

    Reaches ``CONFIG_ATTRS``, the list of option names Autobahn's ``_connectionMade`` copies
    from the factory into each connection's ``__dict__`` (some forty of them) and then
    ``pformat()``s for a debug line that is never shown: a fifth of a swarm's CPU in a
    reconnect storm. With the options on the class they cost nothing per connection and
    each factory keeps its own values; an empty list skips the copy and the line. Nothing
    else in Autobahn reads ``CONFIG_ATTRS``. A class is about 3 KB: one per factory was a
    swarm agent's largest Python object (issue 17), hence the sharing; a bound class must
    not be changed afterwards (bind again instead).
    """
    base = factory.protocol.__dict__.get("_tcm_unbound", factory.protocol)
    options: Mapping[str, object] = {name: getattr(factory, name) for name in base.CONFIG_ATTRS}
    key = _options_key(base, options)
    bound = _BOUND_CLASSES.get(key) if key is not None else None
    if bound is None:
        bound = type(
            base.__name__,
            (base,),
            {**options, "CONFIG_ATTRS": (), "_tcm_unbound": base, "__module__": base.__module__},
        )
        if key is not None and len(_BOUND_CLASSES) < _BOUND_CLASSES_MAX:
            _BOUND_CLASSES[key] = bound
    factory.protocol = bound


def _options_key(base: type, options: Mapping[str, object]) -> tuple[Any, ...] | None:
    """A key for equal options, or None if one is unhashable. Lists compare by value, and so
    do functions without a closure (Autobahn gives each factory a `lambda _: None` of its
    own: the same code and defaults, the same behaviour)."""
    items = []
    for name, value in sorted(options.items()):
        if isinstance(value, list):
            value = ("list", *value)
        elif isinstance(value, types.FunctionType) and not (
            value.__closure__ or value.__kwdefaults__
        ):
            value = ("function", value.__code__, value.__defaults__)
        try:
            hash(value)
        except TypeError:
            return None
        items.append((name, type(value), value))
    return (base, *items)


def reschedule_auto_ping(protocol: Any, clock: Any, interval: float) -> None:
    """Move an open connection's next automatic ping to ``interval`` seconds from now.

    Reaches ``autoPingPendingCall`` (the timer of the next ping, scheduled with the old
    interval when the connection opened) and the private ``_sendAutoPing``. Why: Autobahn
    reads ``autoPingInterval`` only when it schedules a ping, and the agent learns the
    server's keepalive after the session opened. Nothing happens when no ping is pending.
    """
    pending = getattr(protocol, "autoPingPendingCall", None)
    if pending is None:
        return
    pending.cancel()
    send: Callable[[], None] = protocol._sendAutoPing
    protocol.autoPingPendingCall = clock.callLater(interval, send)


def ping_is_proof_of_life(protocol: Any) -> None:
    """A ping from the peer counts as its answer to our own pending ping.

    Autobahn restarts its ping timeout on any *data* frame (``autoPingRestartOnAnyTraffic``)
    but not on the peer's pings. A server that holds an agent's connection unread (its intake
    budget, tcm/server/intake.py) cannot answer the agent's pings; it pings the agent instead.
    Reaches ``autoPingTimeoutCall`` and the private ``_cancelAutoPingTimeoutCall``, which
    cancels the timeout and schedules the next ping, as a data frame would."""
    if getattr(protocol, "autoPingTimeoutCall", None) is not None:
        protocol._cancelAutoPingTimeoutCall()
