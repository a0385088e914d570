"""The cluster's bus and presence store: Redis, through redis-py.

Why redis-py and threads: it is the Redis project's own, well-kept client; the Twisted ones
(txredisapi) have a far smaller user base, and the asyncio client would need the asyncio
reactor, which tcm does not use. Commands run on a small thread pool of their own
(`deferToThreadPool`, as the store does with SQLAlchemy), so the reactor never blocks on
Redis; subscriptions run on one thread that hands each message to the reactor
(`callFromThread`). When Redis goes away, commands fail (their callers log and go on: the
bus is a hint, PostgreSQL the truth) and the subscriber retries every second; `up` says
which it is, and `on_state` is told of each change.

Keys and channels all start with a prefix made of the cluster id (tcm/server/cluster/
secrets.py): two clusters, or two test runs, on one Redis never see each other's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from tcm.interfaces import IClusterBus

#: Seconds between the subscriber's attempts while Redis is away.
RETRY = 1.0


@implementer(IClusterBus)
class RedisBus:
    """Channels `PREFIX:ch:NODE` (messages for one node), `PREFIX:ch:all` (for every node)
    and `PREFIX:ch:events` (results and changes, for whoever listens); presence keys
    `PREFIX:alive:NODE` (expiring) and `PREFIX:agents:NODE` (a set, expiring alike)."""

    _log = Logger()

    def __init__(self, url: str, prefix: str, node: str, reactor: Any, threads: int = 2):
        import redis

        self._redis = redis
        self._client = redis.Redis.from_url(
            url, socket_timeout=3.0, socket_connect_timeout=2.0, decode_responses=True
        )
        self.prefix = prefix
        self.node = node
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="tcm-bus")
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._want_events = False
        self._event_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.up = False
        self.down_reason = "not connected yet"
        self._on_message: Callable[[dict[str, Any]], None] = lambda m: None
        self._on_state: Callable[[bool], None] = lambda up: None

    # -- names ---------------------------------------------------------------------------
    def channel(self, name: str) -> str:
        return f"{self.prefix}:ch:{name}"

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- lifecycle -----------------------------------------------------------------------
    def start(
        self, on_message: Callable[[dict[str, Any]], None], on_state: Callable[[bool], None]
    ) -> None:
        """Start the command threads and the subscriber (this node's channel and `all`)."""
        self._on_message, self._on_state = on_message, on_state
        self._pool.start()
        self._thread = threading.Thread(target=self._listen, name="tcm-bus-sub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._pool.stop()
        if self._thread is not None:
            self._thread.join(timeout=3.0)
        self._client.close()

    def add_event_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Also receive every node's events (the `events` channel): results stored, jobs
        created, changes. Nodes subscribe only when something listens (the console's hub),
        so no node is woken for events it does not use."""
        self._event_listeners.append(listener)
        self._want_events = True

    # -- commands ------------------------------------------------------------------------
    def call(self, fn: Callable[[Any], Any]) -> Deferred[Any]:
        """Run fn(client) on the bus's threads (a pipeline, a command): its result."""
        return deferToThreadPool(self._reactor, self._pool, fn, self._client)

    def send(self, node: str, message: dict[str, Any]) -> Deferred[Any]:
        """One message to one node."""
        payload = json.dumps(message, separators=(",", ":"))
        return self.call(lambda c: c.publish(self.channel(node), payload))

    def broadcast(self, message: dict[str, Any]) -> Deferred[Any]:
        """One message to every node (this one too)."""
        payload = json.dumps(message, separators=(",", ":"))
        return self.call(lambda c: c.publish(self.channel("all"), payload))

    def publish_events(self, events: list[dict[str, Any]]) -> Deferred[Any]:
        """A batch of events for the `events` channel (one message)."""
        payload = json.dumps({"node": self.node, "events": events}, separators=(",", ":"))
        return self.call(lambda c: c.publish(self.channel("events"), payload))

    def refresh_presence(
        self, ttl: float, added: Iterable[str], removed: Iterable[str], full: list[str] | None
    ) -> Deferred[Any]:
        """This node is alive for `ttl` seconds more, and holds these agents' sessions:
        `full` rewrites the set (after the bus came back), else `added`/`removed` change it."""
        alive, agents = self.key("alive", self.node), self.key("agents", self.node)
        seconds = max(1, int(ttl + 0.999))
        added, removed = list(added), list(removed)

        def write(c: Any) -> None:
            p = c.pipeline(transaction=True)
            p.set(alive, f"{time.time():.3f}", ex=seconds)
            p.sadd(self.key("nodes"), self.node)
            if full is not None:
                p.delete(agents)
                for i in range(0, len(full), 5000):
                    p.sadd(agents, *full[i : i + 5000])
            else:
                for i in range(0, len(removed), 5000):
                    p.srem(agents, *removed[i : i + 5000])
                for i in range(0, len(added), 5000):
                    p.sadd(agents, *added[i : i + 5000])
            p.expire(agents, seconds)
            p.execute()

        return self.call(write)

    def leave(self) -> Deferred[Any]:
        """This node stops: its presence goes now, not at its expiry."""
        return self.call(
            lambda c: c.delete(
                self.key("alive", self.node),
                self.key("agents", self.node),
                self.key("topics", self.node),
            )
        )

    def routes(self, agent_ids: Iterable[str]) -> Deferred[dict[str, list[str]]]:
        """Every live node (its presence key not expired) with the given agents it holds:
        {node: [agent ids]} (a node holding none of them is listed with [])."""
        wanted = set(agent_ids)

        def read(c: Any) -> dict[str, list[str]]:
            nodes = sorted(c.smembers(self.key("nodes")))
            p = c.pipeline(transaction=False)
            for n in nodes:
                p.exists(self.key("alive", n))
            alive = [n for n, here in zip(nodes, p.execute(), strict=True) if here]
            p = c.pipeline(transaction=False)
            for n in alive:
                p.smembers(self.key("agents", n))
            held = p.execute()
            return {n: sorted(wanted & set(ids)) for n, ids in zip(alive, held, strict=True)}

        return self.call(read)

    def share_topics(self, ttl: float, topics: Iterable[str]) -> Deferred[set[str]]:
        """Write the topics this node's console subscribers follow (expiring like its
        presence); the union of the other live nodes' topics."""
        mine = json.dumps(sorted(topics))
        seconds = max(1, int(ttl + 0.999))

        def exchange(c: Any) -> set[str]:
            c.set(self.key("topics", self.node), mine, ex=seconds)
            nodes = sorted(n for n in c.smembers(self.key("nodes")) if n != self.node)
            if not nodes:
                return set()
            values = c.mget([self.key("topics", n) for n in nodes])
            return {t for v in values if v for t in json.loads(v)}

        return self.call(exchange)

    # -- the subscriber thread -------------------------------------------------------------
    def _listen(self) -> None:
        redis = self._redis
        while not self._stopping.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel(self.node), self.channel("all"))
                events = False
                self._state(True, "")
                while not self._stopping.is_set():
                    if self._want_events and not events:
                        pubsub.subscribe(self.channel("events"))
                        events = True
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._reactor.callFromThread(self._received, message)
            except (redis.RedisError, OSError) as e:
                self._state(False, f"{type(e).__name__}: {e}")
                self._stopping.wait(RETRY)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except (redis.RedisError, OSError):
                        pass

    def _state(self, up: bool, reason: str) -> None:
        if up == self.up:
            return
        self.up, self.down_reason = up, reason
        self._reactor.callFromThread(self._on_state, up)

    def _received(self, message: dict[str, Any]) -> None:
        try:
            body = json.loads(message["data"])
        except (TypeError, ValueError):
            self._log.warn("a bus message that is not JSON: {m!r}", m=str(message)[:200])
            return
        if message.get("channel") == self.channel("events"):
            for listener in self._event_listeners:
                listener(body)
            return
        if isinstance(body, dict):
            self._on_message(body)
