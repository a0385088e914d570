"""The cluster bus's contract, run against the real RedisBus (the local Redis, keys and
channels under a prefix of the test's own) and the FakeBus the node tests use
(tests/clusterfakes.py): the fake is only as good as this test makes it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from tcm.interfaces import IClusterBus
from tcm.server.cluster.bus import RedisBus
from tests.clusterfakes import FakeBus, FakeRedis
from tests.test_cluster import REDIS, _redis_reachable


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.02, lambda: None)


class Node:
    """A started bus and what it received."""

    def __init__(self, bus: Any):
        self.bus = bus
        self.messages: list[dict[str, Any]] = []
        self.states: list[bool] = []
        bus.start(self.messages.append, self.states.append)


@pytest.fixture(params=["fake", "redis"])
def nodes(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Node]]:
    """A factory of started nodes on one bus (fake or Redis)."""
    made: list[Node] = []
    if request.param == "redis":
        if not _redis_reachable(REDIS):
            pytest.skip(f"Redis at {REDIS} unreachable")
        prefix = "tcm-test-" + uuid.uuid4().hex[:10]

        def make(name: str) -> Node:
            node = Node(RedisBus(REDIS, prefix, name, reactor))
            made.append(node)
            return node
    else:
        shared = FakeRedis()

        def make(name: str) -> Node:
            node = Node(FakeBus(shared, name))
            made.append(node)
            return node

    yield make
    for node in made:
        node.bus.leave()
        node.bus.stop()


def test_both_provide_the_interface() -> None:
    verifyObject(IClusterBus, FakeBus(FakeRedis(), "n1"))
    verifyObject(IClusterBus, RedisBus(REDIS, "p", "n1", reactor))


@pytest_twisted.ensureDeferred
async def test_a_message_reaches_its_node_only(nodes: Callable[[str], Node]) -> None:
    n1, n2, n3 = nodes("n1"), nodes("n2"), nodes("n3")
    await until(lambda: n1.bus.up and n2.bus.up and n3.bus.up)
    assert n1.states == [True]
    await n1.bus.send("n2", {"t": "job", "job": "j1", "to": ["a"]})
    await until(lambda: n2.messages)
    await n1.bus.send("n3", {"t": "job", "job": "j2", "to": []})
    await until(lambda: n3.messages)
    assert n2.messages == [{"t": "job", "job": "j1", "to": ["a"]}]
    assert n3.messages == [{"t": "job", "job": "j2", "to": []}]
    assert n1.messages == []


@pytest_twisted.ensureDeferred
async def test_a_broadcast_reaches_every_node_the_sender_too(
    nodes: Callable[[str], Node],
) -> None:
    n1, n2 = nodes("n1"), nodes("n2")
    await until(lambda: n1.bus.up and n2.bus.up)
    await n2.bus.broadcast({"t": "change", "area": "settings", "from": "n2"})
    await until(lambda: n1.messages and n2.messages)
    assert n1.messages == n2.messages == [{"t": "change", "area": "settings", "from": "n2"}]


@pytest_twisted.ensureDeferred
async def test_routes_name_each_live_node_with_the_agents_it_holds(
    nodes: Callable[[str], Node],
) -> None:
    n1, n2, n3 = nodes("n1"), nodes("n2"), nodes("n3")
    await until(lambda: n1.bus.up and n2.bus.up and n3.bus.up)
    await n1.bus.refresh_presence(30, (), (), ["a1", "a2"])
    await n2.bus.refresh_presence(30, (), (), ["b1"])
    await n3.bus.refresh_presence(30, (), (), [])
    assert await n3.bus.routes(["a1", "b1", "x"]) == {"n1": ["a1"], "n2": ["b1"], "n3": []}
    # changes only: a2 left n1 for n2
    await n1.bus.refresh_presence(30, (), ["a2"], None)
    await n2.bus.refresh_presence(30, ["a2"], (), None)
    assert await n1.bus.routes(["a2"]) == {"n1": [], "n2": ["a2"], "n3": []}
    # a node that left is routed nothing
    await n3.bus.leave()
    assert await n1.bus.routes(["a1", "a2", "b1"]) == {"n1": ["a1"], "n2": ["a2", "b1"]}


@pytest_twisted.ensureDeferred
async def test_events_reach_listeners(nodes: Callable[[str], Node]) -> None:
    n1, n2 = nodes("n1"), nodes("n2")
    heard: list[dict[str, Any]] = []
    n2.bus.add_event_listener(heard.append)
    await until(lambda: n1.bus.up and n2.bus.up)
    if isinstance(n2.bus, RedisBus):
        # Redis drops what is published before the subscriber holds the channel: wait for
        # Redis to count it (on a loaded machine its thread may take longer than a moment)
        channel = n2.bus.channel("events")
        for _ in range(100):
            counts = await n1.bus.call(lambda c: c.pubsub_numsub(channel))
            if counts and counts[0][1] >= 1:
                break
            await deferLater(reactor, 0.1, lambda: None)
    await n1.bus.publish_events([{"type": "result", "job": "j", "agent": "a"}])
    await until(lambda: heard)
    assert heard == [{"node": "n1", "events": [{"type": "result", "job": "j", "agent": "a"}]}]
    assert n1.messages == n2.messages == []  # events are not node messages


@pytest_twisted.ensureDeferred
async def test_topics_are_shared_between_nodes(nodes: Callable[[str], Node]) -> None:
    n1, n2 = nodes("n1"), nodes("n2")
    await until(lambda: n1.bus.up and n2.bus.up)
    await n1.bus.refresh_presence(30, (), (), [])
    await n2.bus.refresh_presence(30, (), (), [])
    assert await n1.bus.share_topics(30, {"jobs", "job:j1"}) == set()
    assert await n2.bus.share_topics(30, {"agents"}) == {"jobs", "job:j1"}
    assert await n1.bus.share_topics(30, set()) == {"agents"}
    assert await n2.bus.share_topics(30, {"agents"}) == set()  # n1 follows nothing now
