"""The console's server side without a browser: the static resource (headers, deep links),
the event stream's adapter on a fake request and clock, and the events a job's life
publishes (JobService on a real SQLite store)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from tcm.server.console import CSP, ConsoleResource, EventStream, load_static
from tcm.server.dispatcher import Dispatcher
from tcm.server.events import EventHub, agent_event
from tcm.server.jobservice import JobService
from tcm.server.sessions import SessionRegistry
from tcm.store import Database
from tests.inproc import inproc_server, start_server, wait_for, within  # noqa: F401 (a fixture)

# -- the static files ---------------------------------------------------------------------


def get(path: str, files=None) -> DummyRequest:
    """Render `path` (/console/...) as the site would: prepath [console], the rest postpath."""
    rest = path.removeprefix("/console")
    postpath = [p.encode() for p in rest.removeprefix("/").split("/")] if rest else []
    request = DummyRequest(postpath)
    request.prepath = [b"console"]
    request.postpath = postpath
    request.body = ConsoleResource(files).render_GET(request)  # type: ignore[attr-defined]
    return request


def header(request: DummyRequest, name: str) -> str | None:
    value = request.responseHeaders.getRawHeaders(name)
    return value[0].decode() if value and isinstance(value[0], bytes) else (value or [None])[0]


def test_the_package_ships_the_console():
    files = load_static()
    assert {"index.html", "js/app.js", "js/api.js", "js/vtable.js", "css/console.css"} <= set(files)
    index = files["index.html"].decode()
    # no inline script: the one script is a module from this origin
    assert '<script type="module" src="/console/js/app.js"></script>' in index
    assert "<script>" not in index and "onload=" not in index and "style=" not in index
    for name, body in files.items():
        if name.endswith(".js"):
            text = body.decode()
            assert "innerHTML" not in text and "eval(" not in text, name
            assert "insertAdjacentHTML" not in text and "document.write" not in text, name


def test_every_answer_has_the_security_headers():
    request = get("/console/")
    assert request.body.startswith(b"<!doctype html>")
    assert header(request, "content-security-policy") == CSP
    assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP
    assert "frame-ancestors 'none'" in CSP
    assert header(request, "x-content-type-options") == "nosniff"
    assert header(request, "content-type") == "text/html; charset=utf-8"


def test_deep_links_get_the_app_and_assets_their_type():
    files = {"index.html": b"<!doctype html>app", "js/app.js": b"//js"}
    assert get("/console/jobs/abc123", files).body == b"<!doctype html>app"
    js = get("/console/js/app.js", files)
    assert js.body == b"//js" and header(js, "content-type").startswith("text/javascript")
    missing = get("/console/js/missing.js", files)
    assert missing.responseCode == 404
    assert get("/console/../etc/passwd", files).body == b"<!doctype html>app"


def test_console_without_the_slash_redirects():
    request = get("/console")
    assert request.responseCode == 301 and header(request, "location") == "/console/"


# -- the event stream's adapter -----------------------------------------------------------


class StreamRequest(DummyRequest):
    """A DummyRequest that records its producer."""

    def __init__(self):
        super().__init__([b"events"])
        self.producer = None

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def frames(request) -> list[tuple[str, dict]]:
    text = b"".join(request.written).decode()
    out = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        kind = lines[0].removeprefix("event: ")
        out.append((kind, json.loads(lines[1].removeprefix("data: "))))
    return out


def test_a_stream_says_hello_then_batches_then_closes_when_its_time_is_up():
    clock = Clock()
    hub = EventHub(clock)
    request = StreamRequest()
    stream = EventStream(hub, clock, request, frozenset({"agents"}), wait=60, heartbeat=15)
    done = stream.start()
    assert request.responseCode == 200
    assert header(request, "content-type") == "text/event-stream; charset=utf-8"
    assert request.producer is stream.subscription  # flow control: the client's pace
    hub.publish(agent_event("a1", mode="persistent"))
    clock.advance(0)
    clock.advance(15)
    assert b": keepalive" in b"".join(request.written)
    clock.advance(45)
    assert done.called
    kinds = frames(request)
    assert [k for k, _ in kinds] == ["hello", "batch", "close"]
    assert kinds[1][1]["events"][0]["id"] == "a1"
    assert kinds[2][1] == {"reason": "the stream's time"}
    assert hub.subscribers() == 0 and clock.getDelayedCalls() == []


def test_a_client_that_goes_away_is_unsubscribed():
    clock = Clock()
    hub = EventHub(clock)
    request = StreamRequest()
    done = EventStream(hub, clock, request, frozenset({"agents"}), wait=60).start()
    request.processingFailed(Exception("connection lost"))  # what a lost connection does
    assert done.called and hub.subscribers() == 0
    assert clock.getDelayedCalls() == []


def test_a_slow_client_is_dropped_with_the_reason():
    clock = Clock()
    hub = EventHub(clock, max_stall=30)
    request = StreamRequest()
    stream = EventStream(hub, clock, request, frozenset({"agents"}), wait=3600)
    done = stream.start()
    stream.subscription.pauseProducing()  # the transport's buffer is full
    hub.publish(agent_event("a1"))
    clock.advance(31)
    assert done.called
    kind, data = frames(request)[-1]
    assert kind == "close" and "too slow" in data["reason"]
    assert hub.subscribers() == 0


# -- what a job's life publishes ------------------------------------------------------------


@pytest.fixture
def jobs_and_events(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'tcm.sqlite'}", reactor=reactor)
    db.open()
    jobs = JobService(
        db.jobs,
        Dispatcher(SessionRegistry()),
        reactor,
        capabilities_of=lambda a: None,
        known_agents=lambda: ["a-1", "a-2"],
        inventory_store=db.inventory,
    )
    clock = Clock()
    hub = EventHub(clock)
    jobs.events = hub
    yield db, jobs, hub, clock
    db.close()


@pytest_twisted.ensureDeferred
async def test_a_jobs_life_is_published_to_its_topic(jobs_and_events):
    db, jobs, hub, clock = jobs_and_events
    seen: list[dict] = []
    listing: list[dict] = []
    job_id = await jobs.create("command.run", {"argv": ["true"]}, ["a-1", "a-2"], 60, None)
    hub.subscribe([f"job:{job_id}"], seen.append, lambda reason: None)
    hub.subscribe(["jobs"], listing.append, lambda reason: None)
    assert jobs.accept("a-1", job_id).value == "run"
    await jobs.output("a-1", job_id, 1, "stdout", "hello\n")
    await jobs.result("a-1", job_id, "succeeded", {"exit_code": 0}, None, 1.0, 2.0)
    await jobs.result("a-2", job_id, "failed", {"exit_code": 3}, "exit 3", 1.0, 2.0)
    clock.advance(0)
    events = [e for batch in seen for e in batch["events"]]
    targets = {e["agent"]: e for e in events if e["kind"] == "target"}
    assert targets["a-1"]["state"] == "succeeded" and targets["a-1"]["exit_code"] == 0
    assert targets["a-2"]["state"] == "failed" and targets["a-2"]["error"] == "exit 3"
    assert [e["text"] for e in events if e["kind"] == "output"] == ["hello\n"]
    finished = [e for batch in listing for e in batch["events"]]
    assert finished == [{"kind": "job", "key": job_id, "id": job_id, "finished": True}]


# -- the real server: its stream over HTTPS carries the agents' sessions ----------------------


@pytest_twisted.ensureDeferred
async def test_the_servers_stream_carries_sessions_opened_and_closed(inproc_server):  # noqa: F811

    server = inproc_server
    hub = server.parts.admin_api.eventhub
    viewer = await server.admin("POST", "/api/v1/apitokens", {"name": "v", "role": "viewer"})
    assert viewer.status == 201
    bad = await server.admin("GET", "/api/v1/events?topics=nope")
    assert bad.status == 400 and "unknown topic" in bad.body["error"]
    # a viewer may read the stream; it ends after `wait` seconds with a close event
    streaming = server.admin(
        "GET", "/api/v1/events?topics=agents&wait=3", token=viewer.body["token"]
    )
    await wait_for(lambda: hub.subscribers("agents") == 1, what="the stream to subscribe")
    client, _, identity = await server.session()
    await client.shut()
    revoked = await server.admin("POST", f"/api/v1/agents/{identity.agent_id}/revoke")
    assert revoked.status == 200
    reply = await within(streaming, 15)
    assert reply.status == 200
    assert reply.headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    text = reply.body.decode()
    blocks = [b for b in text.split("\n\n") if b and not b.startswith(":")]
    kinds = [b.split("\n")[0] for b in blocks]
    assert kinds[0] == "event: hello" and kinds[-1] == "event: close"
    events = [
        e
        for b in blocks
        if b.startswith("event: batch")
        for e in json.loads(b.split("\n")[1].removeprefix("data: "))["events"]
    ]
    mine = [e for e in events if e["id"] == identity.agent_id]
    # enrolled (new), its session opened and closed, revoked: merged per agent within a
    # batch, so what the page holds in the end is the latest of each field
    seen: dict = {}
    for e in mine:
        seen.update(e)
    assert seen["online"] is False and seen["mode"] == "offline"
    assert seen["state"] == "revoked" and seen["revoked"] is True
    assert hub.subscribers() == 0


@pytest_twisted.ensureDeferred
async def test_an_http_agent_that_stops_polling_goes_offline_on_the_stream(tmp_path):
    """No poll for 2 x poll_interval + long_poll: the server's own sweep (every 5 s) tells
    the console the agent is offline, as a session's close does for a persistent one."""
    server = await start_server(str(tmp_path / "server"), poll_interval=1.0, long_poll=0.0)
    try:
        hub = server.parts.admin_api.eventhub
        batches: list = []
        subscription = hub.subscribe(["agents"], batches.append, lambda reason: None)
        identity = await server.enroll_identity()
        polled = await server.agent_https("GET", "/agent/v1/work", identity=identity)
        assert polled.status == 200

        def modes():
            return [
                e["mode"]
                for b in batches
                for e in b["events"]
                if e.get("id") == identity.agent_id and "mode" in e
            ]

        await wait_for(lambda: "http" in modes(), what="the agent in HTTP mode")
        await wait_for(lambda: "offline" in modes(), 15, 0.05, "the agent told offline")
        assert modes()[-1] == "offline"
        agent = await server.admin("GET", f"/api/v1/agents/{identity.agent_id}")
        assert agent.body["mode"] == "offline"  # the stream and the REST view agree
        subscription.cancel()
    finally:
        await server.stop()
