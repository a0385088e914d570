"""Unit tests of an agent's task session through a gateway to a task server.

Three hops, no sockets, a Clock: the gateway's Relay -> (gateway link) -> the task server's
DownLink and Relay -> (task server link) -> the server's NodeLink, which runs the session.
The ends of each link are joined by plain functions that encode and decode every message.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from tcm.protocol import codes, link
from tcm.protocol.envelope import decode
from tcm.relay.downstream import DownLink
from tcm.relay.relays import GatewayRelay, TaskServerRelay
from tcm.relay.routing import wanted_task_server
from tcm.server.links import NodeLink
from tcm.server.nodes import TaskServerAssignments
from tcm.server.sessions import SessionState
from tests.test_relay_units import AgentConn, Hub, _hello


class Wire:
    """One direction of a link: what one end sends, the other receives (link-encoded)."""

    def __init__(self, receive: Any, allowed: frozenset[str]) -> None:
        self.receive = receive
        self.allowed = allowed
        self.sent: list[dict[str, Any]] = []

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.sent.append(header)
        data = link.encode(header, payload)
        outer, body = link.decode(data, self.allowed)
        for h, p in link.unbatch(outer, body, self.allowed):
            self.receive(h, p)


class Chain:
    """server <- ts1 <- gw1 <- agents, every hop a real link object of tcm's."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.hub = Hub()
        self.hub.known |= {"a-4"}
        # the task server and its link to the server
        self.ts = TaskServerRelay(self.clock, max_clients=3)
        self.ts.node_name = "ts1"
        self.ts.prepare = lambda payload: ("prepared-at-ts", payload)
        self.ts_link = NodeLink("ts1", self._to_ts, lambda c, r: None, self.hub, self.clock)
        self.ts_link.message_received(
            link.encode({"t": "hello", "name": "ts1", "role": "taskserver", "url": "wss://ts"})
        )
        self.clock.advance(0)
        # the gateway: a management server upstream "srv" and the task server upstream "ts"
        self.gw = GatewayRelay(
            self.clock,
            max_clients=10,
            upstreams=["srv", "ts"],
            task_server_upstreams=["ts"],
        )
        self.gw.prepare = lambda payload: ("prepared-at-gw", payload)
        self.srv_wire = Wire(lambda h, p: None, link.NODE_SENDS)  # the gateway -> its server
        assert self.gw.link_up("srv", self.srv_wire, "s1") is None
        self.link_closes: list[tuple[int, str]] = []
        self.down = DownLink(
            "gw1",
            "FP-GW1",
            self.ts,
            self._to_gateway,
            lambda c, r: self.link_closes.append((c, r)),
            self.clock,
        )
        self.gw_ts_wire = Wire(
            lambda h, p: self.down.message_received(link.encode(h, p)), link.NODE_SENDS
        )
        self.gw_ts_wire.send({"t": "hello", "name": "gw1", "role": "gateway", "url": "wss://gw"})
        self.clock.advance(0)

    def _to_ts(self, data: bytes) -> None:
        outer, body = link.decode(data, link.SERVER_SENDS)
        for header, payload in link.unbatch(outer, body, link.SERVER_SENDS):
            if header["t"] == "welcome":
                assert self.ts.link_up("server", self.ts_link_end, header["server"]) is None
            else:
                self.ts.from_server(header, payload)

    @property
    def ts_link_end(self) -> Wire:
        return Wire(lambda h, p: self.ts_link.message_received(link.encode(h, p)), link.NODE_SENDS)

    def _to_gateway(self, data: bytes) -> None:
        outer, body = link.decode(data, link.SERVER_SENDS)
        for header, payload in link.unbatch(outer, body, link.SERVER_SENDS):
            if header["t"] == "welcome":
                problem = self.gw.link_up(
                    "ts",
                    self.gw_ts_wire,
                    header.get("server"),
                    role=header.get("role", "server"),
                    node=header.get("node"),
                )
                assert problem is None
            else:
                self.gw.from_server(header, payload, "ts")

    def agent(self, agent_id: str, resume: dict[str, Any] | None = None) -> AgentConn:
        """An agent's task session at /taskserver/ts1/task/v1/ws of the gateway (`resume`:
        the token the gateway sealed for its connection)."""
        upstream, refusal = self.gw.routing.route_task_server("s1", "ts1")
        assert refusal is None and upstream == "ts"
        assert self.gw.refusal(agent_id, upstream) is None
        conn = AgentConn()
        conn.agent_id = agent_id  # type: ignore[attr-defined]
        conn.relay_conn = self.gw.opened(
            conn, agent_id, "tcp4:10.1.1.1:999", {}, upstream, "task", resume=resume
        )
        self.clock.advance(0)
        self.gw.from_agent(conn.relay_conn, _hello())
        self.clock.advance(0)
        return conn


def test_a_task_session_crosses_gateway_and_task_server_and_a_push_crosses_each_link_once():
    chain = Chain()
    assert chain.ts.server_name == "s1" and chain.ts.gateways.allowed == {"gw1": "FP-GW1"}
    # the gateway told its server that it reaches task server ts1
    assert {"t": "reach", "task_servers": ["ts1"]} in chain.srv_wire.sent
    agents = [chain.agent(a) for a in ("a-1", "a-2")]
    sessions = chain.hub.opened
    assert [s.agent_id for s in sessions] == ["a-1", "a-2"]
    assert all(s.channel == "task" and s.route is chain.ts_link for s in sessions)
    assert sessions[0].via == "taskserver:ts1 via gateway:gw1"
    assert decode(agents[0].frames[0], 0).type == "welcome"
    assert chain.ts.sessions_per_upstream() == {"server": 2}
    assert chain.gw.sessions_per_upstream() == {"srv": 0, "ts": 2}

    chain.ts_link.deliver(b'{"frame":1}', sessions)
    chain.clock.advance(0)
    chain.clock.advance(0)
    assert chain.ts_link.pushes == 1  # server -> task server: once
    assert chain.down.pushes == 1  # task server -> gateway: once
    for a in agents:  # framed once at the gateway, sent to each agent
        assert a.prepared == [("prepared-at-gw", b'{"frame":1}')]
    # an agent's frames go up both links to its session; the answer comes back down
    chain.gw.from_agent(agents[0].relay_conn, b"not json")
    chain.clock.advance(0)
    chain.clock.advance(0)
    assert decode(agents[0].frames[-1], 0).type == "error"


def test_the_gateways_token_crosses_the_task_server_to_the_servers_welcome():
    from tcm.tls.resumption import Resumed, ResumptionKeys, issue_token

    chain = Chain()
    now = 1_800_000_000.0
    token = issue_token(
        ResumptionKeys(b"g" * 32), Resumed("a-1", "s1", "ab" * 32, now + 3600), "a-1", now
    )
    with_token, without = chain.agent("a-1", token), chain.agent("a-2")
    opens = [h for h in chain.gw_ts_wire.sent if h["t"] == "open"]
    assert [h.get("resume") for h in opens] == [token, None]  # gateway -> task server
    assert decode(with_token.frames[0], 0).data["resume"] == token  # ... -> server -> agent
    assert "resume" not in decode(without.frames[0], 0).data
    assert chain.ts_link._tokens == {}  # taken by the welcome


def test_closes_travel_both_ways():
    chain = Chain()
    a1, a2 = chain.agent("a-1"), chain.agent("a-2")
    s1, s2 = chain.hub.opened
    # the server closes a session: the close reaches the agent at the gateway
    s1.close(codes.CLOSE_SUPERSEDED)
    chain.clock.advance(0)
    chain.clock.advance(0)
    assert a1.closed is not None and a1.closed[0] == codes.CLOSE_SUPERSEDED
    # the agent goes away at the gateway: its session at the server ends
    chain.gw.closed(a2.relay_conn)
    chain.clock.advance(0)
    chain.clock.advance(0)
    assert s2.state is SessionState.CLOSED
    # (a1's connection waits for the gateway to say it is closed; a2's is gone everywhere)
    assert list(chain.down.agents) == [a1.relay_conn]
    assert chain.ts.sessions_per_upstream() == {"server": 1}


def test_losing_the_gateway_link_ends_its_sessions_and_is_told_to_the_server():
    chain = Chain()
    a1 = chain.agent("a-1")
    (session,) = chain.hub.opened
    # at the gateway: the task sessions through ts1 are closed (4010), reach goes empty
    chain.gw.link_lost("ts", chain.gw_ts_wire)
    assert a1.closed is not None and a1.closed[0] == codes.CLOSE_UPSTREAM_LOST
    assert chain.srv_wire.sent[-1] == {"t": "reach", "task_servers": []}
    assert chain.gw.routing.route_task_server("s1", "ts1")[1][0] == 503
    # at the task server: the gateway's connections are gone, their sessions too
    chain.down.lost()
    chain.clock.advance(0)
    assert session.state is SessionState.CLOSED
    assert len(chain.ts.conns) == 0 and chain.ts.gateways.links == {}


def test_a_task_server_that_lost_its_server_closes_the_gateways_agents_with_4010():
    chain = Chain()
    a1 = chain.agent("a-1")
    chain.ts.link_lost("server")
    chain.clock.advance(0)
    assert a1.closed is not None and a1.closed[0] == codes.CLOSE_UPSTREAM_LOST
    # and refuses what the gateway opens now, with the reason
    conn = AgentConn()
    conn.relay_conn = chain.gw.opened(conn, "a-2", "tcp4:1.1.1.1:1", {}, "ts", "task")
    chain.clock.advance(0)
    assert conn.closed == (
        codes.CLOSE_UPSTREAM_LOST,
        "this node has no link to its server now; try again later",
    )


def test_a_full_task_server_refuses_a_carried_agent_with_a_reason():
    chain = Chain()
    for a in ("a-1", "a-2", "a-3"):
        chain.agent(a)
    conn = AgentConn()
    conn.relay_conn = chain.gw.opened(conn, "a-4", "tcp4:1.1.1.1:1", {}, "ts", "task")
    chain.clock.advance(0)
    assert conn.closed == (codes.CLOSE_DRAIN, "this node is full (3 clients)")
    assert chain.ts.counters.refused == {"full": 1}


def test_a_gateway_the_server_stops_naming_is_cut_off():
    chain = Chain()
    chain.agent("a-1")
    chain.ts.gateways.set_allowed({"gw2": "FP-GW2"})
    assert chain.link_closes and chain.link_closes[0][0] == codes.CLOSE_UNAUTHORIZED
    assert "gw1 is not registered" in chain.link_closes[0][1]
    # a new fingerprint for the same name (re-enrolled) cuts the old link off too
    chain2 = Chain()
    chain2.ts.gateways.set_allowed({"gw1": "FP-OTHER"})
    assert chain2.link_closes[0][0] == codes.CLOSE_UNAUTHORIZED


def test_routing_at_the_gateway_refuses_with_reasons():
    chain = Chain()
    assert wanted_task_server("/taskserver/ts1/task/v1/ws") == "ts1"
    assert wanted_task_server(b"/agent/v1/ws") is None
    assert chain.gw.routing.route_task_server("s1", "ts9") == (
        None,
        (503, "task server 'ts9' is not reachable from here now"),
    )
    status, why = chain.gw.routing.route_task_server("s2", "ts1")[1]
    assert status == 403 and "serves server 's1', not this agent's 's2'" in why
    # an enrollment URL cannot name a task server upstream
    assert chain.gw.routing.route(None, "ts")[1] == (
        404,
        "upstream 'ts' is a task server, not a server",
    )
    # the agents' own sessions and HTTPS calls still go to the management server
    assert chain.gw.routing.route("s1") == ("srv", None)


def test_the_servers_revoked_and_pending_lists_apply_to_task_sessions():
    chain = Chain()
    a1 = chain.agent("a-1")
    chain.gw.set_pending("srv", ["a-3"], [], full=True)
    assert chain.gw.refusal("a-3", "ts") == (403, "agent a-3 is awaiting approval")
    assert chain.gw.revoke("srv", ["a-1"]) == 1
    assert a1.closed is not None and a1.closed[0] == codes.CLOSE_REVOKED
    assert chain.gw.refusal("a-1", "ts") == (403, "agent a-1 is revoked")


def test_an_upstream_of_the_wrong_kind_is_refused_with_the_fix():
    clock = Clock()
    gw = GatewayRelay(clock, 5, ["srv", "ts"], task_server_upstreams=["ts"])
    why = gw.link_up("srv", object(), "s1", role="taskserver", node="ts1")
    assert why is not None and "is task server 'ts1', not a management server" in why
    why = gw.link_up("ts", object(), "s1", role="server")
    assert why is not None and "--upstream-token ts=TOKEN" in why
    # a task server's own relay (no task server upstreams) never announces reach
    ts = TaskServerRelay(clock, 5)
    wire = Wire(lambda h, p: None, link.NODE_SENDS)
    assert ts.link_up("server", wire, "s1") is None
    assert wire.sent == []


def test_a_gateway_may_not_send_requests_or_reach_to_a_task_server():
    chain = Chain()
    chain.gw_ts_wire.send({"t": "request", "r": 1, "agent": "a-1"}, b"{}")
    assert chain.link_closes[-1][0] == codes.CLOSE_PROTOCOL_ERROR
    assert "does not carry agent API calls" in chain.link_closes[-1][1]


def test_only_a_gateway_says_what_it_reaches_and_reach_and_nodes_are_checked():
    chain = Chain()
    closes: list[tuple[int, str]] = []
    chain.ts_link._close = lambda c, r: closes.append((c, r))
    chain.ts_link.message_received(link.encode({"t": "reach", "task_servers": ["x"]}))
    assert closes and "only a gateway" in closes[0][1]
    with pytest.raises(link.LinkError, match="task server names"):
        link.decode(link.encode({"t": "reach", "task_servers": [1]}), link.NODE_SENDS)
    with pytest.raises(link.LinkError, match="name: fingerprint"):
        link.decode(link.encode({"t": "nodes", "gateways": ["gw1"]}), link.SERVER_SENDS)


def test_assignment_among_the_task_servers_a_gateway_reaches():
    a = TaskServerAssignments("fewest")
    for name in ("ts1", "ts2", "ts3"):
        a.up(name, f"wss://{name}", 2)
    assert a.assign("x", among=["ts2", "ts3"]) == ("ts2", "assigned by policy 'fewest'")
    assert a.assign("y", among=["ts2", "ts3"])[0] == "ts3"
    assert a.assign("x", among=["ts2", "ts3"]) == ("ts2", "assigned")  # kept
    # its gateway no longer reaches ts2: moved, and ts2's count given back
    assert a.assign("x", among=["ts3"])[0] == "ts3"
    assert a.counts == {"ts1": 0, "ts2": 0, "ts3": 2}
    assert a.assign("z", among=["ts3"]) == (None, "all 1 task servers reachable are full")
    assert a.assign("z")[0] == "ts1"
