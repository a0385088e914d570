"""Admission control (tcm/server/admission.py): a bounded number of TLS handshakes in progress;
connections beyond it wait unread, oldest first, and start as running ones finish.

The gate's logic on a Clock with StringTransports as the TCP connections (their producer
state shows whether a connection is read); HandshakeLogger's wrapper feeding it from a real
TLS layer (TLSMemoryBIOProtocol over a StringTransport). tests/test_tls.py runs it with real
TLS clients on the real reactor."""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from tcm.server.admission import HandshakeGate
from tcm.tls.handshake import HandshakeLogger
from tcm.tls.server import server_tls_options


def reading(t: StringTransport) -> bool:
    return t.producerState == "producing"


def test_runs_up_to_the_limit_and_queues_the_rest_unread():
    clock = Clock()
    gate = HandshakeGate(clock, limit=2)
    conns = [StringTransport() for _ in range(5)]
    for c in conns:
        gate.admit(c)
    assert [reading(c) for c in conns] == [True, True, False, False, False]
    assert gate.in_progress == 2 and gate.waiting == 3 and gate.queued == 3


def test_the_oldest_waiting_starts_as_one_finishes():
    clock = Clock()
    gate = HandshakeGate(clock, limit=2)
    conns = [StringTransport() for _ in range(5)]
    tickets = [gate.admit(c) for c in conns]
    gate.done(tickets[1])
    assert [reading(c) for c in conns] == [True, True, True, False, False]
    gate.done(tickets[1])  # twice is harmless
    assert gate.in_progress == 2 and gate.waiting == 2
    gate.done(tickets[3])  # a waiting connection that went away is skipped
    assert gate.waiting == 1
    gate.done(tickets[0])
    assert [reading(c) for c in conns[3:]] == [False, True]
    assert gate.in_progress == 2 and gate.waiting == 0
    gate.done(tickets[2])
    gate.done(tickets[4])
    assert gate.in_progress == 0
    later = StringTransport()
    gate.admit(later)  # room again: starts at once
    assert reading(later) and gate.in_progress == 1


def test_a_connection_that_waited_too_long_is_closed_unserved_when_its_turn_comes():
    """Its client gave up (and is queued again on a new connection): serving it would only
    make the live ones behind it wait longer."""
    clock = Clock()
    gate = HandshakeGate(clock, limit=1, hold=100.0, max_wait=40.0)
    first = gate.admit(StringTransport())
    old = [StringTransport() for _ in range(2)]
    for c in old:
        gate.admit(c)
    clock.advance(41.0)
    fresh = StringTransport()
    gate.admit(fresh)
    gate.done(first)
    assert [c.disconnected for c in old] == [True, True]
    assert not any(reading(c) for c in old)
    assert reading(fresh) and not fresh.disconnected
    assert gate.stale == 2 and gate.in_progress == 1 and gate.waiting == 0


def test_under_congestion_the_newest_waiting_goes_first():
    """Once the oldest has waited three quarters of max_wait, clients behind are giving up:
    the newest (whose client surely still waits) is served first; before that, in order."""
    clock = Clock()
    gate = HandshakeGate(clock, limit=1, hold=100.0, max_wait=40.0)  # newest first after 30 s
    running = gate.admit(StringTransport())
    b, c, d = (StringTransport() for _ in range(3))
    tb = gate.admit(b)
    gate.admit(c)
    clock.advance(29.0)
    gate.admit(d)
    gate.done(running)
    assert [reading(x) for x in (b, c, d)] == [True, False, False]  # 29 s: in order
    clock.advance(2.0)
    gate.done(tb)
    assert [reading(x) for x in (c, d)] == [False, True]  # c waited 31 s: newest first
    assert gate.waiting == 1 and not c.disconnected


def test_a_stalled_handshake_counts_for_hold_seconds_only():
    clock = Clock()
    gate = HandshakeGate(clock, limit=2, hold=5.0)
    conns = [StringTransport() for _ in range(4)]
    first = gate.admit(conns[0])
    gate.admit(conns[1])
    clock.advance(3)
    gate.admit(conns[2])
    gate.admit(conns[3])
    assert gate.waiting == 2
    clock.advance(1.9)
    assert gate.waiting == 2
    clock.advance(0.1)  # the first two ran 5 s: they stop counting, the waiting two start
    assert gate.expired == 2 and gate.in_progress == 2 and gate.waiting == 0
    assert all(reading(c) for c in conns)
    gate.done(first)  # finishing late changes nothing
    assert gate.in_progress == 2
    assert not clock.getDelayedCalls()  # nobody waits: no timer


def test_expiry_counts_from_the_start_of_each_handshake():
    clock = Clock()
    gate = HandshakeGate(clock, limit=1, hold=5.0)
    a, b, c = StringTransport(), StringTransport(), StringTransport()
    ta = gate.admit(a)
    clock.advance(4)
    gate.admit(b)
    gate.admit(c)
    clock.advance(1)  # a ran 5 s: b starts (now), c waits for b's 5 s
    assert reading(b) and not reading(c) and gate.expired == 1
    clock.advance(4.9)
    assert not reading(c)
    clock.advance(0.1)
    assert reading(c) and gate.expired == 2
    gate.done(ta)
    assert gate.in_progress == 1


def test_limit_must_be_positive():
    with pytest.raises(ValueError):
        HandshakeGate(Clock(), limit=0)


# -- fed by HandshakeLogger under TLS ------------------------------------------------------


@pytest.fixture(scope="module")
def tls_options(tmp_path_factory):
    from tcm.server.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("ca")))
    key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
    return server_tls_options(key_pem, cert_pem, [ca.cert_pem])


def accept(tls_factory):
    """One accepted connection through the TLS factory, as a port does it."""
    tcp = StringTransport()
    protocol = tls_factory.buildProtocol(None)
    protocol.makeConnection(tcp)
    return tcp, protocol


def test_the_wrapper_queues_connections_below_tls_and_frees_their_place(tls_options):
    clock = Clock()
    gate = HandshakeGate(clock, limit=1)
    logger = HandshakeLogger(Factory.forProtocol(Protocol), gate)
    tls_factory = TLSMemoryBIOFactory(tls_options, False, logger)
    first_tcp, first = accept(tls_factory)
    second_tcp, second = accept(tls_factory)
    assert reading(first_tcp) and not reading(second_tcp)
    assert gate.in_progress == 1 and gate.waiting == 1
    assert second_tcp.value() == b""  # nothing done for the waiting one
    first.wrappedProtocol.handshakeCompleted()  # as TLS reports a completed handshake
    assert reading(second_tcp) and gate.in_progress == 1 and gate.waiting == 0
    second.connectionLost(None)  # lost mid-handshake: its place is free too
    assert gate.in_progress == 0


def test_without_a_gate_nothing_waits(tls_options):
    logger = HandshakeLogger(Factory.forProtocol(Protocol))
    tls_factory = TLSMemoryBIOFactory(tls_options, False, logger)
    conns = [accept(tls_factory)[0] for _ in range(3)]
    assert all(reading(c) for c in conns)
