"""The agents' WebSocket endpoint: a thin Autobahn adapter around AgentSession.

The upgrade is refused with a clear HTTP status and reason before any session exists: wrong
subprotocol (400), no or unknown client certificate (403), persistent connections switched
off (503). After the upgrade every frame goes to the session unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from tcm.interfaces import IAgentAdmission, IRuntimeSettings
from tcm.protocol import codes
from tcm.server.dispatcher import DirectRoute
from tcm.server.envelope_http import PeerView
from tcm.server.errors import DomainError
from tcm.server.intake import IntakeBudget
from tcm.server.sessions import AgentSession, SessionHub, intern
from tcm.server.web import http_status
from tcm.tls import pki
from tcm.wsbase import (
    LeanWebSocketMixin,
    bind_options,
    release_tls_buffers_soon,
    settle_upgrade,
)


class AgentServerProtocol(LeanWebSocketMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """One agent connection."""

    _log = Logger()
    session: AgentSession | None = None
    tls_buffer_releases = 0  # times the TLS memory BIOs were given back (wsbase)
    # the intake budget (tcm/server/intake.py): bytes granted to the message being received,
    # and while its frame waits for them, the callback that resumes reading
    _intake_held = 0
    _intake_wait: Callable[[], None] | None = None
    _hold_pings: Any = None  # the timer of the next ping to a connection held unread
    _hello_timer: Any = None  # until the hello, the timer that closes a silent session
    _unanswered = 0  # large requests read and not answered yet (a result: not committed)

    factory: AgentServerFactory

    def onConnect(self, request):
        factory = self.factory
        if codes.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(
                400,
                f"unsupported subprotocol {request.protocols!r}; this server speaks "
                f"{codes.SUBPROTOCOL}",
            )
        if not factory.settings.persistent_enabled():
            raise ConnectionDeny(503, codes.CLOSE_REASONS[codes.CLOSE_PERSISTENT_OFF])
        try:
            forwarded = request.headers.get("x-tcm-client-cert")
            if forwarded is not None:  # behind a TLS-terminating reverse proxy (nginx)
                agent_id = factory.admission.authenticate_proxied(self.transport, forwarded)
            else:
                agent_id = factory.admission.authenticate_transport(self.transport)
        except DomainError as e:
            self._log.info(
                "WebSocket upgrade refused from {peer}: {why}", peer=self.peer, why=e.message
            )
            raise ConnectionDeny(http_status(e), e.message) from None
        self.session = AgentSession(
            agent_id,
            self,
            factory.hub,
            factory.clock.seconds(),
            route=factory.route,
            max_message_size=factory.max_message_size,
        )
        self.session.tls = intern(pki.negotiated_tls(self.transport))
        self.peer_view = PeerView(self.transport, agent_id)
        return codes.SUBPROTOCOL

    def onOpen(self):
        clock = self.factory.clock
        settle_upgrade(self, clock)
        self._hello_timer = clock.callLater(self.factory.handshake_timeout, self._hello_timeout)

    def _hello_timeout(self):
        self._hello_timer = None
        if self.session is not None and self.session.state.value == "awaiting-hello":
            self.session.close(codes.CLOSE_HELLO_TIMEOUT)

    def onPing(self, payload: bytes) -> None:
        # Agents ping, the server answers; a ping is the proof of life the sweep looks for.
        if self.session is not None:
            self.session.last_rx = self.factory.clock.seconds()
        super().onPing(payload)

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        budget = self.factory.intake
        if self.failedByMe or self.session is None or not budget.counts(length):
            return

        def granted() -> None:
            self._intake_wait = None
            self._stop_hold_pings()
            self._intake_held += length
            if self.session is not None:  # not silent: it was not read
                self.session.last_rx = self.factory.clock.seconds()
            self._read(True)
            # what was read before the pause is parsed on the next turn, not inside the
            # release that granted it (another connection's commit)
            self.factory.clock.callLater(0, self._parse_held)

        if budget.request(length, granted):
            self._intake_held += length
        else:  # read and parse no more of this connection until the bytes are there
            self._intake_wait = granted
            self._read(False)
            self._hold_ping()

    def _hold_ping(self) -> None:
        """Ping a connection held unread, now and every `hold_ping` seconds: its own pings
        are not read, so their pongs cannot come; an agent takes the server's ping as proof
        of life instead (tcm.compat.ping_is_proof_of_life). Also every `hold_ping` seconds
        while a large request it sent waits for its answer (a result in the queue for a
        commit): the agent then waits for it again instead of sending it a second time over
        HTTPS after its request timeout (tcm.agent.session.AgentConnection.server_pinged)."""
        self._hold_pings = None
        if self.state != self.STATE_OPEN or (self._intake_wait is None and not self._unanswered):
            return
        self.sendPing()
        self._hold_pings = self.factory.clock.callLater(self.factory.hold_ping, self._hold_ping)

    def _answered(self, result: Any, size: int) -> Any:
        self._unanswered -= 1
        self.factory.intake.release(size)
        if not self._unanswered:  # the answer goes out now: then the BIOs are empty
            release_tls_buffers_soon(self, self.factory.clock)
        return result

    def _stop_hold_pings(self) -> None:
        if self._hold_pings is not None and self._hold_pings.active():
            self._hold_pings.cancel()
        self._hold_pings = None

    def processData(self) -> bool:
        """Autobahn's frame parser, one step; none while the frame begun waits for the
        intake budget: what was read stays in Autobahn's buffer (``data``), in order."""
        if self._intake_wait is not None:
            return False
        return bool(super().processData())

    def _parse_held(self) -> None:
        if self._intake_wait is None and self.state in (self.STATE_OPEN, self.STATE_CLOSING):
            self.consumeData()

    def _read(self, on: bool) -> None:
        transport: Any = self.transport
        if transport is not None and self.state != self.STATE_CLOSED:
            if on:
                transport.resumeProducing()
            else:
                transport.pauseProducing()

    @property
    def reading_paused(self) -> bool:
        """Waiting for the intake budget: silent because not read (the sweep spares it)."""
        return self._intake_wait is not None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        held, self._intake_held = self._intake_held, 0
        if session is None:
            return
        if isBinary:
            self.factory.intake.release(held)
            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, "tcm.v1 uses text frames")
            return
        handled = session.frame_received(payload, self.factory.clock.seconds())
        del payload
        if held:
            if handled is None:
                self.factory.intake.release(held)
            else:  # a request: its bytes count until it is answered (a result: committed)
                self._unanswered += 1
                handled.addBoth(self._answered, held)
                if self._hold_pings is None:
                    clock = self.factory.clock
                    self._hold_pings = clock.callLater(self.factory.hold_ping, self._hold_ping)
        if session.state.value == "open" and getattr(self, "_hello_timer", None) is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        timer = getattr(self, "_hello_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        if self._intake_wait is not None:
            self.factory.intake.cancel(self._intake_wait)
            self._intake_wait = None
        self._stop_hold_pings()
        if self._intake_held:  # a message begun and never finished
            self.factory.intake.release(self._intake_held)
            self._intake_held = 0
        if self.session is not None:
            self.session.connection_lost()

    # -- SessionTransport ------------------------------------------------------------------
    def send_frame(self, frame: bytes) -> None:
        # An answer that comes back after the connection began to close (a request the
        # session was still serving when the agent broke the protocol) has no one to go to.
        if self.state == self.STATE_OPEN:
            self.sendMessage(frame, isBinary=False)

    def send_prepared(self, prepared: Any) -> None:
        self.sendPreparedMessage(prepared)

    def close(self, code: int, reason: str) -> None:
        self.sendClose(code, reason[:120])

    @property
    def peer_transport(self):
        return self.peer_view


class AgentServerFactory(WebSocketServerFactory):
    """The agents' WebSocket endpoint: admits a connection (admission, settings) and gives
    its session to the hub; every direct session shares `route` (one prepared frame)."""

    protocol = AgentServerProtocol

    def __init__(
        self,
        url: str,
        hub: SessionHub,
        admission: IAgentAdmission,
        settings: IRuntimeSettings,
        clock: Any,
        max_message_size: int,
        handshake_timeout: float,
        intake: IntakeBudget | None = None,
        hold_ping: float = 10.0,
    ):
        super().__init__(url, protocols=[codes.SUBPROTOCOL])
        self.intake = intake if intake is not None else IntakeBudget()
        # seconds between pings to a connection held unread (half the agents' ping timeout)
        self.hold_ping = hold_ping
        self.hub = hub
        self.admission = admission
        self.settings = settings
        self.clock = clock
        self.max_message_size = max_message_size
        self.handshake_timeout = handshake_timeout
        self.route = DirectRoute(self.prepareMessage)
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            failByDrop=False,
            autoPingInterval=0,  # agents ping; the server sweeps silent sessions (cheaper)
            # no timer of Autobahn's per connection: served through twisted.web
            # (WebSocketResource), the upgrade request is whole when the protocol starts and
            # the opening handshake completes in that call. The TLS handshake has the
            # admission gate's deadline, the request twisted.web's, the hello its own timer.
            openHandshakeTimeout=0,
            closeHandshakeTimeout=5,
            perMessageCompressionAccept=lambda offers: None,
        )
        bind_options(self)
