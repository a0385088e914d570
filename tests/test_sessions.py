"""Agent sessions on the server, the session registry and the dispatcher, without sockets."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from tcm.protocol import codes
from tcm.protocol.envelope import Envelope, decode, encode
from tcm.server.dispatcher import DirectRoute, Dispatcher
from tcm.server.sessions import AgentSession, SessionRegistry, SessionState, SessionTransport
from tcm.server.websocket import AgentServerProtocol


class FakeTransport:
    """A SessionTransport that records what the session sends and how it closes."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.prepared: list[Any] = []
        self.closes: list[tuple[int, str]] = []

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def send_prepared(self, prepared: Any) -> None:
        self.prepared.append(prepared)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def sent(self) -> list[Envelope]:
        return [decode(f) for f in self.frames]


class FakeHub:
    """A SessionHub: registers opened sessions; requests wait for the test to answer them."""

    def __init__(self, max_in_flight: int = 3) -> None:
        self.max_in_flight = max_in_flight
        self.registry = SessionRegistry()
        self.opened: list[tuple[AgentSession, dict[str, Any]]] = []
        self.closed: list[AgentSession] = []
        self.requests: list[tuple[Envelope, Deferred]] = []

    def welcome_for(self, session: AgentSession) -> dict[str, Any]:
        return {
            "session": session.id,
            "agent_id": session.agent_id,
            "keepalive": 50.0,
            "poll_interval": 60.0,
            "max_in_flight": self.max_in_flight,
        }

    def session_opened(self, session: AgentSession, hello: dict[str, Any]) -> None:
        self.opened.append((session, hello))
        self.registry.add(session)

    def session_closed(self, session: AgentSession) -> None:
        self.closed.append(session)
        self.registry.remove(session)

    def handle_request(self, session: AgentSession, env: Envelope) -> Deferred:
        d: Deferred = Deferred()
        self.requests.append((env, d))
        return d


@pytest.mark.parametrize("transport_class", [FakeTransport, AgentServerProtocol])
def test_transports_have_the_session_transport_methods(transport_class):
    """The fake offers what the real adapter offers, with the same signatures."""
    for name in ("send_frame", "send_prepared", "close"):
        expected = inspect.signature(getattr(SessionTransport, name))
        actual = inspect.signature(getattr(transport_class, name))
        assert list(actual.parameters) == list(expected.parameters)


HELLO = {
    "agent_version": "0.1.0",
    "protocol": 1,
    "capabilities": [{"name": "ping"}, {"name": "command.run", "streams": True}],
    "hostname": "web-01",
    "platform": "Linux",
}


def frame(mtype: str, data: dict[str, Any], msg_id: str = "m1", **kw: Any) -> bytes:
    return encode(Envelope(type=mtype, data=data, id=msg_id, **kw))


def new_session(hub: FakeHub, agent_id: str = "a-1", now: float = 1000.0):
    transport = FakeTransport()
    session = AgentSession(agent_id, transport, hub, now, route="direct-route")
    return session, transport


def opened(hub: FakeHub, agent_id: str = "a-1", now: float = 1000.0):
    session, transport = new_session(hub, agent_id, now)
    session.frame_received(frame("hello", HELLO, "hello-1"), now)
    assert session.state is SessionState.OPEN
    transport.frames.clear()
    return session, transport


def lost(session: AgentSession) -> None:
    """What the WebSocket adapter does when the connection goes away."""
    session.connection_lost()


# -- session start ----------------------------------------------------------------------------


def test_hello_gets_welcome_and_registers():
    hub = FakeHub()
    session, transport = new_session(hub)
    assert session.state is SessionState.AWAITING_HELLO
    session.frame_received(frame("hello", HELLO, "hello-1"), 1001.0)

    [welcome] = transport.sent()
    assert welcome.type == "welcome"
    assert welcome.in_reply_to == "hello-1"
    assert welcome.data == hub.welcome_for(session)
    assert welcome.data["session"] == session.id
    assert session.state is SessionState.OPEN
    assert hub.registry.get("a-1") is session
    assert hub.opened == [(session, HELLO)]
    assert set(session.capabilities) == {"ping", "command.run"}
    assert session.capabilities["command.run"]["streams"] is True
    assert session.hostname == "web-01"
    assert session.info == {"agent_version": "0.1.0", "platform": "Linux"}
    assert session.last_rx == 1001.0
    assert transport.closes == []


def test_first_message_not_hello_closes_4002():
    hub = FakeHub()
    session, transport = new_session(hub)
    session.frame_received(frame("request", {"method": "GET", "path": "/x"}, "r-1"), 1000.0)
    [error] = transport.sent()
    assert error.type == "error"
    assert error.in_reply_to == "r-1"
    assert error.data["code"] == codes.ERR_UNEXPECTED
    assert transport.closes == [(codes.CLOSE_PROTOCOL_ERROR, "first message must be hello")]
    assert hub.opened == [] and len(hub.registry) == 0
    assert hub.requests == []


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[]", frame("hello", {"protocol": 1}, "h-bad"), b'{"id":"u","type":"x",'],
)
def test_bad_first_message_closes_4002(payload):
    hub = FakeHub()
    session, transport = new_session(hub)
    session.frame_received(payload, 1000.0)
    [error] = transport.sent()
    assert error.type == "error"
    assert error.data["code"] in (codes.ERR_MALFORMED, codes.ERR_SCHEMA)
    assert [code for code, _ in transport.closes] == [codes.CLOSE_PROTOCOL_ERROR]
    assert session.state is SessionState.AWAITING_HELLO
    assert hub.opened == []


def test_invalid_hello_error_names_its_id():
    hub = FakeHub()
    session, transport = new_session(hub)
    session.frame_received(frame("hello", {"protocol": 1}, "h-bad"), 1000.0)
    [error] = transport.sent()
    assert error.in_reply_to == "h-bad"
    assert error.data["code"] == codes.ERR_SCHEMA


def test_second_hello_is_an_error_and_the_session_lives():
    hub = FakeHub()
    session, transport = opened(hub)
    session.frame_received(frame("hello", HELLO, "hello-2"), 1001.0)
    [error] = transport.sent()
    assert error.in_reply_to == "hello-2"
    assert error.data["code"] == codes.ERR_UNEXPECTED
    assert transport.closes == []
    assert session.state is SessionState.OPEN
    assert len(hub.opened) == 1


@pytest.mark.parametrize("mtype", ["welcome", "action.request", "response", "notify"])
def test_types_agents_may_not_send_get_unexpected(mtype):
    data = {
        "welcome": {"session": "s", "keepalive": 1, "poll_interval": 1},
        "action.request": {"job": "j", "action": "ping", "args": {}},
        "response": {"status": 200},
        "notify": {"topic": "t"},
    }[mtype]
    hub = FakeHub()
    session, transport = opened(hub)
    session.frame_received(frame(mtype, data, "odd-1"), 1001.0)
    [error] = transport.sent()
    assert error.type == "error"
    assert error.in_reply_to == "odd-1"
    assert error.data["code"] == codes.ERR_UNEXPECTED
    assert mtype in error.data["message"]
    assert transport.closes == []


def test_unknown_type_after_hello():
    hub = FakeHub()
    session, transport = opened(hub)
    session.frame_received(b'{"id":"new-1","type":"action.pause","data":{}}', 1001.0)
    [error] = transport.sent()
    assert error.in_reply_to == "new-1"
    assert error.data["code"] == codes.ERR_UNKNOWN_TYPE
    assert transport.closes == []


@pytest.mark.parametrize(
    ("payload", "code", "ref"),
    [
        (b"\x00\x01", codes.ERR_MALFORMED, None),
        (b'"just a string"', codes.ERR_MALFORMED, None),
        (frame("request", {"method": "GET"}, "r-9"), codes.ERR_SCHEMA, "r-9"),
        (
            b'{"id":"r-8","type":"request","data":{"method":"GET","path":"/"},"expires":NaN}',
            codes.ERR_MALFORMED,
            None,
        ),
    ],
)
def test_malformed_after_hello_is_answered_and_the_session_lives(payload, code, ref):
    hub = FakeHub()
    session, transport = opened(hub)
    session.frame_received(payload, 1001.0)
    [error] = transport.sent()
    assert error.data["code"] == code
    assert error.in_reply_to == ref
    assert transport.closes == []
    assert session.state is SessionState.OPEN
    # and it keeps working
    session.frame_received(frame("request", {"method": "GET", "path": "/agent/v1/whoami"}), 1002)
    assert len(hub.requests) == 1


def test_too_large_is_answered():
    hub = FakeHub()
    transport = FakeTransport()
    session = AgentSession("a-1", transport, hub, 0.0, route=None, max_message_size=200)
    session.frame_received(frame("hello", HELLO), 0.0)
    transport.frames.clear()
    session.frame_received(
        frame("request", {"method": "POST", "path": "/", "body": "x" * 300}), 1.0
    )
    [error] = transport.sent()
    assert error.data["code"] == codes.ERR_TOO_LARGE
    assert transport.closes == []


def test_agent_errors_are_logged_only():
    hub = FakeHub()
    session, transport = opened(hub)
    session.frame_received(
        frame("error", {"code": "schema", "message": "bad"}, in_reply_to="srv-1"), 1001.0
    )
    assert transport.frames == [] and transport.closes == []


# -- requests and the in-flight limit ---------------------------------------------------------


def request(i: int) -> bytes:
    return frame("request", {"method": "GET", "path": f"/agent/v1/whoami?i={i}"}, f"req-{i}")


def test_in_flight_limit():
    hub = FakeHub(max_in_flight=3)
    session, transport = opened(hub)
    for i in range(4):
        session.frame_received(request(i), 1001.0)
    assert [env.id for env, _ in hub.requests] == ["req-0", "req-1", "req-2"]
    [error] = transport.sent()
    assert error.in_reply_to == "req-3"
    assert error.data["code"] == codes.ERR_IN_FLIGHT
    assert "3" in error.data["message"]
    assert transport.closes == []
    assert session.in_flight == 3

    # answers go out as their Deferreds fire, in any order
    for env, d in reversed(hub.requests):
        d.callback(env.reply("response", {"status": 200, "body": {"i": env.id}}))
    answers = transport.sent()[1:]
    assert [a.in_reply_to for a in answers] == ["req-2", "req-1", "req-0"]
    assert all(a.type == "response" for a in answers)
    assert session.in_flight == 0

    # room again
    session.frame_received(request(4), 1002.0)
    assert hub.requests[-1][0].id == "req-4"
    assert session.in_flight == 1


def test_no_response_after_the_session_closed():
    hub = FakeHub()
    session, transport = opened(hub)
    session.frame_received(request(1), 1001.0)
    lost(session)
    assert session.state is SessionState.CLOSED
    assert hub.closed == [session]
    env, d = hub.requests[0]
    d.callback(env.reply("response", {"status": 200}))
    assert transport.frames == []
    assert session.in_flight == 0


def test_a_failed_request_is_answered_with_internal_error():
    hub = FakeHub(max_in_flight=1)
    session, transport = opened(hub)
    hub.handle_request = lambda session, env: fail(RuntimeError("store down"))
    session.frame_received(request(1), 1001.0)
    assert session.in_flight == 0
    [error] = transport.sent()
    assert error.in_reply_to == "req-1"
    assert error.data["code"] == codes.ERR_INTERNAL


# -- close and supersede ----------------------------------------------------------------------


def test_close_uses_the_documented_reason():
    hub = FakeHub()
    session, transport = opened(hub)
    session.close(codes.CLOSE_KEEPALIVE)
    assert transport.closes == [(codes.CLOSE_KEEPALIVE, "keepalive timeout")]
    session.close(4999, "custom")
    assert transport.closes[-1] == (4999, "custom")


def test_close_after_connection_lost_does_nothing():
    hub = FakeHub()
    session, transport = opened(hub)
    lost(session)
    session.close(codes.CLOSE_NORMAL)
    assert transport.closes == []
    lost(session)  # twice: still one session_closed
    assert hub.closed == [session]


def test_connection_lost_before_hello_is_not_a_closed_session():
    hub = FakeHub()
    session, _ = new_session(hub)
    lost(session)
    assert session.state is SessionState.CLOSED
    assert hub.closed == []


def test_a_new_session_supersedes_the_old_one():
    hub = FakeHub()
    old, old_transport = opened(hub, now=1000.0)
    new, new_transport = opened(hub, now=2000.0)
    assert hub.registry.get("a-1") is new
    assert old_transport.closes == [
        (codes.CLOSE_SUPERSEDED, codes.CLOSE_REASONS[codes.CLOSE_SUPERSEDED])
    ]
    assert new_transport.closes == []
    # the old connection then goes away: the new session stays registered
    lost(old)
    assert hub.closed == [old]
    assert hub.registry.get("a-1") is new
    assert "a-1" in hub.registry and len(hub.registry) == 1


def test_registry_add_and_remove():
    registry = SessionRegistry()
    hub = FakeHub()
    s1, t1 = new_session(hub, "a-1")
    s2, _ = new_session(hub, "a-2")
    assert registry.add(s1) is None
    assert registry.add(s1) is None  # the same session again: nothing superseded
    assert t1.closes == []
    assert registry.add(s2) is None
    assert len(registry) == 2
    s1b, _ = new_session(hub, "a-1")
    assert registry.add(s1b) is s1
    assert registry.remove(s1) is False
    assert registry.get("a-1") is s1b
    assert registry.remove(s1b) is True
    assert registry.get("a-1") is None
    assert "a-1" not in registry
    assert registry.all() == [s2]


def test_idle_since():
    hub = FakeHub()
    quiet, _ = opened(hub, "a-quiet", now=100.0)
    chatty, _ = opened(hub, "a-chatty", now=100.0)
    chatty.frame_received(frame("error", {"code": "x", "message": "y"}), 250.0)
    assert hub.registry.idle_since(200.0) == [quiet]
    assert hub.registry.idle_since(100.0) == []
    assert set(hub.registry.idle_since(300.0)) == {quiet, chatty}
    # even a bad frame shows the connection is alive
    quiet.frame_received(b"garbage", 260.0)
    assert hub.registry.idle_since(250.0) == []


def test_a_ping_from_the_agent_keeps_the_session_alive():
    clock = Clock()
    hub = FakeHub()
    protocol = AgentServerProtocol()
    protocol.factory = SimpleNamespace(clock=clock)  # type: ignore[assignment]
    protocol.state = AgentServerProtocol.STATE_OPEN
    pongs: list[bytes] = []
    protocol.sendPong = pongs.append  # type: ignore[method-assign]
    protocol.session, _ = opened(hub, now=0.0)
    clock.advance(500.0)
    protocol._onPing(b"keepalive")  # what Autobahn calls for a received ping frame
    assert pongs == [b"keepalive"]
    assert hub.registry.idle_since(400.0) == []


# -- the dispatcher ---------------------------------------------------------------------------


class Preparer:
    """Stands in for WebSocketServerFactory.prepareMessage."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, payload: bytes) -> Any:
        self.calls.append(payload)
        return ("prepared", payload)


def sessions_on(route: DirectRoute, registry: SessionRegistry, *agent_ids: str):
    hub = FakeHub()
    out = {}
    for agent_id in agent_ids:
        transport = FakeTransport()
        session = AgentSession(agent_id, transport, hub, 0.0, route=route)
        registry.add(session)
        out[agent_id] = transport
    return out


def test_push_to_one_session_sends_the_frame():
    prepare = Preparer()
    route = DirectRoute(prepare)
    registry = SessionRegistry()
    transports = sessions_on(route, registry, "a-1", "a-2")
    dispatcher = Dispatcher(registry)
    assert dispatcher.push(b"FRAME", ["a-1"]) == (["a-1"], [])
    assert transports["a-1"].frames == [b"FRAME"]
    assert transports["a-2"].frames == []
    assert prepare.calls == []
    assert dispatcher.pushed == 1


def test_push_to_many_prepares_once():
    prepare = Preparer()
    route = DirectRoute(prepare)
    registry = SessionRegistry()
    transports = sessions_on(route, registry, "a-1", "a-2", "a-3")
    dispatcher = Dispatcher(registry)
    sent, offline = dispatcher.push(b"FRAME", ["a-3", "gone", "a-1", "a-2", "also-gone"])
    assert sent == ["a-3", "a-1", "a-2"]
    assert offline == ["gone", "also-gone"]
    assert prepare.calls == [b"FRAME"]
    for t in transports.values():
        assert t.prepared == [("prepared", b"FRAME")]
        assert t.frames == []
    assert dispatcher.pushed == 3
    assert dispatcher.is_online("a-1") and not dispatcher.is_online("gone")


def test_push_groups_by_route():
    class RecordingRoute:
        def __init__(self) -> None:
            self.deliveries: list[tuple[bytes, list[str]]] = []

        def deliver(self, frame: bytes, sessions: list[AgentSession]) -> None:
            self.deliveries.append((frame, [s.agent_id for s in sessions]))

    gw1, gw2 = RecordingRoute(), RecordingRoute()
    registry = SessionRegistry()
    sessions_on(gw1, registry, "a-1", "a-2")
    sessions_on(gw2, registry, "a-3")
    sent, offline = Dispatcher(registry).push(b"F", ["a-1", "a-3", "a-2"])
    assert gw1.deliveries == [(b"F", ["a-1", "a-2"])]  # one crossing per route
    assert gw2.deliveries == [(b"F", ["a-3"])]
    assert offline == []


def test_push_to_nobody():
    prepare = Preparer()
    dispatcher = Dispatcher(SessionRegistry())
    assert dispatcher.push(b"F", ["a-1"]) == ([], ["a-1"])
    assert dispatcher.push(b"F", []) == ([], [])
    assert dispatcher.pushed == 0
    assert prepare.calls == []


def test_welcome_data_reaches_the_wire_as_json():
    hub = FakeHub()
    session, transport = new_session(hub)
    session.frame_received(frame("hello", HELLO, "hello-1"), 1.0)
    raw = json.loads(transport.frames[0])
    assert raw["type"] == "welcome" and raw["in_reply_to"] == "hello-1"
