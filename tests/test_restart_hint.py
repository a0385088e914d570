"""A server that says it restarts (close 4012) is retried every few seconds, not after a
climbing backoff: the hint's window on a Clock, and a real server's SIGTERM; the restarted
server resumes the agent's handshake with its resumption token (tcm.tls.resumption)."""

from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from tcm.agent.backoff import RestartHint, backoff_policy
from tests.harness import agent_status, start_agents, wait_until


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
    first = _new_session(agent, None)
    assert first["tls"]["handshake"] == "full"
    server.stop()  # SIGTERM: every session is told 4012 before the port closes
    server.start()
    second = _new_session(agent, first["session"])
    assert "4012" in agent.log() and "the server is restarting" in agent.log()
    assert "closing 1 sessions" in server.log()
    # the welcome's resumption token resumed the handshake on the restarted server: no
    # certificate on the wire, and both sides say so
    assert second["tls"]["handshake"] == "token"
    assert {a["id"]: a for a in server.agents()}[agent.agent_id]["tls"] == second["tls"]
    # a server whose secret is gone cannot open it: a full handshake, not a refusal
    server.stop()
    os.remove(os.path.join(server.state_dir, "resumption.key"))
    server.start()
    assert _new_session(agent, second["session"])["tls"]["handshake"] == "full"


def _new_session(agent, other: str | None) -> dict:
    """The agent's persistent status once it has a session other than `other`."""
    seen: dict = {}

    def opened() -> bool:
        seen.update(agent_status(agent)["persistent"])
        return bool(seen["connected"] and seen["session"] != other)

    wait_until(opened, 30, 0.2, "a new session")
    return seen
