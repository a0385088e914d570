"""Unit tests of the relay's parts, each alone: the connection table, upstream links and the
gateway's routing, access lists, pending requests, counters; and of the two relays' message
tables. No sockets, time is a Clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from tcm.protocol import codes, link
from tcm.relay.access import AccessLists
from tcm.relay.connections import ConnectionTable
from tcm.relay.counters import RelayCounters, refusal_label
from tcm.relay.gatewaylinks import GatewayLinks
from tcm.relay.relays import GatewayRelay, TaskServerRelay
from tcm.relay.requests import PendingRequests, RequestLost, RequestTimedOut
from tcm.relay.routing import GatewayRouting, UpstreamLinks


class Conn:
    """An agent connection as the relay sees it."""

    down = None

    def __init__(self, agent_id: str = "a-1") -> None:
        self.agent_id = agent_id
        self.relay_conn: int | None = None
        self.relay_upstream: str | None = None
        self.last_rx = 0.0
        self.frames: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.frames.append(payload)

    def sendClose(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)


class Link:
    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], bytes]] = []

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.sent.append((header, payload))


# -- the connection table ----------------------------------------------------------------------


def test_connections_are_numbered_once_and_belong_to_their_upstream():
    table = ConnectionTable("a")
    first, second, third = Conn(), Conn(), Conn()
    assert table.add(first, "a") == 1
    assert table.add(second, "b") == 2
    assert second.relay_upstream == "b"
    assert table.pop(1) is first
    assert table.add(third, "a") == 3  # numbers are never reused
    assert table.of(2, "b") is second
    assert table.of(2, "a") is None  # a server speaks only for its own agents
    assert table.on("a") == [3] and len(table) == 2
    assert table.per_upstream(["a", "b", "c"]) == {"a": 1, "b": 1, "c": 0}
    assert table.pop(1) is None and table.get(9) is None
    for conn in table:  # iterating over a copy: a close may remove connections
        table.pop(conn.relay_conn or 0)


# -- upstream links and the gateway's routing --------------------------------------------------


def test_upstream_links_ignore_the_loss_of_a_replaced_link():
    links = UpstreamLinks(["a", "b"])
    assert links.default == "a" and links.get("a") is None
    old, new = object(), object()
    links.up("a", old)
    links.up("a", new)
    assert links.down("a", old) is False and links.get("a") is new
    assert links.down("a", new) is True and not links.is_up("a")
    with pytest.raises(ValueError):
        UpstreamLinks([])


def test_routing_by_the_server_named_in_the_certificate():
    links = UpstreamLinks(["a", "b", "ts"])
    routing = GatewayRouting(links, ["ts"])
    assert routing.accept("a", "s-a", "server", None) is None
    links.up("a", object())
    assert routing.route("s-a") == ("a", None)
    # b is not linked yet: an unknown server may be behind it
    assert routing.route("s-b")[1] == (503, "server 's-b' is not reachable now; try again later")
    assert (
        routing.accept("b", "s-a", "server", None)
        == "upstreams 'a' and 'b' both lead to server 's-a'"
    )
    assert routing.accept("b", "s-b", "server", None) is None
    links.up("b", object())
    assert routing.route("s-b") == ("b", None)
    assert routing.route("s-c")[1][0] == 503  # the task server upstream is down
    assert routing.accept("ts", "s-b", "taskserver", "ts1") is None
    links.up("ts", object())
    assert routing.route("s-c")[1] == (403, "no upstream of this gateway leads to server 's-c'")
    assert routing.route_task_server("s-b", "ts1") == ("ts", None)
    assert routing.route_task_server("s-a", "ts1")[1][0] == 403
    assert routing.lists_of("ts") == "b" and routing.lists_of("a") == "a"
    assert routing.reach() == {"a": [], "b": ["ts1"]}
    assert routing.reach(only="a") == {"a": []}
    links.down("ts")
    assert routing.forget("ts") is True and routing.forget("a") is False
    assert routing.reach() == {"a": [], "b": []}
    assert routing.route_task_server("s-b", "ts1")[1][0] == 503


def test_a_gateway_with_one_server_routes_every_agent_there():
    routing = GatewayRouting(UpstreamLinks(["only", "ts"]), ["ts"])
    assert routing.route(None) == ("only", None)
    assert routing.route("whoever") == ("only", None)
    assert routing.reach() == {}  # not linked: nothing to tell


# -- access lists ----------------------------------------------------------------------------


def test_access_lists_per_upstream():
    access = AccessLists()
    assert access.revoke("a", ["x", "y"], full=True) == {"x", "y"}
    access.revoke("a", ["z"])
    assert access.revoked_count("a") == 3 and access.revoked_count("b") == 0
    assert access.refusal("z", "a") == (403, "agent z is revoked")
    assert access.refusal("z", "b") is None  # another server's agent of the same id
    access.set_pending("b", ["p", "q"], [], full=True)
    access.set_pending("b", ["r"], ["p"])
    assert access.refusal("p", "b") is None
    assert access.refusal("q", "b") == (403, "agent q is awaiting approval")
    access.set_pending("b", ["s"], [], full=True)
    assert access.refusal("q", "b") is None and access.refusal(None, "b") is None


# -- pending requests -------------------------------------------------------------------------


def test_pending_requests_end_answered_lost_cancelled_or_timed_out():
    clock = Clock()
    pending = PendingRequests(clock, timeout=60)
    r1, d1 = pending.start("a")
    r2, d2 = pending.start("b")
    r3, d3 = pending.start("a")
    r4, d4 = pending.start("a")
    assert (r1, r2, r3, r4) == (1, 2, 3, 4)
    got: list[Any] = []
    d1.addCallback(got.append)
    assert pending.answer(r1, "b", b"x") is False  # not b's call
    assert pending.answer(r1, "a", b"answer") is True and got == [b"answer"]
    assert pending.answer(r1, "a", b"again") is False
    d3.addErrback(lambda f: got.append(f.check(CancelledError)))
    d3.cancel()  # the agent went away
    assert pending.answer(r3, "a", b"late") is False
    d2.addErrback(lambda f: got.append(f.check(RequestLost)))
    assert pending.lose("b") == 1
    assert got[1:] == [CancelledError, RequestLost] and len(pending) == 1
    d4.addErrback(lambda f: got.append(f.value))
    clock.advance(60)
    assert isinstance(got[-1], RequestTimedOut) and "60 s" in str(got[-1])
    assert len(pending) == 0 and clock.getDelayedCalls() == []


# -- counters ---------------------------------------------------------------------------------


def test_counters_count_frames_bytes_pushes_and_refusals():
    counters = RelayCounters()
    fanout: list[int] = []
    counters.fanout = fanout.append
    counters.to_server(b"abc")
    counters.to_agents(b"de")
    counters.pushed(b"xyz", 4)
    counters.refused_for("full")
    counters.refused_for("full")
    assert (counters.frames_in, counters.bytes_in) == (1, 3)
    assert (counters.frames_out, counters.bytes_out, counters.pushes) == (5, 14, 1)
    assert fanout == [4] and counters.refused == {"full": 2}
    assert refusal_label((403, "agent a-1 is revoked")) == "revoked"
    assert refusal_label((404, "no upstream 'x' at this gateway")) == "http_404"


# -- a task server's gateways ------------------------------------------------------------------


class Down:
    def __init__(self, name: str, fingerprint: str, worker: int | None = None) -> None:
        self.name, self.fingerprint = name, fingerprint
        self.key = name if worker is None else f"{name}/{worker}"
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_gateway_links_admitted_by_the_servers_list():
    gateways = GatewayLinks()
    assert gateways.refusal("gw1", "FP")[0] == 503  # not told yet
    gateways.set_allowed({"gw1": "FP"})
    assert gateways.refusal("gw1", "FP") is None
    assert "other than the one it enrolled" in gateways.refusal("gw1", "FP2")[1]  # type: ignore[index]
    assert "not registered" in gateways.refusal("gw2", "FP")[1]  # type: ignore[index]
    old, new, worker = Down("gw1", "FP"), Down("gw1", "FP"), Down("gw1", "FP", 1)
    gateways.attach(old)
    gateways.attach(worker)
    gateways.attach(new)
    assert old.closed is not None and old.closed[0] == codes.CLOSE_SUPERSEDED
    gateways.detach(old)  # the replaced link's loss leaves the new one
    assert gateways.links == {"gw1": new, "gw1/1": worker}
    gateways.set_allowed({})
    assert new.closed == (codes.CLOSE_UNAUTHORIZED, "gateway gw1 is not registered now")


def test_a_renewed_gateways_old_certificate_stays_accepted_until_it_renews_again():
    gateways = GatewayLinks()
    gateways.set_allowed({"gw1": "FP1"})
    live = Down("gw1", "FP1")
    gateways.attach(live)
    gateways.set_allowed({"gw1": "FP2"}, {"gw1": "FP1"})  # gw1 renewed: FP1 -> FP2
    assert live.closed is None  # the link made with the old certificate goes on
    assert gateways.refusal("gw1", "FP1") is None and gateways.refusal("gw1", "FP2") is None
    gateways.set_allowed({"gw1": "FP3"}, {"gw1": "FP2"})  # and again: FP1 is done
    assert live.closed == (codes.CLOSE_UNAUTHORIZED, "gateway gw1 is not registered now")
    assert "other than the one it enrolled" in gateways.refusal("gw1", "FP1")[1]  # type: ignore[index]
    assert gateways.refusal("gw1", None)[0] == 403  # type: ignore[index]


# -- the two relays' message tables ------------------------------------------------------------


def test_each_relay_takes_only_the_server_messages_of_its_role():
    clock = Clock()
    ts = TaskServerRelay(clock, 5)
    gw = GatewayRelay(clock, 5, ["a"])
    assert set(ts._HANDLERS) | set(gw._HANDLERS) | {"welcome", "batch"} == link.SERVER_SENDS
    with pytest.raises(link.LinkError, match="a task server does not take link message 'revoked'"):
        ts.from_server({"t": "revoked", "agents": ["x"]}, b"")
    with pytest.raises(link.LinkError, match="a gateway does not take link message 'nodes'"):
        gw.from_server({"t": "nodes", "gateways": {}}, b"")
    ts.from_server({"t": "nodes", "gateways": {"gw1": "FP"}}, b"")
    assert ts.gateways.allowed == {"gw1": "FP"}
    ts.from_server({"t": "nodes", "gateways": {"gw1": "FP2"}, "previous": {"gw1": "FP"}}, b"")
    assert ts.gateways.previous == {"gw1": "FP"}
    bad = link.encode({"t": "nodes", "gateways": {}, "previous": ["FP"]})
    with pytest.raises(link.LinkError, match="'previous' is"):
        link.decode(bad, link.SERVER_SENDS)
    gw.from_server({"t": "revoked", "agents": ["x"], "full": True}, b"", "a")
    assert gw.access.revoked == {"a": {"x"}}


def test_a_gateway_relay_answers_its_calls_and_fails_them_when_the_link_goes():
    clock = Clock()
    gw = GatewayRelay(clock, 5, ["a"], request_timeout=10)
    up = Link()
    assert gw.link_up("a", up, "s-a") is None
    assert gw.admit_call("x", "s-a", None) == ("a", None)
    got: list[Any] = []
    gw.request("a", "x", "tcp4:1.2.3.4:5", b"env").addBoth(got.append)
    ((header, payload),) = up.sent
    assert header == {"t": "request", "r": 1, "agent": "x", "peer": "tcp4:1.2.3.4:5"}
    gw.from_server({"t": "response", "r": 1}, b"reply", "a")
    assert got == [b"reply"] and gw.counters.frames_out == 1
    gw.request("a", "x", "p", b"env").addErrback(got.append)
    conn = Conn("x")
    conn.relay_conn = gw.opened(conn, "x", "p", {}, "a")
    gw.link_lost("a", up)
    assert got[-1].check(RequestLost) and conn.closed is not None
    assert conn.closed[0] == codes.CLOSE_UPSTREAM_LOST and len(gw.conns) == 0
    assert gw.admit_call("x", "s-a", None)[1][0] == 503


def test_an_https_call_the_server_never_answers_gets_504_at_the_timeout():
    import io
    import json

    from twisted.web.server import NOT_DONE_YET
    from twisted.web.test.requesthelper import DummyChannel, DummyRequest

    from tcm.gateway.forward import AgentApiForwarder
    from tcm.relay.requests import REQUEST_TIMEOUT

    assert f"unanswered for {REQUEST_TIMEOUT:g} s" in " ".join(
        (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text().split()
    )
    clock = Clock()
    gw = GatewayRelay(clock, 5, ["a"])
    up = Link()
    gw.link_up("a", up, "s-a")
    forward = AgentApiForwarder(gw, wanted="a")
    request = DummyRequest([b"agent", b"v1", b"enroll"])
    request.method = b"POST"
    request.uri = b"/upstream/a/agent/v1/enroll"
    request.content = io.BytesIO(b"{}")
    request.channel = DummyChannel()  # a connection without a client certificate (enrollment)
    assert forward.render(request) is NOT_DONE_YET
    assert [h["t"] for h, _ in up.sent] == ["request"]
    clock.advance(REQUEST_TIMEOUT - 1)
    assert request.finished == 0
    clock.advance(1)
    assert request.responseCode == 504
    assert "did not answer within 330 s" in json.loads(b"".join(request.written))["error"]
    assert len(gw.requests) == 0
