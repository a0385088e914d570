"""Unit tests of the node link: codec, assignment policy, the server's NodeLink, the node's Relay.

No sockets: the link's two ends are joined by plain functions, time is a Clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from tcm.protocol import codes, link
from tcm.protocol.envelope import Envelope, decode, encode
from tcm.relay.relays import GatewayRelay, TaskServerRelay
from tcm.server.errors import Forbidden
from tcm.server.hub import resume_field
from tcm.server.links import NodeLink
from tcm.server.nodes import TaskServerAssignments
from tcm.server.sessions import SessionState

# -- codec ---------------------------------------------------------------------------------


def test_link_messages_round_trip_with_payload_untouched():
    frame = b'{"id":"x","type":"hello","data":{"a":"\\n"}}\n\x00tail'
    header, payload = link.decode(link.encode({"t": "frame", "c": 3}, frame), link.NODE_SENDS)
    assert header == {"t": "frame", "c": 3}
    assert payload == frame


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"no newline", "header line"),
        (b"{not json\n", "not JSON"),
        (b"[1,2]\n", "JSON object"),
        (b'{"t":"push","c":[1]}\n', "unexpected"),  # a node may not push
        (b'{"t":"frame","c":-1}\n', "non-negative integer"),
        (b'{"t":"frame","c":true}\n', "non-negative integer"),
        (b'{"t":"open","c":1}\n', "agent id"),
        (b'{"t":"hello","role":"printer","url":"x"}\n', "role"),
        (b'{"t":"hello","role":"taskserver"}\n', "url"),
    ],
)
def test_bad_link_messages_are_refused_with_a_reason(message, why):
    with pytest.raises(link.LinkError, match=why):
        link.decode(message, link.NODE_SENDS)


def test_push_needs_a_list_of_numbers():
    with pytest.raises(link.LinkError, match="connection numbers"):
        link.decode(b'{"t":"push","c":["a"]}\n', link.SERVER_SENDS)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_link_errors(data):
    for allowed in (link.NODE_SENDS, link.SERVER_SENDS):
        try:
            link.decode(data, allowed)
        except link.LinkError:
            pass


# -- assignment policy ------------------------------------------------------------------------


def test_fewest_spreads_evenly_and_keeps_an_agent_where_it_is():
    a = TaskServerAssignments("fewest")
    a.up("ts1", "wss://1", None)
    a.up("ts2", "wss://2", None)
    got = [a.assign(f"agent{i}")[0] for i in range(6)]
    assert got.count("ts1") == 3 and got.count("ts2") == 3
    assert a.assign("agent0") == (got[0], "assigned")


def test_capacity_prefers_the_most_free_places():
    a = TaskServerAssignments("capacity")
    a.up("big", "wss://b", 10)
    a.up("small", "wss://s", 2)
    got = [a.assign(f"agent{i}")[0] for i in range(12)]
    assert got[:8] == ["big"] * 8  # until both have two places left
    assert got.count("big") == 10 and got.count("small") == 2
    fewest = TaskServerAssignments("fewest")
    fewest.up("big", "wss://b", 10)
    fewest.up("small", "wss://s", 2)
    got = [fewest.assign(f"agent{i}")[0] for i in range(8)]
    assert got.count("small") == 2  # fewest fills the small one to its maximum


def test_maximum_and_the_reasons_for_no_task_server():
    a = TaskServerAssignments("fewest", default_max=1)
    assert a.assign("x") == (None, "no task server registered")
    a.registered = 1
    assert a.assign("x") == (None, "no task server connected")
    a.up("ts1", "wss://1", None)
    assert a.assign("x")[0] == "ts1"
    assert a.assign("y") == (None, "all 1 task servers are full")
    a.release("x")
    assert a.assign("y")[0] == "ts1"


def test_down_returns_the_agents_to_move():
    a = TaskServerAssignments()
    a.up("ts1", "wss://1", None)
    a.up("ts2", "wss://2", None)
    placed = {f"agent{i}": a.assign(f"agent{i}")[0] for i in range(4)}
    moved = a.down("ts2")
    assert sorted(moved) == sorted(k for k, v in placed.items() if v == "ts2")
    assert all(a.assign(m)[0] == "ts1" for m in moved)
    assert a.counts == {"ts1": 4}


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="fewest"):
        TaskServerAssignments("random")


# -- the server's NodeLink and the node's Relay, joined back to back ---------------------------


class Hub:
    max_in_flight = 4
    link_keepalive = 25.0
    server_name = "s1"

    def __init__(self) -> None:
        self.opened: list[Any] = []
        self.closed: list[Any] = []
        self.known = {"a-1", "a-2", "a-3"}
        self.revoked: list[str] = []
        self.persistent = True
        self.gateways = {"gw1": "FP-GW1"}
        self.previous_gateways: dict[str, str] = {}

    def revoked_agents(self) -> list[str]:
        return list(self.revoked)

    def pending_agents(self) -> list[str]:
        return []

    def gateway_fingerprints(self, previous: bool = False) -> dict[str, str]:
        return dict(self.previous_gateways if previous else self.gateways)

    def render_relayed(self, view, env):
        from twisted.internet.defer import succeed

        return succeed(env.reply("response", {"status": 200, "body": {"agent": view.tcm_agent_id}}))

    def persistent_enabled(self) -> bool:
        return self.persistent

    def authenticate_agent_id(self, agent_id: str) -> str:
        if agent_id not in self.known:
            raise Forbidden(f"unknown agent {agent_id}: enroll again")
        return agent_id

    def welcome_for(self, session) -> dict[str, Any]:
        # `resume` as the server's AgentHub makes it: the token the node sent in `open`
        resume = resume_field(session, None, 0.0)
        return {"session": session.id, "keepalive": 50, "poll_interval": 60, **resume}

    def session_opened(self, session, hello) -> None:
        self.opened.append(session)

    def session_closed(self, session) -> None:
        self.closed.append(session)

    def link_opened(self, node) -> None:
        pass

    def link_closed(self, node) -> None:
        pass

    def handle_request(self, session, env):
        raise AssertionError("not in these tests")


class AgentConn:
    """What the relay sees of an agent's WebSocket connection."""

    down = None  # an agent's own connection, not one a gateway carries

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.prepared: list[Any] = []
        self.closed: tuple[int, str] | None = None
        self.relay_conn: int | None = None
        self.last_rx = 0.0

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.frames.append(payload)

    def sendPreparedMessage(self, prepared: Any) -> None:
        self.prepared.append(prepared)

    def sendClose(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)


class Upstream:
    """The node's end of the link, wired straight to the server's NodeLink."""

    def __init__(self, node: NodeLink) -> None:
        self.node = node

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.node.message_received(link.encode(header, payload))


def _pair():
    clock = Clock()
    hub = Hub()
    relay = TaskServerRelay(clock, max_clients=2)
    link_closes: list[tuple[int, str]] = []

    def to_node(data: bytes) -> None:
        outer, body = link.decode(data, link.SERVER_SENDS)
        for header, payload in link.unbatch(outer, body, link.SERVER_SENDS):
            if header["t"] != "welcome":
                relay.from_server(header, payload)

    node = NodeLink("ts1", to_node, lambda c, r: link_closes.append((c, r)), hub, clock)
    relay.prepare = lambda payload: ("prepared", payload)
    node.message_received(
        link.encode({"t": "hello", "name": "ts1", "role": "taskserver", "url": "wss://x"})
    )
    assert relay.link_up("server", Upstream(node), "s1") is None
    clock.advance(0)
    return clock, hub, relay, node, link_closes


def _hello() -> bytes:
    return encode(
        Envelope(
            type="hello",
            data={"agent_version": "1", "protocol": 1, "capabilities": [{"name": "ping"}]},
        )
    )


def test_a_relayed_agent_gets_a_real_session_and_a_push_crosses_once():
    clock, hub, relay, node, _ = _pair()
    conns = {a: AgentConn() for a in ("a-1", "a-2")}
    for agent_id, conn in conns.items():
        conn.relay_conn = relay.opened(conn, agent_id, "tcp4:10.0.0.9:4000", {})
        relay.from_agent(conn.relay_conn, _hello())
    clock.advance(0)
    assert [s.agent_id for s in hub.opened] == ["a-1", "a-2"]
    assert all(s.channel == "task" and s.route is node for s in hub.opened)
    welcome = decode(conns["a-1"].frames[0], 0)
    assert welcome.type == "welcome"
    assert hub.opened[0].transport.peer_transport.getPeer().host == "10.0.0.9"
    # a push to both: one link message, framed once at the node, sent to each connection
    node.deliver(b'{"frame":1}', hub.opened)
    clock.advance(0)
    assert node.pushes == 1
    assert conns["a-1"].prepared == [("prepared", b'{"frame":1}')]
    assert conns["a-2"].prepared == [("prepared", b'{"frame":1}')]


def test_unknown_agent_at_a_node_is_closed_with_a_reason():
    clock, hub, relay, node, _ = _pair()
    conn = AgentConn()
    relay.opened(conn, "a-unknown", "tcp4:1.2.3.4:5", {})
    clock.advance(0)
    assert conn.closed is not None and conn.closed[0] == codes.CLOSE_UNAUTHORIZED
    assert "unknown agent" in conn.closed[1]
    assert hub.opened == []


def test_no_relayed_sessions_while_persistent_connections_are_off():
    clock, hub, relay, node, _ = _pair()
    hub.persistent = False
    conn = AgentConn()
    relay.opened(conn, "a-1", "tcp4:1.2.3.4:5", {})
    clock.advance(0)
    assert conn.closed is not None and conn.closed[0] == codes.CLOSE_PERSISTENT_OFF
    assert hub.opened == []


def test_a_bad_link_message_closes_the_link_with_4002():
    _, _, _, node, link_closes = _pair()
    node.message_received(b'{"t":"frame","c":"x"}\n')
    assert link_closes and link_closes[0][0] == codes.CLOSE_PROTOCOL_ERROR


def test_frames_before_hello_close_the_link():
    hub = Hub()
    closes: list[tuple[int, str]] = []
    node = NodeLink("n", lambda d: None, lambda c, r: closes.append((c, r)), hub, Clock())
    node.message_received(link.encode({"t": "open", "c": 1, "agent": "a-1"}))
    assert closes and "first link message must be hello" in closes[0][1]


def test_link_loss_ends_every_session_and_the_node_closes_its_agents():
    clock, hub, relay, node, _ = _pair()
    conn = AgentConn()
    conn.relay_conn = relay.opened(conn, "a-1", "tcp4:1.2.3.4:5", {})
    relay.from_agent(conn.relay_conn, _hello())
    session = hub.opened[0]
    node.lost()
    assert session.state is SessionState.CLOSED and hub.closed == [session]
    relay.link_lost("server")
    assert conn.closed is not None and conn.closed[0] == codes.CLOSE_UPSTREAM_LOST
    assert relay.refusal() == (503, "this node has no link to its server now; try again later")


def test_node_is_full_at_its_maximum_and_a_server_close_reaches_the_agent():
    clock, hub, relay, node, _ = _pair()
    conns = [AgentConn(), AgentConn()]
    for i, conn in enumerate(conns):
        conn.relay_conn = relay.opened(conn, f"a-{i + 1}", "tcp4:1.2.3.4:5", {})
        relay.from_agent(conn.relay_conn, _hello())
    assert relay.refusal() == (503, "this node is full (2 clients)")
    hub.opened[0].close(codes.CLOSE_SUPERSEDED)
    clock.advance(0)
    assert conns[0].closed is not None and conns[0].closed[0] == codes.CLOSE_SUPERSEDED


def test_silent_agent_connections_are_swept():
    clock, _, relay, _, _ = _pair()
    conn = AgentConn()
    conn.relay_conn = relay.opened(conn, "a-1", "tcp4:1.2.3.4:5", {})
    conn.last_rx = 10.0
    relay.sweep(5.0)
    assert conn.closed is None
    relay.sweep(20.0)
    assert conn.closed is not None and conn.closed[0] == codes.CLOSE_KEEPALIVE


def test_session_errors_go_back_through_the_node():
    clock, hub, relay, node, _ = _pair()
    conn = AgentConn()
    conn.relay_conn = relay.opened(conn, "a-1", "tcp4:1.2.3.4:5", {})
    relay.from_agent(conn.relay_conn, b"not json")
    clock.advance(0)
    reply = json.loads(conn.frames[0])
    assert reply["type"] == "error" and reply["data"]["code"] == codes.ERR_MALFORMED


def test_messages_of_one_turn_leave_as_one_batch():
    clock = Clock()
    sent: list[bytes] = []
    writer = link.LinkWriter(sent.append, clock)
    writer.send({"t": "frame", "c": 1}, b"one")
    writer.send({"t": "close", "c": 2, "code": 4000, "reason": "x"})
    assert sent == []
    clock.advance(0)
    (frame,) = sent
    header, payload = link.decode(frame, link.SERVER_SENDS)
    assert header["t"] == "batch"
    parts = link.unbatch(header, payload, link.SERVER_SENDS)
    assert parts == [
        ({"t": "frame", "c": 1}, b"one"),
        ({"t": "close", "c": 2, "code": 4000, "reason": "x"}, b""),
    ]
    writer.send({"t": "frame", "c": 1}, b"alone")
    clock.advance(0)
    assert link.decode(sent[-1], link.SERVER_SENDS) == ({"t": "frame", "c": 1}, b"alone")


def test_a_full_batch_goes_at_once_and_bad_batches_are_refused():
    clock = Clock()
    sent: list[bytes] = []
    writer = link.LinkWriter(sent.append, clock, max_batch=100)
    writer.send({"t": "frame", "c": 1}, b"x" * 120)
    assert len(sent) == 1  # over the limit: not held for the end of the turn
    with pytest.raises(link.LinkError, match="add up"):
        link.decode(link.encode({"t": "batch", "n": [5]}, b"abc"), link.NODE_SENDS)
    inner = link.encode({"t": "batch", "n": [1]}, b"x")
    outer = link.encode({"t": "batch", "n": [len(inner)]}, inner)
    header, payload = link.decode(outer, link.NODE_SENDS)
    with pytest.raises(link.LinkError, match="unexpected"):
        link.unbatch(header, payload, link.NODE_SENDS)  # no batch inside a batch


def test_agents_awaiting_approval_are_refused_until_approved():
    clock = Clock()
    relay = GatewayRelay(clock, max_clients=5, upstreams=["up-a"])
    relay.links.up("up-a", object())  # a link is up
    name = "up-a"
    relay.set_pending(name, ["a-1", "a-2"], [], full=True)
    assert relay.refusal("a-1", name) == (403, "agent a-1 is awaiting approval")
    relay.set_pending(name, [], ["a-1"])
    assert relay.refusal("a-1", name) is None
    assert relay.refusal("a-2", name) == (403, "agent a-2 is awaiting approval")
    with pytest.raises(link.LinkError, match="approved"):
        link.decode(link.encode({"t": "pending", "agents": [], "approved": [1]}), link.SERVER_SENDS)


def test_a_relay_nodes_metrics_count_handshakes_by_kind_and_tokens_not_taken():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tcm.metrics import SnapshotCollector
    from tcm.relay.metrics import relay_families
    from tcm.tls.handshake import HandshakeLogger

    relay = TaskServerRelay(Clock(), max_clients=2)
    logger = HandshakeLogger(object())
    logger.completed.update({"full": 3, "token": 5})
    logger.tokens_refused["sealed with other keys"] = 2
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: relay_families("tcm_taskserver", relay, logger)))  # type: ignore[arg-type]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
    }
    kind = "tcm_taskserver_tls_handshakes_total"
    assert samples[(kind, (("kind", "full"),))] == 3
    assert samples[(kind, (("kind", "token"),))] == 5
    refused = ("tcm_taskserver_tls_tokens_refused_total", (("reason", "sealed with other keys"),))
    assert samples[refused] == 2
    # not listening yet: the families are there, empty
    quiet = list(relay_families("tcm_taskserver", relay, None))
    assert {f.name for f in quiet} >= {"tcm_taskserver_tls_handshakes"}
