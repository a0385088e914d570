"""A server that says it restarts (close 4012) is retried every few seconds, not after a
climbing backoff: the hint's window on a Clock, and a real server's SIGTERM."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from tcm.agent.backoff import RestartHint, backoff_policy
from tests.harness import start_agents


def test_short_delays_only_inside_the_window():
    clock = Clock()
    hint = RestartHint(clock, window=120, low=1, high=4, jitter=lambda: 1.0)
    ladder = backoff_policy(1.0, 2.0, 60.0, jitter=lambda: 1.0)
    assert hint.delay(5, ladder) == 32.0  # no hint: the ladder
    hint.server_restarting()
    assert [hint.delay(n, ladder) for n in (0, 5, 9)] == [4.0, 4.0, 4.0]
    clock.advance(119)
    assert hint.delay(5, ladder) == 4.0
    clock.advance(2)
    assert hint.delay(5, ladder) == 32.0  # the window is over: back to the ladder
    hint.server_restarting()
    hint.reconnected()
    assert hint.delay(5, ladder) == 32.0


@pytest.mark.integration
def test_agents_hear_of_a_restart_and_come_back(stack):
    from tests.harness import Server

    base, add = stack
    server = add(Server(str(base)))
    server.start()
    (agent,) = [add(a) for a in start_agents(str(base), server, 1)]
    server.stop()  # SIGTERM: every session is told 4012 before the port closes
    server.start()
    agent.wait_session(2, timeout=30)
    assert "4012" in agent.log() and "the server is restarting" in agent.log()
    assert "closing 1 sessions" in server.log()
