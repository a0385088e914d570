"""Admission control on the agents' port: a bounded number of TLS handshakes at once.

After a restart, thousands of agents connect within seconds. Served all at once, their
handshakes share the CPU and each one finishes late, all of them at about the same time, some
after a timeout that throws the work away. The gate lets `limit` handshakes run; every
connection accepted beyond that waits, in the order it came, with its socket not read (its
ClientHello stays in the kernel's buffer and the server does no work for it) until one of
the running handshakes completes or fails.

The connections are still accepted at once: pausing the listening port instead would leave
them in the kernel's accept queue, and once that is full (4,096) the kernel drops new SYNs,
so that clients come back after TCP's own 1, 3, 7, 15 s retransmissions, in no order, an
admin's CLI call among them (seen: a status call timing out after 60 s).

A connection counts from the moment it starts its handshake until the handshake completes or
the connection is lost, and for at most `hold` seconds: a peer that stalls mid-handshake
holds its place `hold` seconds, not longer.

Under congestion the newest waiting connection goes first (adaptive LIFO): once the oldest
has waited three quarters of `max_wait` (37.5 s), clients are giving up behind the queue (an
agent's opening handshake times out after 60 s, and it tries again on a new connection),
and served in order a queue longer than clients wait only serves connections nobody waits
for any more: agents retrying every few seconds kept 4,000 dead connections queued and
brought almost none back (issue 18's bench). Served newest first, every handshake started
is one a client still waits for. A connection that waited `max_wait` (50 s) is closed
unserved (it would hold a descriptor for a client that has left; waiting is not read, so its
close is not seen otherwise). A burst that the gate drains within that time (a restart of
10,000 agents: ~30 s) is served in order, as before: with a LIFO threshold of 10 s and a
40 s limit, the 10,000-agent restart storm dropped 9,000 connections whose clients still
waited, and 99 % were back after 234 s instead of ~45 s.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class Ticket:
    """One accepted connection as the gate counts it."""

    __slots__ = ("transport", "state", "started")

    WAITING, RUNNING, DONE = 0, 1, 2

    def __init__(self, transport: Any, now: float = 0.0):
        self.transport = transport  # the TCP connection, paused while it waits
        self.state = Ticket.WAITING
        self.started = now  # accepted (while waiting), then its handshake started


class HandshakeGate:
    """Counts handshakes in progress; holds the connections beyond `limit` in a queue."""

    def __init__(self, clock: Any, limit: int, hold: float = 5.0, max_wait: float = 50.0):
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.clock = clock
        self.limit = limit
        self.hold = hold
        self.max_wait = max_wait
        self.stale = 0  # connections closed unserved after waiting max_wait seconds
        self.in_progress = 0
        self.waiting = 0
        self.queued = 0  # connections that ever had to wait
        self.expired = 0  # handshakes that stopped counting after `hold` seconds
        self._queue: deque[Ticket] = deque()  # waiting, in accept order
        self._running: deque[Ticket] = deque()  # running, in start order
        self._timer: Any = None

    def admit(self, transport: Any) -> Ticket:
        """A connection was accepted, nothing read from it yet. `transport`: its TCP
        connection (an IPushProducer), paused while it waits."""
        ticket = Ticket(transport, self.clock.seconds())
        if self.in_progress < self.limit and not self.waiting:
            self._start(ticket)
            return ticket
        transport.pauseProducing()
        self._queue.append(ticket)
        self.waiting += 1
        self.queued += 1
        self._schedule_expiry()
        return ticket

    def done(self, ticket: Ticket) -> None:
        """The connection's handshake completed, or the connection is gone (either twice is
        harmless)."""
        state = ticket.state
        ticket.state = Ticket.DONE
        ticket.transport = None
        if state == Ticket.WAITING:
            self.waiting -= 1  # left in the queue, skipped when its turn comes
        elif state == Ticket.RUNNING:
            self.in_progress -= 1
            self._next()

    def _start(self, ticket: Ticket) -> None:
        ticket.state = Ticket.RUNNING
        ticket.started = self.clock.seconds()
        self.in_progress += 1
        self._running.append(ticket)

    def _next(self) -> None:
        """Start waiting connections while there is room: oldest first, newest first under
        congestion; those that waited too long are closed."""
        queue = self._queue
        now = self.clock.seconds()
        stale_before = now - self.max_wait
        while queue and (queue[0].state != Ticket.WAITING or queue[0].started < stale_before):
            ticket = queue.popleft()
            if ticket.state == Ticket.WAITING:  # waited too long: closed unserved
                self.waiting -= 1
                transport, ticket.transport = ticket.transport, None
                ticket.state = Ticket.DONE
                self.stale += 1
                transport.abortConnection()
        congested = bool(queue) and queue[0].started < now - self.max_wait * 0.75
        while self.in_progress < self.limit and queue:
            ticket = queue.pop() if congested else queue.popleft()
            if ticket.state != Ticket.WAITING:
                continue
            self.waiting -= 1
            self._start(ticket)
            ticket.transport.resumeProducing()
        running = self._running
        while running and running[0].state != Ticket.RUNNING:
            running.popleft()

    def _schedule_expiry(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        running = self._running
        while running and running[0].state != Ticket.RUNNING:
            running.popleft()
        if not running:
            return
        due = running[0].started + self.hold - self.clock.seconds()
        self._timer = self.clock.callLater(max(0.0, due), self._expire)

    def _expire(self) -> None:
        """Handshakes running `hold` seconds or longer stop counting: others may start."""
        self._timer = None
        now = self.clock.seconds()
        running = self._running
        while running and (
            running[0].state != Ticket.RUNNING or running[0].started + self.hold <= now
        ):
            ticket = running.popleft()
            if ticket.state == Ticket.RUNNING:
                ticket.state = Ticket.DONE
                ticket.transport = None
                self.in_progress -= 1
                self.expired += 1
        self._next()
        if self.waiting:
            self._schedule_expiry()
