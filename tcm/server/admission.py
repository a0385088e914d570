"""Admission control on the agents' listening port: a bounded number of TLS handshakes at once.

After a restart, thousands of agents connect within seconds. Accepted all at once, their
handshakes share the CPU and each one finishes late, all of them at about the same time, some
after a timeout that throws the work away. The gate pauses accepting (the port stops reading)
while `limit` handshakes are in progress and resumes as they finish: the connections that wait
do so in the kernel's accept queue (listen backlog), at no cost, and a backlog is served in
the order it came.

A connection counts from its accept until its TLS handshake completes or it is lost, and for
at most `hold` seconds: a peer that connects and stalls can keep the port paused for `hold`
seconds per `limit` such connections, not longer.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


class Ticket:
    """One accepted connection as the gate counts it."""

    __slots__ = ("started", "counted")

    def __init__(self, started: float):
        self.started = started
        self.counted = True


class HandshakeGate:
    """Counts handshakes in progress; stops and starts reading on the listening port."""

    def __init__(self, clock: Any, limit: int, hold: float = 5.0):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.clock = clock
        self.limit = limit
        self.hold = hold
        self.port: Any = None
        self.in_progress = 0
        self.paused = False
        self.pauses = 0  # times the port stopped accepting
        self.expired = 0  # connections that stopped counting after `hold` seconds
        self._tickets: deque[Ticket] = deque()  # in accept order
        self._timer: Any = None

    def attach(self, port: Any) -> None:
        """The listening port to pause and resume (an IListeningPort that is also a reader,
        like Twisted's tcp.Port)."""
        self.port = port
        if self.in_progress >= self.limit:
            self._pause()

    def admit(self) -> Ticket:
        """A connection was accepted: its handshake starts."""
        ticket = Ticket(self.clock.seconds())
        self._tickets.append(ticket)
        self.in_progress += 1
        if self.in_progress >= self.limit and not self.paused:
            self._pause()
        return ticket

    def done(self, ticket: Ticket) -> None:
        """The connection's handshake completed, or the connection is gone (either twice is
        harmless)."""
        if not ticket.counted:
            return
        ticket.counted = False
        self.in_progress -= 1
        self._drop_finished()
        if self.paused and self.in_progress < self.limit:
            self._resume()

    def _drop_finished(self) -> None:
        tickets = self._tickets
        while tickets and not tickets[0].counted:
            tickets.popleft()

    def _pause(self) -> None:
        port = self.port
        if port is None or getattr(port, "disconnecting", False):
            return
        self.paused = True
        self.pauses += 1
        port.stopReading()
        self._schedule_expiry()

    def _resume(self) -> None:
        self.paused = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        port = self.port
        if port is None or getattr(port, "disconnecting", False):
            return
        port.startReading()

    def room(self) -> int:
        """How many more connections may be accepted now."""
        return self.limit - self.in_progress

    def _schedule_expiry(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        self._drop_finished()
        if not self._tickets:
            return
        due = self._tickets[0].started + self.hold - self.clock.seconds()
        self._timer = self.clock.callLater(max(0.0, due), self._expire)

    def _expire(self) -> None:
        """Connections accepted `hold` seconds ago or more stop counting."""
        self._timer = None
        now = self.clock.seconds()
        tickets = self._tickets
        while tickets and (not tickets[0].counted or tickets[0].started + self.hold <= now):
            ticket = tickets.popleft()
            if ticket.counted:
                ticket.counted = False
                self.in_progress -= 1
                self.expired += 1
        if self.paused:
            if self.in_progress < self.limit:
                self._resume()
            else:
                self._schedule_expiry()

    def detach(self) -> None:
        """The port stops listening: nothing to resume any more."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.port = None
        self.paused = False


class GatedPort(tcp.Port):
    """A TCP port that accepts no more connections per wakeup than its gate has room for.

    Twisted's port accepts up to `numberAccepts` connections each time the listening socket
    is readable (and raises that under load); capped at the gate's room, the gate's pause
    falls on the last connection of a wakeup and the limit holds exactly."""

    def __init__(self, port: int, factory: Any, backlog: int, interface: str, reactor: Any, gate):
        super().__init__(port, factory, backlog, interface, reactor)
        self.gate: HandshakeGate = gate

    def doRead(self) -> None:
        room = self.gate.room()
        if room < 1:  # paused while this wakeup was already on its way
            return
        self.numberAccepts = max(1, min(self.numberAccepts, room))
        super().doRead()


@implementer(IStreamServerEndpoint)
class GatedTLSEndpoint:
    """Listens for TLS like SSL4ServerEndpoint (TLS over a TCP port), on a GatedPort whose
    gate counts the handshakes the factory's protocols report (HandshakeLogger)."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        context_factory: Any,
        gate: HandshakeGate,
        backlog: int = 50,
        interface: str = "",
    ):
        self.reactor = reactor
        self.port = port
        self.context_factory = context_factory
        self.gate = gate
        self.backlog = backlog
        self.interface = interface

    def listen(self, factory: Any) -> Deferred:
        tls_factory = TLSMemoryBIOFactory(self.context_factory, False, factory)
        port = GatedPort(
            self.port, tls_factory, self.backlog, self.interface, self.reactor, self.gate
        )
        port._type = "TLS"

        def listening(_: Any) -> GatedPort:
            self.gate.attach(port)
            return port

        return execute(port.startListening).addCallback(listening)
