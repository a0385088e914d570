"""Task-server failover and rebalancing decisions (TaskServerAssignments), without a reactor."""

from __future__ import annotations

import calendar
import time

from tcm.server.nodes import TaskServerAssignments

AT = calendar.timegm(time.strptime("2026-12-07 06:40:12", "%Y-%m-%d %H:%M:%S"))


def two_servers(policy: str = "fewest", n: int = 8) -> tuple[TaskServerAssignments, list[str]]:
    a = TaskServerAssignments(policy)
    a.up("ts1", "wss://1", None, now=AT - 100)
    a.up("ts2", "wss://2", None, now=AT - 100)
    agents = [f"agent{i}" for i in range(n)]
    for agent in agents:
        a.assign(agent)
    return a, agents


def test_failover_says_where_and_why_and_the_server_keeps_the_change():
    a, agents = two_servers()
    assert a.change_of("ts1") == (AT - 100, "joined")
    lost = a.down("ts1", now=AT)
    assert len(lost) == 4 and a.change_of("ts1") == (AT, "link lost")
    for agent in lost:
        assert a.assign(agent) == ("ts2", "moved to ts2: ts1 went down at 06:40:12 UTC")
    # the reason stays with the agent while it stays there (a new welcome says it again)
    assert a.assign(lost[0]) == ("ts2", "moved to ts2: ts1 went down at 06:40:12 UTC")
    assert a.counts == {"ts2": 8}


def test_a_returning_server_gets_its_agents_back_at_a_bounded_rate():
    a, agents = two_servers()
    lost = a.down("ts1", now=AT)
    for agent in lost:
        a.assign(agent)
    a.up("ts1", "wss://1", None, now=AT + 60)
    assert a.change_of("ts1") == (AT + 60, "returned")
    first = a.rebalance(3, agents)
    assert len(first) == 3  # bounded: no more than asked
    second = a.rebalance(3, agents)
    assert len(second) == 1  # 4 and 4: balanced, nothing more
    assert a.rebalance(3, agents) == []
    moves = first + second
    assert {m.agent_id for m in moves} == set(lost)  # its own agents go back first
    assert all(
        (m.source, m.destination, m.why)
        == ("ts2", "ts1", "moved back to ts1: rebalancing after ts1 returned")
        for m in moves
    )
    assert a.counts == {"ts1": 4, "ts2": 4}
    assert a.assign(lost[0]) == ("ts1", "moved back to ts1: rebalancing after ts1 returned")


def test_a_joining_server_takes_a_share_and_only_movable_agents_move():
    a, agents = two_servers(n=6)
    a.up("ts3", "wss://3", None, now=AT)
    movable = agents[:-1]  # the last one is behind a gateway, say
    moves = a.rebalance(100, movable)
    assert len(moves) == 2 and a.counts == {"ts1": 2, "ts2": 2, "ts3": 2}
    assert all(m.why == "moved to ts3: rebalancing after ts3 joined" for m in moves)
    assert agents[-1] not in {m.agent_id for m in moves}
    assert a.rebalance(100, []) == []  # nothing movable: nothing moves


def test_capacity_rebalances_by_free_places_and_respects_the_maximum():
    a = TaskServerAssignments("capacity")
    a.up("big", "wss://b", 10, now=AT)
    agents = [f"agent{i}" for i in range(8)]
    for agent in agents:
        a.assign(agent)
    a.up("small", "wss://s", 2, now=AT)
    moves = a.rebalance(100, agents)
    # big: 8 of 10 (2 free), small 0 of 2 (2 free): already even by free places
    assert moves == []
    a.up("other", "wss://o", 10, now=AT)
    moves = a.rebalance(100, agents)
    assert a.counts["other"] == 4 and a.counts["big"] == 4 and a.counts["small"] == 0
    assert len(moves) == 4


def test_an_agent_whose_only_server_returns_is_back_with_the_reason():
    a = TaskServerAssignments()
    a.registered = 1
    a.up("ts1", "wss://1", None, now=AT - 100)
    a.assign("x")
    assert a.down("ts1", now=AT) == ["x"]
    assert a.assign("x") == (None, "no task server connected")
    a.up("ts1", "wss://1", None, now=AT + 5)
    assert a.assign("x") == ("ts1", "moved back to ts1: ts1 returned (went down at 06:40:12 UTC)")


def test_a_removed_server_is_said_so_and_a_leaving_agent_forgets_its_moves():
    a, agents = two_servers(n=2)
    (gone,) = a.down("ts1", now=AT, reason="was removed")
    assert a.change_of("ts1") == (AT, "was removed")
    assert a.assign(gone) == ("ts2", "moved to ts2: ts1 was removed at 06:40:12 UTC")
    a.up("ts1", "wss://1", None, now=AT + 5)
    (move,) = a.rebalance(10, agents)  # 0 and 2: one moves; not "back" (it was removed)
    assert move.why == "moved to ts1: rebalancing after ts1 returned"
    a.release(move.agent_id)  # its session closed: a new one is assigned afresh
    assert a.assign(move.agent_id) == ("ts1", "assigned by policy 'fewest'")
