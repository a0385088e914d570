"""AgentPresence tells the console when an agent in HTTP mode goes offline by time: no poll
for its window (2 x poll_interval + long_poll) is an `agent` event with mode `offline`, once,
through the real EventHub, as a session's close is for a persistent agent. With the
deterministic Clock: no sleeps."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from tcm.server.agents import AgentPresence
from tcm.server.events import EventHub

SETTINGS = {"poll_interval": 60.0, "long_poll": 30.0}  # window: 150 s
WINDOW = 150.0


class Client:
    def __init__(self):
        self.batches: list[dict] = []

    def sink(self, batch):
        self.batches.append(batch)

    def close(self, reason):
        raise AssertionError(f"closed: {reason}")

    def events(self):
        return [e for b in self.batches for e in b["events"]]


def presence_and_client():
    clock = Clock()
    clock.advance(1000.0)
    presence = AgentPresence(clock, SETTINGS, None, 50.0, 20.0)
    hub = EventHub(clock)
    presence.events = hub
    client = Client()
    hub.subscribe(["agents"], client.sink, client.close)
    return clock, presence, client


def sweep(clock, presence, seconds: float):
    """Advance the clock by `seconds`, sweeping every 5 s as the server does."""
    told = []
    for _ in range(int(seconds / 5)):
        clock.advance(5.0)
        told += presence.sweep_polls().result
    clock.advance(1.0)  # the hub's batch
    return told


def test_an_http_agent_that_stops_polling_is_told_offline_once():
    clock, presence, client = presence_and_client()
    presence.agent_polled("a1")
    polled_at = clock.seconds()
    clock.advance(1.0)
    assert client.events() == [
        {"kind": "agent", "key": "a1", "id": "a1", "mode": "http", "last_seen": polled_at}
    ]
    assert sweep(clock, presence, WINDOW - 10) == []  # inside its window: still http
    assert presence.http_mode_of("a1") == "http"
    assert sweep(clock, presence, 20) == ["a1"]
    assert presence.http_mode_of("a1") is None
    assert client.events()[1:] == [
        {
            "kind": "agent",
            "key": "a1",
            "id": "a1",
            "mode": "offline",
            "online": False,
            "last_seen": polled_at,
        }
    ]
    assert sweep(clock, presence, 600) == []  # told once
    assert len(client.events()) == 2
    # it polls again: http, and offline again a window later
    presence.agent_polled("a1")
    assert sweep(clock, presence, WINDOW + 10) == ["a1"]
    assert [e["mode"] for e in client.events()] == ["http", "offline", "http", "offline"]


def test_an_agent_that_keeps_polling_stays_http():
    clock, presence, client = presence_and_client()
    for _ in range(10):
        presence.agent_polled("a1")
        assert sweep(clock, presence, 60) == []
    assert [e["mode"] for e in client.events()] == ["http"]


def test_an_agent_polling_another_node_of_a_cluster_is_not_told_offline():
    clock, presence, client = presence_and_client()
    asked = []

    def elsewhere(ids):
        asked.append(list(ids))
        return succeed({"a1": "node-b"})

    presence.elsewhere = elsewhere
    presence.agent_polled("a1")
    presence.agent_polled("a2")
    assert sweep(clock, presence, WINDOW + 10) == ["a2"]
    assert asked == [["a1", "a2"]]
    assert [(e["id"], e["mode"]) for e in client.events()] == [
        ("a1", "http"),
        ("a2", "http"),
        ("a2", "offline"),
    ]
