"""Admission control on the listening port (tcm/server/admission.py): a bounded number of
handshakes in progress; the port stops accepting above it and resumes as they finish.

The port is Twisted's real TCP port (GatedPort) on loopback, driven by a MemoryReactorClock:
connections are real sockets accepted by `doRead`, the reactor's readers show whether the
port accepts, and the clock drives the gate's hold time. tests/test_tls.py runs the gated
endpoint with real TLS clients on the real reactor."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from tcm.server.admission import GatedPort, HandshakeGate
from tcm.server.ca import HandshakeLogger


class Built(Factory):
    """Builds plain protocols and keeps them, so a test can end their connections."""

    def __init__(self) -> None:
        self.built: list[Protocol] = []

    def buildProtocol(self, addr):
        p = Protocol()
        self.built.append(p)
        return p


@pytest.fixture
def stack():
    """(reactor, gate of 3, logger, port listening on loopback, connect())"""
    reactor = MemoryReactorClock()
    gate = HandshakeGate(reactor, limit=3, hold=5.0)
    inner = Built()
    logger = HandshakeLogger(inner, gate)
    port = GatedPort(0, logger, 50, "127.0.0.1", reactor, gate)
    port.startListening()
    gate.attach(port)
    clients: list[socket.socket] = []

    def connect(n: int) -> None:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
            clients.append(s)

    yield reactor, gate, logger, port, connect
    for s in clients:
        s.close()
    port.connectionLost(None)


def accepting(reactor, port) -> bool:
    return port in reactor.readers


def watchers(reactor, port):
    """The HandshakeLogger wrappers of the connections the port accepted, oldest first."""
    conns = sorted((r for r in reactor.readers if r is not port), key=lambda c: c.sessionno)
    return [c.protocol for c in conns]


def test_accepts_no_more_than_the_limit_and_pauses(stack):
    reactor, gate, logger, port, connect = stack
    connect(5)
    assert accepting(reactor, port)
    port.doRead()  # five are waiting in the backlog: three are accepted
    assert gate.in_progress == 3
    assert len(watchers(reactor, port)) == 3
    assert not accepting(reactor, port)
    assert gate.paused and gate.pauses == 1
    port.doRead()  # a wakeup already on its way accepts nothing
    assert len(watchers(reactor, port)) == 3


def test_resumes_as_handshakes_finish_in_order(stack):
    reactor, gate, logger, port, connect = stack
    connect(5)
    port.doRead()
    first, second, third = watchers(reactor, port)
    first.handshakeCompleted()
    assert gate.in_progress == 2
    assert accepting(reactor, port) and not gate.paused
    port.doRead()  # room for one: one of the two waiting is accepted, and the port pauses
    assert len(watchers(reactor, port)) == 4
    assert not accepting(reactor, port)
    first.handshakeCompleted()  # twice is harmless
    assert gate.in_progress == 3
    # a connection lost mid-handshake frees its place too
    second.transport.connectionLost(Failure(ConnectionLost()))
    assert gate.in_progress == 2 and accepting(reactor, port)
    port.doRead()
    assert len(watchers(reactor, port)) == 4  # 3 + 1 new, second gone
    assert gate.in_progress == 3


def test_a_stalled_connection_counts_for_hold_seconds_only(stack):
    reactor, gate, logger, port, connect = stack
    connect(4)
    port.doRead()
    assert not accepting(reactor, port)
    reactor.advance(4.9)
    assert not accepting(reactor, port)
    reactor.advance(0.1)  # nobody finished in 5 s: the three stop counting
    assert gate.in_progress == 0 and gate.expired == 3
    assert accepting(reactor, port)
    port.doRead()
    assert gate.in_progress == 1
    # the stalled ones finishing later change nothing
    for w in watchers(reactor, port)[:3]:
        w.handshakeCompleted()
    assert gate.in_progress == 1


def test_expiry_counts_from_each_connections_accept(stack):
    reactor, gate, logger, port, connect = stack
    connect(2)
    port.doRead()
    reactor.advance(3)
    connect(2)
    port.doRead()  # 2 + 1: paused, the oldest 3 s old
    assert gate.in_progress == 3 and gate.paused
    reactor.advance(2)  # the first two are 5 s old: they stop counting; the third does not
    assert gate.in_progress == 1 and gate.expired == 2
    assert accepting(reactor, port)
    port.doRead()  # the fourth
    assert gate.in_progress == 2


def test_a_port_that_stopped_listening_is_not_resumed(stack):
    reactor, gate, logger, port, connect = stack
    connect(3)
    port.doRead()
    assert not accepting(reactor, port)
    port.stopListening()
    for w in watchers(reactor, port):
        w.handshakeCompleted()
    assert gate.in_progress == 0
    assert not accepting(reactor, port)


def test_refused_connections_are_not_counted():
    reactor = MemoryReactorClock()
    gate = HandshakeGate(reactor, limit=2)

    class Refusing(Factory):
        def buildProtocol(self, addr):
            return None

    logger = HandshakeLogger(Refusing(), gate)
    assert logger.buildProtocol(None) is None
    assert gate.in_progress == 0


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        HandshakeGate(MemoryReactorClock(), limit=0)
