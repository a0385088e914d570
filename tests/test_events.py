"""The console's event hub (tcm/server/events.py): batching, coalescing, bounds, slow
clients; on a Clock, no reactor."""

from __future__ import annotations

import json

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tcm.interfaces import IEventHub, IEventPublisher
from tcm.server import events
from tcm.server.events import EventHub, agent_event, output_event, target_event


class Client:
    """A sink that records batches and the reason it was closed."""

    def __init__(self):
        self.batches: list[dict] = []
        self.closed: str | None = None

    def sink(self, batch):
        self.batches.append(batch)

    def close(self, reason):
        self.closed = reason

    def events(self):
        return [e for b in self.batches for e in b["events"]]


def hub_and_client(topics=("agents",), **kw):
    clock = Clock()
    hub = EventHub(clock, **kw)
    client = Client()
    sub = hub.subscribe(topics, client.sink, client.close)
    return clock, hub, client, sub


def test_hub_provides_its_interfaces():
    hub = EventHub(Clock())
    assert verifyObject(IEventHub, hub)
    assert verifyObject(IEventPublisher, hub)
    assert verifyObject(IEventPublisher, events.NO_EVENTS)


def test_first_event_goes_at_once_then_at_most_one_batch_per_interval():
    clock, hub, client, _ = hub_and_client(interval=0.25)
    hub.publish(agent_event("a1", mode="persistent"))
    clock.advance(0)
    assert len(client.batches) == 1
    assert client.batches[0]["events"] == [
        {"kind": "agent", "key": "a1", "id": "a1", "mode": "persistent"}
    ]
    for i in range(50):  # a burst within one interval: one more batch, not fifty
        hub.publish(agent_event(f"b{i}", mode="http"))
        clock.advance(0.001)
    assert len(client.batches) == 1
    clock.advance(0.25)
    assert len(client.batches) == 2
    assert len(client.batches[1]["events"]) == 50
    assert [b["seq"] for b in client.batches] == [0, 1]
    clock.advance(10)  # nothing new: nothing sent
    assert len(client.batches) == 2


def test_events_of_one_key_coalesce_to_the_latest_and_output_is_appended():
    clock, hub, client, _ = hub_and_client(topics=("job:j1",))
    for state in ("delivered", "running", "succeeded"):
        hub.publish(target_event("j1", "a1", state, 1.0))
    hub.publish(output_event("j1", "a1", 1, "stdout", "one\n"))
    hub.publish(output_event("j1", "a1", 2, "stdout", "two\n"))
    clock.advance(0)
    (batch,) = client.batches
    assert [(e["kind"], e.get("state"), e.get("text")) for e in batch["events"]] == [
        ("target", "succeeded", None),
        ("output", None, "one\n"),
        ("output", None, "two\n"),
    ]


def test_coalesced_events_keep_the_fields_only_earlier_ones_carried():
    clock, hub, client, _ = hub_and_client()
    hub.publish(agent_event("first"))
    clock.advance(0)  # the next batch waits for the interval: these two coalesce
    hub.publish(agent_event("a1", mode="offline", online=False))
    hub.publish(agent_event("a1", state="revoked", revoked=True))
    clock.advance(1)
    assert client.batches[-1]["events"] == [
        {
            "kind": "agent",
            "key": "a1",
            "id": "a1",
            "mode": "offline",
            "online": False,
            "state": "revoked",
            "revoked": True,
        }
    ]


def test_only_subscribers_of_a_topic_get_its_events():
    clock = Clock()
    hub = EventHub(clock)
    job_client, agent_client = Client(), Client()
    hub.subscribe(["job:j1"], job_client.sink, job_client.close)
    hub.subscribe(["agents"], agent_client.sink, agent_client.close)
    hub.publish(target_event("j2", "a1", "running", 1.0))  # nobody follows j2
    hub.publish(target_event("j1", "a1", "running", 1.0))
    hub.publish(agent_event("a1", mode="offline"))
    clock.advance(0)
    assert [e["kind"] for e in job_client.events()] == ["target"]
    assert [e["kind"] for e in agent_client.events()] == ["agent"]
    assert hub.subscribers() == 2 and hub.subscribers("job:j2") == 0


def test_over_max_pending_the_client_is_told_to_resync_and_nothing_stale_follows():
    clock, hub, client, sub = hub_and_client(max_pending=10)
    hub.publish(agent_event("first"))
    clock.advance(0)  # sent: the next batch waits for the interval
    for i in range(11):
        hub.publish(agent_event(f"a{i}"))
    assert sub.resync and sub.pending == 0  # the buffer stays bounded
    hub.publish(agent_event("late"))  # dropped: the snapshot after the resync is newer
    clock.advance(1)
    assert client.batches[-1] == {"seq": 1, "resync": True, "events": []}
    hub.publish(agent_event("after"))
    clock.advance(1)
    assert client.batches[-1]["events"][0]["id"] == "after"
    assert not client.batches[-1]["resync"]


def test_output_over_max_bytes_resyncs_and_each_chunk_is_capped():
    clock, hub, client, sub = hub_and_client(topics=("job:j1",), max_bytes=100)
    chunk = output_event("j1", "a1", 1, "stdout", "x" * (events.MAX_CHUNK + 5))
    assert len(chunk.data["text"]) == events.MAX_CHUNK and chunk.data["truncated"]
    hub.publish(output_event("j1", "a1", 1, "stdout", "y" * 101))
    assert sub.resync
    clock.advance(0)
    assert client.batches == [{"seq": 0, "resync": True, "events": []}]


def test_a_paused_client_gets_nothing_until_resumed_then_one_coalesced_batch():
    clock, hub, client, sub = hub_and_client()
    sub.pauseProducing()
    for state in ("persistent", "offline", "http"):
        hub.publish(agent_event("a1", mode=state))
    clock.advance(5)
    assert client.batches == []
    sub.resumeProducing()
    clock.advance(0)
    assert client.events() == [{"kind": "agent", "key": "a1", "id": "a1", "mode": "http"}]


def test_a_client_paused_past_max_stall_is_dropped_with_the_reason():
    clock, hub, client, sub = hub_and_client(max_stall=30)
    sub.pauseProducing()
    hub.publish(agent_event("a1"))
    clock.advance(29)
    assert client.closed is None
    clock.advance(1)
    assert client.closed is not None and "too slow" in client.closed
    assert sub.closed and hub.subscribers() == 0
    hub.publish(agent_event("a2"))  # no error, nothing sent
    clock.advance(1)
    assert client.batches == []


def test_cancel_unsubscribes_and_stops_timers():
    clock, hub, client, sub = hub_and_client()
    hub.publish(agent_event("a1"))
    sub.cancel()
    clock.advance(1)
    assert client.batches == [] and hub.subscribers() == 0
    assert clock.getDelayedCalls() == []


def test_sse_frame_is_one_event_with_json_on_one_line():
    frame = events.sse_frame({"seq": 0, "resync": False, "events": [{"text": "a\nb"}]})
    head, data, end = frame.split(b"\n", 2)
    assert head == b"event: batch" and end == b"\n"
    assert json.loads(data[len(b"data: ") :])["events"][0]["text"] == "a\nb"


@pytest.mark.parametrize(
    "raw, wanted",
    [
        (None, {"agents", "jobs"}),
        ("agents", {"agents"}),
        ("job:abc123,agents", {"job:abc123", "agents"}),
    ],
)
def test_topics_parse(raw, wanted):
    assert events.parse_topics(raw) == wanted


@pytest.mark.parametrize("raw", ["nope", "job:", "job:a/b", ",".join(["agents"] * 17)])
def test_bad_topics_are_refused_with_a_reason(raw):
    with pytest.raises(ValueError, match="topic"):
        events.parse_topics(raw)
