"""The agent's persistent session: a thin Autobahn client protocol around AgentConnection.

`AgentConnection` sends `hello`, waits for `welcome` (its `welcomed` Deferred is what the
ClientService's prepareConnection waits on, so a refused login counts as a failed attempt and
grows the backoff), answers pushes through a table of handlers, and matches `response`
envelopes to the calls that are waiting for them.
"""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Callable
from typing import Any

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.defer import Deferred
from twisted.logger import Logger

import tcm
from tcm import compat
from tcm.agent.link import CallFailed, Response
from tcm.interfaces import ISessionHost
from tcm.protocol import codes
from tcm.protocol.envelope import Envelope, ProtocolError, decode, encode, error_for
from tcm.tls import pki
from tcm.wsbase import LeanWebSocketMixin, bind_options, release_tls_buffers_soon


class SessionRefused(Exception):
    """The server closed or refused the session before welcome."""

    def __init__(self, code: int | None, reason: str | None):
        super().__init__(f"session refused: {code} {reason or ''}".strip())
        self.code = code
        self.reason = reason


class AgentConnection:
    """Session logic of one agent connection, independent of the socket."""

    _log = Logger()

    def __init__(
        self,
        agent: ISessionHost,
        send: Callable[[bytes], None],
        close: Callable[[int, str], None],
        clock: Any,
    ):
        self.agent = agent
        self._send = send
        self._close = close
        self.clock = clock
        self.protocol: Any = None  # the WebSocket protocol carrying this connection
        self.welcome: dict[str, Any] | None = None
        self.welcomed: Deferred[AgentConnection] = Deferred()
        self._pending: dict[str, tuple[Deferred[Response], Any, float]] = {}
        self._open = False
        self._handlers: dict[str, Callable[[Envelope], None]] = {
            "welcome": self._on_welcome,
            "action.request": self._on_action,
            "action.cancel": self._on_cancel,
            "response": self._on_response,
            "error": self._on_error,
            "notify": self._on_notify,
        }

    def is_open(self) -> bool:
        return self._open

    def start(self) -> None:
        """The WebSocket is open: introduce ourselves."""
        self.send(
            Envelope(
                type="hello",
                data={
                    "agent_version": tcm.__version__,
                    "protocol": codes.PROTOCOL_VERSION,
                    "hostname": socket.gethostname(),
                    "platform": platform.platform(),
                    **self.agent.hello(),
                },
            )
        )

    def send(self, env: Envelope) -> None:
        self._send(encode(env))

    def frame_received(self, payload: bytes) -> None:
        try:
            env = decode(payload, 0)
        except ProtocolError as e:
            self._log.warn("server sent a bad message: {e}", e=e)
            self.send(error_for(e))
            return
        handler = self._handlers.get(env.type)
        if handler is None:
            self.send(env.error_reply(codes.ERR_UNEXPECTED, f"agents do not take {env.type!r}"))
            return
        handler(env)

    def _on_welcome(self, env: Envelope) -> None:
        self.welcome = env.data
        self.agent.learn_server_time(env.data.get("server_time"))
        self._open = True
        if not self.welcomed.called:
            self.welcomed.callback(self)

    def _on_action(self, env: Envelope) -> None:
        # Note the arrival now; act on it on the next reactor turn, after whatever else the
        # reactor has read, so that reading stays ahead of the work reading brings.
        self.clock.callLater(0, self.agent.action_requested, env, time.time(), self)

    def _on_cancel(self, env: Envelope) -> None:
        self.agent.cancel_requested(env.data)

    def _on_notify(self, env: Envelope) -> None:
        self.agent.notified(env.data)

    def _on_response(self, env: Envelope) -> None:
        pending = self._pending.pop(env.in_reply_to or "", None)
        if pending is None:
            return
        d, timer, _ = pending
        timer.cancel()
        d.callback(Response(env.data["status"], env.data.get("body"), "websocket"))

    def _on_error(self, env: Envelope) -> None:
        pending = self._pending.pop(env.in_reply_to or "", None)
        msg = f"{env.data['code']}: {env.data['message']}"
        if pending is not None:
            d, timer, _ = pending
            timer.cancel()
            d.errback(CallFailed(f"server error {msg}"))
            return
        self._log.warn("server reports an error for {ref}: {msg}", ref=env.in_reply_to, msg=msg)

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Deferred[Response]:
        """One agent API call as a request envelope; fires with the Response."""
        if not self._open:
            raise CallFailed("no open session")
        data: dict[str, Any] = {"method": method, "path": path}
        if body is not None:
            data["body"] = body
        env = Envelope(type="request", data=data)
        d: Deferred[Response] = Deferred()
        timeout = timeout or 30.0
        timer = self.clock.callLater(timeout, self._timed_out, env.id)
        self._pending[env.id] = (d, timer, timeout)
        self.send(env)
        return d

    def server_pinged(self) -> None:
        """The server pings only a session it holds unread (its intake budget: what this
        agent sent waits behind other agents' results): it is alive and will answer, so the
        requests it has not answered yet wait again in full rather than time out and go
        again over HTTPS, a second copy behind the first."""
        for _d, timer, timeout in self._pending.values():
            if timer.active():
                timer.reset(timeout)

    def _timed_out(self, msg_id: str) -> None:
        pending = self._pending.pop(msg_id, None)
        if pending is not None:
            pending[0].errback(CallFailed("no response within the timeout"))

    def lost(self, code: int | None, reason: str | None) -> None:
        """The connection is gone: fail waiting calls (they go again over HTTPS)."""
        self._open = False
        if not self.welcomed.called:
            self.welcomed.errback(SessionRefused(code, reason))
        pending, self._pending = self._pending, {}
        for d, timer, _ in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(CallFailed(f"session closed ({code} {reason or ''})"))


class AgentClientProtocol(LeanWebSocketMixin, WebSocketClientProtocol):  # type: ignore[misc]
    """Thin adapter: frames in and out of AgentConnection."""

    _log = Logger()
    connection: AgentConnection | None = None
    tls_buffer_releases = 0  # times the TLS memory BIOs were given back (wsbase)

    def connectionMade(self):
        host = self.factory.session_host
        self.connection = AgentConnection(host, self._send_frame, self._close, host.clock)
        self.connection.protocol = self
        super().connectionMade()

    def startHandshake(self) -> None:
        """Send the opening handshake, as Autobahn's own does when onConnecting is not
        overridden (tcm's is not), without its debug line: Autobahn pformat()s every
        connection's transport details for it, shown or not, a tenth of a swarm's CPU when
        thousands of agents reconnect at once."""
        factory = self.factory
        self._actuallyStartHandshake(
            ConnectingRequest(
                host=factory.host,
                port=factory.port,
                resource=factory.resource,
                headers=factory.headers,
                useragent=factory.useragent,
                origin=factory.origin,
                protocols=factory.protocols,
            )
        )

    def onConnect(self, response):
        if response.protocol != codes.SUBPROTOCOL:
            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, "server did not accept tcm.v1")

    def onOpen(self):
        assert self.connection is not None
        try:
            self.connection.start()
        except Exception:
            # Autobahn would swallow it and leave the session waiting for a welcome forever.
            self._log.failure("could not start the session")
            self.sendClose(codes.CLOSE_NORMAL, "agent failed to start the session")
            return
        # The TLS handshake's flights and tickets and the upgrade are in: the TLS memory BIOs
        # need not keep their size for the session's lifetime (as the server's do not).
        release_tls_buffers_soon(self, self.connection.clock)

    def onPing(self, payload: bytes) -> None:
        # the server is alive: it pings a session whose messages it holds back unread
        compat.ping_is_proof_of_life(self)
        if self.connection is not None:
            self.connection.server_pinged()
        super().onPing(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.connection is not None and not isBinary:
            self.connection.frame_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.connection is not None:
            self.connection.lost(code, reason)
        self.factory.lost(self, code, reason)

    def _send_frame(self, frame: bytes) -> None:
        self.sendMessage(frame, isBinary=False)

    def _close(self, code: int, reason: str) -> None:
        self.sendClose(code, reason)

    def tls_info(self) -> dict[str, Any]:
        return pki.negotiated_tls(self.transport)


_BATCHED_TIMER: Any = None


def _shared_batched_timer() -> Any:
    """The process's timer wheel for sessions' pings and timeouts, as Autobahn makes one
    for each factory (0.2 s buckets, 1,000 calls at a time)."""
    global _BATCHED_TIMER
    if _BATCHED_TIMER is None:
        make = txaio.make_batched_timer  # type: ignore[attr-defined]  # (set at use_twisted)
        _BATCHED_TIMER = make(bucket_seconds=0.2, chunk_size=1000)
    return _BATCHED_TIMER


class AgentClientFactory(WebSocketClientFactory):
    """Sessions of one agent with one server (or task server): what arrives goes to
    `session_host`, and `lost(protocol, code, reason)` is told when one closes."""

    protocol = AgentClientProtocol
    noisy = False  # no "Starting factory" line at each connection (it starts at each one)

    def __init__(
        self,
        host: ISessionHost,
        lost: Callable[[Any, int | None, str | None], None],
        url: str,
        keepalive: float,
        keepalive_timeout: float,
        max_message_size: int,
    ):
        super().__init__(url, protocols=[codes.SUBPROTOCOL])
        # Autobahn gives each factory a timer wheel of its own (a timer, its bucket table,
        # two closures and a reactor call per 0.2 s bucket: about 1.5 KB). It is there to
        # batch the timers of many connections: one per process serves every agent there
        # (one in an agent process, thousands in a swarm; issue 17).
        self._batched_timer = _shared_batched_timer()
        self.session_host = host  # not `host`: Autobahn's factory keeps the URL's host there
        self.lost = lost
        self.setProtocolOptions(
            autoPingInterval=keepalive,
            autoPingTimeout=keepalive_timeout,
            failByDrop=False,
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            openHandshakeTimeout=60,  # generous: a slow handshake in a storm is not wasted
            closeHandshakeTimeout=5,
            perMessageCompressionOffers=[],
        )
        bind_options(self)

    def set_keepalive(self, interval: float) -> None:
        """Ping every `interval` seconds on the connections made from now on (an open one
        is rescheduled by its owner). The options' class may be shared with other factories:
        it is not changed, this factory binds to one with the new interval."""
        if self.autoPingInterval != interval:
            self.autoPingInterval = interval  # type: ignore[assignment]  # (Autobahn: int)
            bind_options(self)
