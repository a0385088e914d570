"""Two cluster nodes in one process: each its own JobService, Dispatcher, presence and
ClusterNode, on one shared store (SQLite here; the processes of tests/test_cluster.py run
PostgreSQL) and one bus (the FakeBus, checked against Redis by tests/test_cluster_bus.py).

What holds across nodes: a job created on one is delivered by the other to the sessions it
holds (one message per node), accept is decided in SQL, a result is stored once whichever
node it reaches (also one for a job the node never heard of), a job created while the bus
was down still reaches every node's agents (resync), and changes reach every node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet import reactor

from tcm.protocol.envelope import decode
from tcm.server.agents import AgentPresence
from tcm.server.cluster.node import DOWN_AFTER, ClusterNode
from tcm.server.config import ServerConfig
from tcm.server.dispatcher import DirectRoute, Dispatcher
from tcm.server.jobs import Accept, Job, JobBook, TargetState
from tcm.server.jobservice import JobService
from tcm.server.sessions import AgentSession
from tcm.server.settings import RuntimeSettings
from tcm.store import Database
from tcm.store import schema as t
from tests.clusterfakes import FakeBus, FakeRedis
from tests.test_sessions import FakeHub, FakeTransport

AGENTS = ["a-1", "a-2", "b-1"]


class NodeUnderTest:
    """One node's services on the shared store."""

    def __init__(self, name: str, db: Database, redis: FakeRedis):
        self.name = name
        config = ServerConfig(state_dir="/nonexistent")
        self.settings = RuntimeSettings(config, db.settings)
        self.presence = AgentPresence(reactor, self.settings, db.agents, 50.0, 20.0)
        self.dispatcher = Dispatcher(
            self.presence.registry, self.presence.polls, self.presence.task_registry
        )
        self.jobs = JobService(
            db.jobs,
            self.dispatcher,
            reactor,
            capabilities_of=lambda a: None,
            known_agents=lambda: AGENTS,
            inventory_store=db.inventory,
            shared=True,
        )
        self.bus = FakeBus(redis, name)
        self.node = ClusterNode(
            name,
            f"https://{name}",
            self.bus,
            db.cluster,
            self.presence,
            self.jobs,
            {
                "settings": self.settings.reload,
                "cancel": lambda ids: self.jobs.cancel_here(ids[0], ids[1:]) if ids else None,
            },
            reactor,
        )
        self.jobs.on_created = self.node.job_created
        self.jobs.on_stored = self.node.event
        self.jobs.on_canceled = lambda j, agents: self.node.changed("cancel", [j, *agents])
        self.transports: dict[str, FakeTransport] = {}

    def connect(self, agent_id: str) -> FakeTransport:
        """A live session of `agent_id` here."""
        transport = FakeTransport()
        session = AgentSession(agent_id, transport, FakeHub(), 0.0, DirectRoute(lambda f: f))
        self.presence.registry.add(session)
        self.transports[agent_id] = transport
        return transport

    def jobs_sent(self, agent_id: str) -> list[str]:
        return [
            e.data["job"]
            for e in (decode(f) for f in self.transports[agent_id].frames)
            if e.type == "action.request"
        ]


@pytest.fixture
def two_nodes(tmp_path: Any) -> Iterator[tuple[NodeUnderTest, NodeUnderTest, Database]]:
    db = Database(f"sqlite:///{tmp_path / 'tcm.sqlite'}", reactor=reactor)
    db.open()
    redis = FakeRedis()
    a, b = NodeUnderTest("n1", db, redis), NodeUnderTest("n2", db, redis)
    try:
        yield a, b, db
    finally:
        for n in (a, b):
            n.node._beat.stop() if n.node._beat.running else None
            n.node._resync.stop() if n.node._resync.running else None
            n.bus.stop()
        db.close()


def _start(*nodes: NodeUnderTest) -> None:
    for n in nodes:
        n.node.bus.add_event_listener(n.node._events_heard)
        n.node.bus.start(n.node._received, n.node._bus_state)


def _states(db: Database, job_id: str) -> dict[str, tuple[str, Any]]:
    jt = t.job_targets
    with db.engine.connect() as c:
        rows = c.execute(sa.select(jt).where(jt.c.job_id == job_id)).all()
    return {r.agent_id: (r.state, r.result) for r in rows}


async def _settle() -> None:
    """Let the store's threads and the write queue finish what was started."""
    from twisted.internet.task import deferLater

    for _ in range(5):
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_job_from_one_node_reaches_the_sessions_of_the_other(two_nodes) -> None:
    a, b, db = two_nodes
    a.connect("a-1")
    b.connect("b-1")
    _start(a, b)
    await a.node.heartbeat()
    await b.node.heartbeat()
    job_id = await a.jobs.create("ping", {}, ["a-1", "b-1", "a-2"], 60, None)
    await _settle()
    assert a.jobs_sent("a-1") == [job_id]
    assert b.jobs_sent("b-1") == [job_id]  # through n2's own dispatcher
    assert a.node.counts["jobs_sent"] == 1 and b.node.counts["jobs_received"] == 1
    assert _states(db, job_id)["b-1"][0] == "delivered"
    assert _states(db, job_id)["a-2"][0] == "pending"  # no session anywhere


@pytest_twisted.ensureDeferred
async def test_accept_is_decided_in_sql_and_a_result_stored_once(two_nodes) -> None:
    a, b, db = two_nodes
    job_id = await a.jobs.create("ping", {}, ["a-1", "b-1"], 60, None)
    # n2 never heard of the job (no bus): the store decides
    assert await b.jobs.accept("b-1", job_id) is Accept.RUN
    assert await a.jobs.accept("b-1", job_id) is Accept.RUN  # running: the same agent again
    assert _states(db, job_id)["b-1"][0] == "running"
    assert await b.jobs.result("b-1", job_id, "succeeded", {"n": 1}, None, None, None) is True
    # the same result again, through the other node (the agent moved before its ack)
    assert await a.jobs.result("b-1", job_id, "succeeded", {"n": 2}, None, None, None) is False
    assert _states(db, job_id)["b-1"] == ("succeeded", {"n": 1})
    assert await a.jobs.accept("b-1", job_id) is Accept.FINISHED
    assert await b.jobs.accept("nobody", job_id) is Accept.UNKNOWN


@pytest_twisted.ensureDeferred
async def test_an_expired_target_is_not_run_by_any_node(two_nodes) -> None:
    a, b, db = two_nodes
    job_id = await a.jobs.create("ping", {}, ["a-1"], 60, None)
    with db.engine.begin() as c:  # the TTL passed
        c.execute(t.jobs.update().where(t.jobs.c.id == job_id).values(expires_at=1.0))
    assert await b.jobs.accept("a-1", job_id) is Accept.EXPIRED
    assert _states(db, job_id)["a-1"][0] == "expired"


@pytest_twisted.ensureDeferred
async def test_a_job_created_while_the_bus_is_down_reaches_the_other_node(two_nodes) -> None:
    a, b, db = two_nodes
    b.connect("b-1")
    _start(a, b)
    await a.node.heartbeat()
    await b.node.heartbeat()
    a.bus.redis.stop()
    assert a.node.status() == {
        "node": "n1",
        "bus": "down",
        "bus_reason": "ConnectionError: fake Redis stopped",
    }
    job_id = await a.jobs.create("ping", {}, ["b-1"], 60, None)
    await _settle()
    assert b.jobs_sent("b-1") == []  # no message crossed
    await b.node.resync()  # every RESYNC seconds, and when the bus returns
    assert b.jobs_sent("b-1") == [job_id]
    await _settle()
    await b.node.resync()
    assert b.jobs_sent("b-1") == [job_id]  # delivered: not sent again


@pytest_twisted.ensureDeferred
async def test_a_session_opening_asks_the_store_for_jobs_the_node_missed(two_nodes) -> None:
    """An agent that moves to n2 after n1 died gets what n1 had sent it (and n2 never heard
    of): its unfinished jobs are read from the store when its session opens."""
    a, b, db = two_nodes
    a.connect("a-1")
    job_id = await a.jobs.create("ping", {}, ["a-1"], 60, None)  # no bus: n2 has no message
    await _settle()
    assert _states(db, job_id)["a-1"][0] == "delivered"
    b.connect("a-1")
    b.jobs.session_opened("a-1")
    await b.jobs._ask_store()
    assert b.jobs_sent("a-1") == [job_id]


@pytest_twisted.ensureDeferred
async def test_nodes_list_and_state(two_nodes) -> None:
    a, b, db = two_nodes
    a.connect("a-1")
    _start(a, b)
    await a.node.heartbeat()
    await b.node.heartbeat()
    listed = {n["node"]: n for n in await a.node.nodes()}
    assert listed["n1"]["sessions"] == {"core": 1, "task": 0, "polls": 0}
    assert listed["n1"]["state"] == listed["n2"]["state"] == "up"
    assert listed["n1"]["this"] and not listed["n2"]["this"]
    with db.engine.begin() as c:  # n2's last heartbeat is old: it died
        c.execute(
            t.cluster_nodes.update()
            .where(t.cluster_nodes.c.name == "n2")
            .values(heartbeat_at=reactor.seconds() - DOWN_AFTER - 1)
        )
    assert {n["node"]: n["state"] for n in await a.node.nodes()} == {"n1": "up", "n2": "down"}
    assert a.bus.redis.agents["n1"] == {"a-1"}  # presence: the agents whose sessions it holds
    assert await b.node.where(["a-1", "b-1"]) == {"a-1": "n1"}
    assert await a.node.where(["a-1"]) == {}  # its own: not elsewhere


@pytest_twisted.ensureDeferred
async def test_a_change_reaches_the_other_node(two_nodes) -> None:
    a, b, db = two_nodes
    _start(a, b)
    await a.settings.change({"poll_interval": 77.0})
    a.node.changed("settings")
    await _settle()
    assert b.settings["poll_interval"] == 77.0
    assert b.node.counts["changes_received"] == 1
    assert a.node.counts["changes_received"] == 0  # its own change: applied already


def test_settle_takes_the_stores_view() -> None:
    """JobBook.settle: targets finished in the store are dropped, others keep the further
    state, and nothing is reported as a change to write."""
    book = JobBook()
    job = Job(id="j", action="ping", args={}, created_at=0.0, expires_at=100.0)
    book.add(job, {"a": TargetState.PENDING, "b": TargetState.RUNNING, "c": TargetState.PENDING})
    dropped = book.settle(job, {"a": TargetState.DELIVERED, "b": TargetState.PENDING})
    assert dropped == ["c"]
    assert book.active_targets("j") == {"a": TargetState.DELIVERED, "b": TargetState.RUNNING}
    assert book.settle(job, {}) == ["a", "b"]
    assert "j" not in book.jobs
    # a job not tracked yet is taken whole
    assert book.settle(job, {"d": TargetState.PENDING, "e": TargetState.SUCCEEDED}) == []
    assert book.active_targets("j") == {"d": TargetState.PENDING}


@pytest_twisted.ensureDeferred
async def test_a_follower_is_woken_by_a_result_stored_on_another_node(two_nodes) -> None:
    a, b, db = two_nodes
    _start(a, b)
    job_id = await a.jobs.create("ping", {}, ["b-1"], 60, None)
    waiting = a.jobs.output_waiter(job_id, 30.0)  # `tcm jobs follow` on n1
    assert await b.jobs.accept("b-1", job_id) is Accept.RUN
    assert await b.jobs.result("b-1", job_id, "succeeded", {}, None, None, None) is True
    await _settle()  # n2's events go out in a batch
    assert waiting.called  # woken long before its 30 s


@pytest_twisted.ensureDeferred
async def test_output_reaches_a_node_that_did_not_accept_the_job(two_nodes) -> None:
    """The agent accepted on n1, then moved to n2 (which never heard of the job): its output
    is taken there, from the store's view."""
    a, b, db = two_nodes
    job_id = await a.jobs.create("ping", {}, ["b-1"], 60, None)
    assert await a.jobs.accept("b-1", job_id) is Accept.RUN
    await b.jobs.output("b-1", job_id, 1, "stdout", "hello\n")
    chunks = await a.jobs.stored_output(job_id, 0)
    assert [c["text"] for c in chunks] == ["hello\n"]


@pytest_twisted.ensureDeferred
async def test_an_agent_enrolled_on_another_node_a_moment_ago_is_served_at_its_next_try(
    two_nodes,
) -> None:
    """Its first session attempt here came before the change message: refused once, and its
    row read from the store for the next attempt."""
    from tcm.server.agents import AgentAdmission, AgentDirectory
    from tcm.server.errors import Forbidden

    a, b, db = two_nodes
    admission = AgentAdmission(
        AgentDirectory(), db.agents, db.access, a.presence, None, None, a.settings, None,
        reactor, 1.0,
    )  # fmt: skip
    admission.shared = True
    await db.agents.add_agent("a-new", "host", "f" * 64, reactor.seconds(), True)  # on n2
    with pytest.raises(Forbidden, match="unknown agent"):
        admission.check_agent("a-new")
    await _settle()
    assert admission.check_agent("a-new") == "a-new"


@pytest_twisted.ensureDeferred
async def test_a_cancel_on_one_node_stops_a_target_running_on_another(two_nodes) -> None:
    """n1 thinks b-1's target is pending (n2 took its accept): the cancel takes the store's
    view, so b-1 is told to stop (by n2, which holds its session), not marked canceled."""
    a, b, db = two_nodes
    b.connect("b-1")
    _start(a, b)
    job_id = await a.jobs.create("ping", {}, ["b-1", "a-2"], 60, None)
    assert await b.jobs.accept("b-1", job_id) is Accept.RUN
    result = await a.jobs.cancel(job_id, None, by="admin")
    assert result == {"canceled": ["a-2"], "stopping": ["b-1"]}
    await _settle()
    sent = [decode(f) for f in b.transports["b-1"].frames]
    assert [e.type for e in sent if e.type == "action.cancel"] == ["action.cancel"]
    assert _states(db, job_id)["b-1"][0] == "running"  # until the agent reports
    assert _states(db, job_id)["a-2"][0] == "canceled"


@pytest_twisted.ensureDeferred
async def test_a_console_on_one_node_sees_events_of_another(two_nodes) -> None:
    """n1's console follows `jobs`: n2's job events for that topic cross the bus (only
    topics some other node follows do) and reach n1's subscribers."""
    from tcm.server.cluster.node import ClusterEvents
    from tcm.server.events import EventHub, job_event

    a, b, db = two_nodes
    hubs = {}
    for n in (a, b):
        hubs[n.name] = n.node.hub = EventHub(reactor, interval=0.01)
    seen: list[dict[str, Any]] = []
    hubs["n1"].subscribe(["jobs"], seen.append, lambda why: None)
    _start(a, b)
    await a.node.heartbeat()
    await b.node.heartbeat()
    assert b.node.remote_topics == {"jobs"} and a.node.remote_topics == set()
    publisher = ClusterEvents(hubs["n2"], b.node)
    publisher.publish(job_event("j-on-n2", action="ping", total=1))
    publisher.publish(job_event("j-other", action="ping", total=1).__class__(
        "job:j-other", "job", None, {}
    ))  # fmt: skip
    await _settle()
    kinds = [e for batch in seen for e in batch.get("events", [batch])]
    assert any("j-on-n2" in str(e) for e in kinds)
    assert not any("j-other" in str(e) for e in kinds)  # nobody follows that topic elsewhere
