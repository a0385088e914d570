"""Live events for the web console: one publish interface, batched deltas per subscriber.

Where the server's state changes (sessions opened and closed, an agent's mode, a job
target's state, output stored, a policy report), the owner calls `publish(Event(...))` on the
`IEventPublisher` it was handed. The `EventHub` is that publisher on one node: it hands each
event to the subscriptions of its topic, and each `Subscription` keeps what it has not sent
yet and sends it as one batch at most every `interval` seconds.

```
JobService / AgentHub / AgentPresence / PolicyService
      │ publish(Event)                (IEventPublisher: the one interface publishers know)
      ▼
  EventHub ──topic──▶ Subscription ──batch (≤ 1 / interval)──▶ sink (the SSE response)
```

A cluster puts a bus in front of the hub without changing a publisher: the composition root
hands publishers a bus that also provides `IEventPublisher`, sends each event to every node,
and each node's bus calls its own hub's `publish`.

Per subscription:

- **Coalescing.** An event with a `key` is merged into the unsent event of the same kind and
  key, its fields replacing theirs (an agent's mode, a target's state: only the latest
  matters, and fields only an earlier event carried are kept); an event without a key (an
  output chunk) is appended.
- **Bounded.** Over `max_pending` unsent events or `max_bytes` of unsent output text, what is
  pending is dropped and the next batch says `resync`: the client reloads its snapshot from
  the REST API. Events published until that batch goes are dropped too (the snapshot the
  client loads after it is newer).
- **Slow clients.** The sink's transport pauses the subscription (a streaming producer) when
  its buffer is full; nothing is written while paused, events keep coalescing (and overflow
  into a resync), and a subscription paused longer than `max_stall` seconds is dropped: its
  sink is closed with the reason and the browser reconnects.

Pure apart from the injected clock: tested with `twisted.internet.task.Clock`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import IEventHub, IEventPublisher

INTERVAL = 0.25  # seconds between two batches of one subscription: at most 4 a second
MAX_PENDING = 20_000  # unsent events of one subscription (10,000 agents' states fit twice)
MAX_BYTES = 1024 * 1024  # unsent output text of one subscription
MAX_STALL = 30.0  # seconds a subscription may stay paused before it is dropped
MAX_CHUNK = 16 * 1024  # output text carried by one event (the rest: GET .../output)
MAX_TOPICS = 16  # topics of one subscription


@attrs.frozen
class Event:
    """One change: `topic` says who wants it ("agents", "jobs", "job:ID", "policies"),
    `kind` what it is, `key` what it replaces (None: appended), `data` its fields."""

    topic: str
    kind: str
    key: str | None
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, **self.data}
        if self.key is not None:
            out["key"] = self.key
        return out


@implementer(IEventPublisher)
class NoEvents:
    """The publisher of a part nobody listens to (tests, tools): drops every event."""

    def publish(self, event: Event) -> None:
        pass


NO_EVENTS = NoEvents()


class Subscription:
    """One client's topics and the events it has not been sent yet.

    `sink(batch)` writes a batch (a dict: `seq`, `resync`, `events`); `close(reason)` ends
    the client's stream. The subscription is the streaming producer of the sink's transport:
    `pauseProducing`/`resumeProducing` say whether the client keeps up."""

    _log = Logger()

    def __init__(
        self,
        hub: EventHub,
        topics: frozenset[str],
        sink: Callable[[dict[str, Any]], None],
        close: Callable[[str], None],
        clock: Any,
        interval: float,
        max_pending: int,
        max_bytes: int,
        max_stall: float,
    ):
        self.hub = hub
        self.topics = topics
        self._sink = sink
        self._close = close
        self._clock = clock
        self.interval = interval
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.max_stall = max_stall
        self._pending: dict[tuple[str, str], dict[str, Any]] = {}  # keyed: latest only
        self._appended: list[dict[str, Any]] = []
        self._appended_bytes = 0
        self.resync = False
        self.paused = False
        self.closed = False
        self.seq = 0
        self.dropped = 0  # events dropped by overflows (for tests and the log)
        self._last_flush: float | None = None
        self._timer: Any = None
        self._stall_timer: Any = None

    # -- what the hub calls -----------------------------------------------------------------
    def add(self, event: Event) -> None:
        if self.closed:
            return
        if self.resync:
            self.dropped += 1
            return
        item = event.to_dict()
        if event.key is None:
            self._appended.append(item)
            self._appended_bytes += len(item.get("text", "") or "")
        else:
            # merged into the unsent one (each publisher tells only what it knows: a session
            # closed and a revocation of one agent make one event with both), moved last
            earlier = self._pending.pop((event.kind, event.key), None)
            self._pending[(event.kind, event.key)] = (
                item if earlier is None else {**earlier, **item}
            )
        if (
            len(self._pending) + len(self._appended) > self.max_pending
            or self._appended_bytes > self.max_bytes
        ):
            self.dropped += len(self._pending) + len(self._appended)
            self._clear()
            self.resync = True
        self._schedule()

    @property
    def pending(self) -> int:
        """Unsent events."""
        return len(self._pending) + len(self._appended)

    # -- batching ----------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._timer is not None or self.paused or self.closed:
            return
        now = self._clock.seconds()
        delay = 0.0 if self._last_flush is None else self._last_flush + self.interval - now
        self._timer = self._clock.callLater(max(0.0, delay), self.flush)

    def flush(self) -> None:
        """Send what is pending as one batch (nothing while paused or with nothing to say)."""
        self._timer = None
        if self.closed or self.paused:
            return
        if not (self._pending or self._appended or self.resync):
            return
        events = list(self._pending.values()) + self._appended
        batch = {"seq": self.seq, "resync": self.resync, "events": [] if self.resync else events}
        self.seq += 1
        self._clear()
        self.resync = False
        self._last_flush = self._clock.seconds()
        self._sink(batch)

    def _clear(self) -> None:
        self._pending = {}
        self._appended = []
        self._appended_bytes = 0

    # -- flow control (IPushProducer) ----------------------------------------------------
    def pauseProducing(self) -> None:
        if self.paused or self.closed:
            return
        self.paused = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._stall_timer = self._clock.callLater(self.max_stall, self._stalled)

    def resumeProducing(self) -> None:
        if not self.paused or self.closed:
            return
        self.paused = False
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None
        self._schedule()

    def stopProducing(self) -> None:
        self.cancel()

    def _stalled(self) -> None:
        self._stall_timer = None
        if self.closed:
            return
        self._log.info(
            "console event client dropped: paused for {s} s ({n} events pending)",
            s=self.max_stall,
            n=self.pending,
        )
        self.cancel()
        self._close(f"too slow: the stream was paused for {self.max_stall:g} s")

    def cancel(self) -> None:
        """Unsubscribe: nothing more is sent."""
        if self.closed:
            return
        self.closed = True
        for timer in (self._timer, self._stall_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._stall_timer = None
        self._clear()
        self.hub.unsubscribe(self)


@implementer(IEventHub)
class EventHub:
    """The subscriptions of this node by topic; `publish` hands an event to each of them."""

    def __init__(
        self,
        clock: Any,
        interval: float = INTERVAL,
        max_pending: int = MAX_PENDING,
        max_bytes: int = MAX_BYTES,
        max_stall: float = MAX_STALL,
    ):
        self.clock = clock
        self.interval = interval
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.max_stall = max_stall
        self._by_topic: dict[str, set[Subscription]] = {}
        self.published = 0

    def publish(self, event: Event) -> None:
        self.published += 1
        subscribers = self._by_topic.get(event.topic)
        if not subscribers:
            return
        for subscription in tuple(subscribers):
            subscription.add(event)

    def publish_many(self, events: Iterable[Event]) -> None:
        for event in events:
            self.publish(event)

    def subscribe(
        self,
        topics: Iterable[str],
        sink: Callable[[dict[str, Any]], None],
        close: Callable[[str], None],
    ) -> Subscription:
        subscription = Subscription(
            self,
            frozenset(topics),
            sink,
            close,
            self.clock,
            self.interval,
            self.max_pending,
            self.max_bytes,
            self.max_stall,
        )
        for topic in subscription.topics:
            self._by_topic.setdefault(topic, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        for topic in subscription.topics:
            subscribers = self._by_topic.get(topic)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._by_topic[topic]

    def topics(self) -> list[str]:
        """The topics someone follows here now (a cluster tells the other nodes)."""
        return list(self._by_topic)

    def subscribers(self, topic: str | None = None) -> int:
        """How many subscriptions there are (of `topic`)."""
        if topic is not None:
            return len(self._by_topic.get(topic, ()))
        return len({s for subs in self._by_topic.values() for s in subs})


# -- the events publishers make --------------------------------------------------------------


def agent_event(agent_id: str, **fields: Any) -> Event:
    """An agent's presence changed (mode, via, task server, last seen; new, state)."""
    return Event("agents", "agent", agent_id, {"id": agent_id, **fields})


def node_event(name: str, **fields: Any) -> Event:
    """A task server's or gateway's link came up or went down."""
    return Event("agents", "node", name, {"name": name, **fields})


def target_event(job_id: str, agent_id: str, state: str, at: float, **fields: Any) -> Event:
    """A job target's state changed."""
    return Event(
        f"job:{job_id}",
        "target",
        f"{job_id}/{agent_id}",
        {"job": job_id, "agent": agent_id, "state": state, "at": at, **fields},
    )


def finished_event(
    job_id: str, agent_id: str, state: str, at: float, result: Any, error: str | None
) -> Event:
    """A job target's outcome was stored: its state, error (cut) and exit code if any."""
    fields: dict[str, Any] = {"error": error[:1024] if isinstance(error, str) else None}
    if isinstance(result, dict) and isinstance(result.get("exit_code"), int):
        fields["exit_code"] = result["exit_code"]
    return target_event(job_id, agent_id, state, at, final=True, **fields)


def job_event(job_id: str, **fields: Any) -> Event:
    """A job was created or changed (for lists of jobs)."""
    return Event("jobs", "job", job_id, {"id": job_id, **fields})


def output_event(job_id: str, agent_id: str, seq: int, stream: str, text: str) -> Event:
    """An output chunk was stored; at most MAX_CHUNK characters of it are carried."""
    data: dict[str, Any] = {
        "job": job_id,
        "agent": agent_id,
        "seq": seq,
        "stream": stream,
        "text": text[:MAX_CHUNK],
    }
    if len(text) > MAX_CHUNK:
        data["truncated"] = True
    return Event(f"job:{job_id}", "output", None, data)


def policy_event(agent_id: str, policy: str, **fields: Any) -> Event:
    """An agent reported on a policy."""
    return Event(
        "policies",
        "policy",
        f"{policy}/{agent_id}",
        {"agent": agent_id, "policy": policy, **fields},
    )


def sse_frame(batch: dict[str, Any]) -> bytes:
    """A batch as one server-sent event (`event: batch`, its JSON on one data line)."""
    payload = json.dumps(batch, separators=(",", ":"), default=str)
    return b"event: batch\ndata: " + payload.encode("utf-8") + b"\n\n"


def parse_topics(raw: str | None) -> frozenset[str]:
    """The topics a client asks for: comma-separated names (default agents,jobs).
    ValueError naming what is wrong."""
    if raw is None or raw == "":
        return frozenset({"agents", "jobs"})
    topics = [t.strip() for t in raw.split(",") if t.strip()]
    if len(topics) > MAX_TOPICS:
        raise ValueError(f"at most {MAX_TOPICS} topics")
    for topic in topics:
        if topic in ("agents", "jobs", "policies"):
            continue
        kind, _, job = topic.partition(":")
        if kind == "job" and 0 < len(job) <= 64 and job.isalnum():
            continue
        raise ValueError(f"unknown topic {topic!r}: agents, jobs, policies or job:JOB_ID")
    return frozenset(topics)
