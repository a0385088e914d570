"""An in-memory cluster bus (IClusterBus) for unit tests of the cluster's nodes, verified
against the real RedisBus by the same contract tests (tests/test_cluster_bus.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from tcm.interfaces import IClusterBus


class FakeRedis:
    """What the nodes' FakeBuses share: presence, and who listens on which channel."""

    def __init__(self) -> None:
        self.alive: set[str] = set()
        self.agents: dict[str, set[str]] = {}
        self.buses: dict[str, FakeBus] = {}
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.topics: dict[str, set[str]] = {}
        self.running = True

    def stop(self) -> None:
        """Redis goes away: every bus is down."""
        self.running = False
        for bus in list(self.buses.values()):
            bus._set(False, "ConnectionError: fake Redis stopped")

    def start(self) -> None:
        self.running = True
        for bus in list(self.buses.values()):
            bus._set(True, "")

    def publish(self, node: str | None, message: dict[str, Any]) -> int:
        targets = list(self.buses.values()) if node is None else [self.buses[node]]
        if node is not None and node not in self.buses:
            return 0
        for bus in targets:
            if bus.up:
                bus._on_message(message)
        return len(targets)


@implementer(IClusterBus)
class FakeBus:
    """One node's bus on a FakeRedis: messages delivered at once, presence without expiry
    (a node leaves with `leave()`)."""

    def __init__(self, redis: FakeRedis, node: str):
        self.redis = redis
        self.node = node
        self.up = False
        self.down_reason = "not connected yet"
        self._on_message: Callable[[dict[str, Any]], None] = lambda m: None
        self._on_state: Callable[[bool], None] = lambda up: None

    def _set(self, up: bool, reason: str) -> None:
        if up != self.up:
            self.up, self.down_reason = up, reason
            self._on_state(up)

    def _check(self) -> Deferred[Any] | None:
        if not self.redis.running:
            return fail(ConnectionError("fake Redis stopped"))
        return None

    def start(self, on_message: Any, on_state: Any) -> None:
        self._on_message, self._on_state = on_message, on_state
        self.redis.buses[self.node] = self
        self._set(self.redis.running, "")

    def stop(self) -> None:
        self.redis.buses.pop(self.node, None)
        self.up = False

    def send(self, node: str, message: dict[str, Any]) -> Deferred[Any]:
        return self._check() or succeed(self.redis.publish(node, message))

    def broadcast(self, message: dict[str, Any]) -> Deferred[Any]:
        return self._check() or succeed(self.redis.publish(None, message))

    def publish_events(self, events: list[dict[str, Any]]) -> Deferred[Any]:
        failed = self._check()
        if failed:
            return failed
        for listener in self.redis.listeners:
            listener({"node": self.node, "events": events})
        return succeed(None)

    def add_event_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self.redis.listeners.append(listener)

    def refresh_presence(
        self, ttl: float, added: Iterable[str], removed: Iterable[str], full: list[str] | None
    ) -> Deferred[Any]:
        failed = self._check()
        if failed:
            return failed
        self.redis.alive.add(self.node)
        held = self.redis.agents.setdefault(self.node, set())
        if full is not None:
            held.clear()
            held.update(full)
        else:
            held.difference_update(removed)
            held.update(added)
        return succeed(None)

    def leave(self) -> Deferred[Any]:
        self.redis.alive.discard(self.node)
        self.redis.agents.pop(self.node, None)
        self.redis.topics.pop(self.node, None)
        return succeed(None)

    def share_topics(self, ttl: float, topics: Iterable[str]) -> Deferred[set[str]]:
        failed = self._check()
        if failed:
            return failed
        self.redis.topics[self.node] = set(topics)
        return succeed({t for n, ts in self.redis.topics.items() if n != self.node for t in ts})

    def routes(self, agent_ids: Iterable[str]) -> Deferred[dict[str, list[str]]]:
        failed = self._check()
        if failed:
            return failed
        wanted = set(agent_ids)
        return succeed(
            {n: sorted(wanted & self.redis.agents.get(n, set())) for n in sorted(self.redis.alive)}
        )
