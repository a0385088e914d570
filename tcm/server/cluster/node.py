"""ClusterNode: this server as one node of a cluster.

    heartbeat (every HEARTBEAT s)   its row in `cluster_nodes` (sessions, bus state) and its
                                    presence in Redis: alive for DOWN_AFTER s more, and the
                                    set of agents whose sessions it holds (changes only)
    a job committed here            one message per other live node: {job, its recipients
                                    there}; each node adopts it from PostgreSQL and pushes it
                                    through its own Dispatcher
    an admin change                 one message to every node, which reloads that area from
                                    PostgreSQL and applies it to its own agents
    resync (every RESYNC s, and     every unfinished job read from PostgreSQL again; what
    when the bus comes back)        waits for an agent whose session is here is pushed
    members (every MEMBERS s)       the nodes, their addresses and states read again; when
                                    they changed, `on_members` is told (the relay nodes
                                    linked here learn them: they link to every node)

A node is *up* while its heartbeat is younger than DOWN_AFTER seconds (and it did not stop);
Redis forgets a dead node's presence after the same time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import ICluster, IClusterBus, IEventPublisher
from tcm.server.events import Event

HEARTBEAT = 2.0
DOWN_AFTER = 3 * HEARTBEAT + 1.0
PRESENCE = 0.5  # seconds between checks for sessions opened or closed (written when changed)
RESYNC = 10.0
MEMBERS = 2 * HEARTBEAT
EVENT_BATCH = 0.2  # seconds of events sent as one message


@implementer(ICluster)
class ClusterNode(service.Service):
    """This node's heartbeat, presence, and its share of the cluster's messages."""

    _log = Logger()

    def __init__(
        self,
        name: str,
        address: str,
        bus: IClusterBus,
        cluster_store: Any,
        presence: Any,
        jobs: Any,
        reloads: dict[str, Callable[[list[str] | None], Any]],
        clock: Any,
    ):
        self.name = name
        self.address = address
        self.bus = bus
        self._store = cluster_store
        self._presence = presence
        self._jobs = jobs
        self._reloads = reloads
        self.clock = clock
        self.started_at = clock.seconds()
        self._published: set[str] | None = None  # agents Redis has for this node (None: redo)
        self._events: list[dict[str, Any]] = []
        self._events_call: Any = None
        self._beat = LoopingCall(self.heartbeat)
        self._beat.clock = clock
        self._resync = LoopingCall(self.resync)
        self._resync.clock = clock
        self._presence_check = LoopingCall(self._presence_changed)
        self._presence_check.clock = clock
        self._members_check = LoopingCall(self.members)
        self._members_check.clock = clock
        # the nodes and their states as last read: [{"node", "url", "state"}]
        self.known_members: list[dict[str, str]] | None = None
        # every node as `nodes()` read it last (every MEMBERS s): the cluster-wide figures
        # of /metrics and /status on whichever node is asked
        self.last_nodes: list[dict[str, Any]] = []
        self.on_members: Callable[[list[dict[str, str]]], None] | None = None
        self.counts = {"jobs_sent": 0, "jobs_received": 0, "changes_received": 0}
        # other nodes' events of a type, to the service that waits for them here
        self.event_listeners: dict[str, Callable[[dict[str, Any]], None]] = {}
        # the console's hub here (tcm/server/events.py), and what the other nodes' consoles
        # follow (so that only those events cross: ClusterEvents)
        self.hub: Any = None
        self.remote_topics: set[str] = set()
        self._handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "job": self._on_job,
            "change": self._on_change,
        }

    # -- lifecycle -----------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        # other nodes' results and output wake `jobs follow` here (batched: at most five
        # messages a second from each node)
        self.bus.add_event_listener(self._events_heard)
        self.bus.start(self._received, self._bus_state)
        self._beat.start(HEARTBEAT, now=True)
        self._resync.start(RESYNC, now=False)
        self._presence_check.start(PRESENCE, now=False)
        self._members_check.start(MEMBERS, now=True)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for loop in (self._beat, self._resync, self._presence_check, self._members_check):
            if loop.running:
                loop.stop()
        left = self.bus.leave() if self.bus.up else succeed(None)
        left.addErrback(lambda f: None)
        stored = self._store.heartbeat(self.name, self._row(stopped=True))
        stored.addErrback(lambda f: self._log.failure("could not record this node's stop", f))

        def stop(_: Any) -> None:
            self.bus.stop()

        from twisted.internet.defer import DeferredList

        return DeferredList([left, stored]).addCallback(stop)

    # -- heartbeat and presence ------------------------------------------------------------
    def local_agents(self) -> set[str]:
        """Agents whose session (own or task) or waiting poll is here."""
        p = self._presence
        ids = {s.agent_id for s in p.registry.all()}
        ids.update(s.agent_id for s in p.task_registry.all())
        ids.update(p.polls.agent_ids())
        return ids

    def _row(self, stopped: bool = False) -> dict[str, Any]:
        p = self._presence
        return {
            "address": self.address,
            "started_at": self.started_at,
            "heartbeat_at": self.clock.seconds(),
            "core": len(p.registry),
            "task": len(p.task_registry),
            "polls": len(p.polls),
            "bus": "up" if self.bus.up else "down",
            "stopped": stopped,
        }

    def heartbeat(self) -> Deferred[Any]:
        """Write this node's row, and refresh its presence in Redis (when the bus is up)."""
        stored = self._store.heartbeat(self.name, self._row())
        stored.addErrback(lambda f: self._log.warn("heartbeat not stored: {e}", e=f.value))
        if not self.bus.up:
            return stored
        if self.hub is not None:
            shared = self.bus.share_topics(DOWN_AFTER, self.hub.topics())
            shared.addCallback(self._remote_topics)
            shared.addErrback(lambda f: None)
        return self._write_presence(self.local_agents())

    def _remote_topics(self, topics: set[str]) -> None:
        self.remote_topics = set(topics)

    def _presence_changed(self) -> Any:
        """Between heartbeats: write presence as soon as sessions opened or closed here (so
        routes and `where` are at most PRESENCE seconds behind)."""
        if not self.bus.up or self._published is None:
            return None
        now = self.local_agents()
        if now == self._published:
            return None
        return self._write_presence(now)

    def _write_presence(self, now: set[str]) -> Deferred[Any]:
        if self._published is None:
            d = self.bus.refresh_presence(DOWN_AFTER, (), (), sorted(now))
        else:
            d = self.bus.refresh_presence(
                DOWN_AFTER, now - self._published, self._published - now, None
            )

        def failed(f: Any) -> None:
            self._published = None  # written whole next time
            self._log.warn("presence not refreshed: {e}", e=f.value)

        self._published = now
        return d.addErrback(failed)

    def _bus_state(self, up: bool) -> None:
        if up:
            self._log.info("bus up: presence written whole, unfinished jobs read again")
            self._published = None
            self.heartbeat()
            self.resync()
            # changes other nodes made while the bus was away
            for area, reload in self._reloads.items():
                if area != "cancel":  # (a cancel's message is not replayed)
                    maybeDeferred(reload, None).addErrback(self._reload_failed, area)
        else:
            self._log.warn(
                "bus down ({why}): serving this node's sessions", why=self.bus.down_reason
            )

    def _reload_failed(self, f: Any, area: str) -> None:
        self._log.failure("reloading {area}", f, area=area)

    def resync(self) -> Deferred[Any]:
        d = self._jobs.resync()

        def done(sent: int) -> None:
            if sent:
                self._log.info("resync: {n} pending targets sent from the store", n=sent)

        d.addCallback(done)
        d.addErrback(lambda f: self._log.warn("resync failed: {e}", e=f.value))
        return d

    # -- jobs --------------------------------------------------------------------------------
    def job_created(self, job_id: str, agent_ids: list[str]) -> None:
        """One message to each other live node with the recipients whose sessions it holds
        (every node gets one: an agent may come to it before the job ends)."""
        if not self.bus.up:
            return  # the other nodes' resync reads it from the store

        def send(routes: dict[str, list[str]]) -> None:
            for node, recipients in routes.items():
                if node == self.name:
                    continue
                self.counts["jobs_sent"] += 1
                self.bus.send(node, {"t": "job", "job": job_id, "to": recipients}).addErrback(
                    lambda f: self._log.warn("job message not sent: {e}", e=f.value)
                )

        d = self.bus.routes(agent_ids)
        d.addCallback(send)
        d.addErrback(lambda f: self._log.warn("routing job {job}: {e}", job=job_id, e=f.value))
        self.event({"type": "job.created", "job": job_id, "targets": len(agent_ids)})

    def _on_job(self, message: dict[str, Any]) -> Deferred[Any]:
        job_id, recipients = str(message.get("job", "")), message.get("to") or []
        self.counts["jobs_received"] += 1
        d = self._jobs.adopt(job_id, [str(a) for a in recipients])
        d.addErrback(lambda f: self._log.failure("adopting job {job}", f, job=job_id))
        return d

    # -- changes -------------------------------------------------------------------------
    def changed(self, area: str, ids: list[str] | None = None) -> None:
        """Tell every other node to apply an admin change made here."""
        if area not in self._reloads:
            return
        self.event({"type": "change", "area": area, "ids": ids})
        if not self.bus.up:
            return  # applied by the others when their bus returns (they reload every area)
        message = {"t": "change", "area": area, "ids": ids, "from": self.name}
        self.bus.broadcast(message).addErrback(
            lambda f: self._log.warn("change not sent: {e}", e=f.value)
        )

    def _on_change(self, message: dict[str, Any]) -> Any:
        if message.get("from") == self.name:
            return None  # applied here already
        area, ids = message.get("area"), message.get("ids")
        reload = self._reloads.get(str(area))
        if reload is None:
            return None
        self.counts["changes_received"] += 1
        d = maybeDeferred(reload, [str(i) for i in ids] if isinstance(ids, list) else None)
        d.addErrback(lambda f: self._log.failure("applying a change of {area}", f, area=area))
        return d

    def _received(self, message: dict[str, Any]) -> None:
        handler = self._handlers.get(str(message.get("t")))
        if handler is None:
            self._log.warn("unknown bus message {t!r}", t=message.get("t"))
            return
        handler(message)

    # -- events ----------------------------------------------------------------------------
    def event(self, event: dict[str, Any]) -> None:
        """Queue an event for the events channel (sent in batches)."""
        if not self.bus.up:
            return
        self._events.append(event)
        if self._events_call is None:
            self._events_call = self.clock.callLater(EVENT_BATCH, self._send_events)

    def _send_events(self) -> None:
        events, self._events, self._events_call = self._events, [], None
        if events and self.bus.up:
            self.bus.publish_events(events).addErrback(lambda f: None)

    def _events_heard(self, batch: dict[str, Any]) -> None:
        if batch.get("node") == self.name:
            return
        for event in batch.get("events") or ():
            if not isinstance(event, dict):
                continue
            if event.get("type") in ("result", "output"):
                self._jobs.wake(str(event.get("job")))
            if event.get("type") == "hub" and self.hub is not None:
                self.hub.publish(
                    Event(
                        str(event.get("topic")),
                        str(event.get("kind")),
                        event.get("key"),
                        dict(event.get("data") or {}),
                    )
                )
            listener = self.event_listeners.get(str(event.get("type")))
            if listener is not None:
                listener(event)

    # -- members -------------------------------------------------------------------------
    def members(self) -> Deferred[Any]:
        """Read the nodes again; tell `on_members` when their addresses or states changed."""
        d = self.nodes()

        def read(rows: list[dict[str, Any]]) -> None:
            self.last_nodes = rows
            members = [
                {"node": str(r["node"]), "url": str(r["address"]), "state": str(r["state"])}
                for r in sorted(rows, key=lambda r: str(r["node"]))
                if str(r["address"]).startswith("https://")
            ]
            if members != self.known_members:
                self.known_members = members
                if self.on_members is not None:
                    self.on_members(members)

        d.addCallback(read)
        d.addErrback(lambda f: self._log.warn("cluster members not read: {e}", e=f.value))
        return d

    # -- reading ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "node": self.name,
            "bus": "up" if self.bus.up else "down",
            "bus_reason": None if self.bus.up else self.bus.down_reason,
        }

    def where(self, agent_ids: list[str]) -> Deferred[dict[str, str]]:
        """{agent: node} of the agents whose sessions other live nodes hold (from their
        presence; {} while the bus is down)."""
        if not self.bus.up or not agent_ids:
            return succeed({})

        def held(routes: dict[str, list[str]]) -> dict[str, str]:
            return {a: n for n, ids in routes.items() if n != self.name for a in ids}

        d = self.bus.routes(agent_ids).addCallback(held)
        d.addErrback(lambda f: {})
        return d

    @inlineCallbacks
    def nodes(self):
        """Every node: name, address, sessions (core, task, waiting polls), state (up,
        down), last heartbeat, and its bus state as it last wrote it."""
        rows = yield self._store.list_nodes()
        now = self.clock.seconds()
        out = []
        for r in rows:
            up = not r["stopped"] and now - r["heartbeat_at"] < DOWN_AFTER
            out.append(
                {
                    "node": r["name"],
                    "address": r["address"],
                    "sessions": {"core": r["core"], "task": r["task"], "polls": r["polls"]},
                    "state": "up" if up else "down",
                    "last_heartbeat": r["heartbeat_at"],
                    "started_at": r["started_at"],
                    "bus": r["bus"],
                    "this": r["name"] == self.name,
                }
            )
        return out


@implementer(IEventPublisher)
class ClusterEvents:
    """What the parts of a node publish to in a cluster: the node's own hub, and, for the
    topics other nodes' consoles follow, the events channel (batched), so a console on any
    node sees every node's changes."""

    def __init__(self, hub: Any, node: ClusterNode):
        self._hub = hub
        self._node = node

    def publish(self, event: Event) -> None:
        self._hub.publish(event)
        if event.topic in self._node.remote_topics:
            self._node.event(
                {
                    "type": "hub",
                    "topic": event.topic,
                    "kind": event.kind,
                    "key": event.key,
                    "data": event.data,
                }
            )
