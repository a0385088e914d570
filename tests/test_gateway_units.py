"""Unit tests of the gateway's parts: routing by certificate, revocation, HTTPS calls over the
link, drain, the agent's choice of destination, JSON logs. No sockets: the server's NodeLink
and the gateway's Relay are joined back to back as in test_relay_units, time is a Clock."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

from tcm.agent.gateways import Destinations, RotatingEndpoint, ws_url
from tcm.logs import JsonLineObserver
from tcm.protocol import codes, link
from tcm.protocol.envelope import Envelope, decode, encode
from tcm.relay.relays import GatewayRelay
from tcm.relay.requests import RequestLost
from tcm.relay.routing import wanted_upstream
from tcm.server.links import NodeLink
from tcm.tls.resumption import Resumed, ResumptionKeys, issue_token, read_token_message
from tests.test_relay_units import AgentConn, Hub, Upstream, _hello


class Conn(AgentConn):
    def __init__(self, agent_id: str) -> None:
        super().__init__()
        self.agent_id = agent_id


def _gateway(names=("up-a", "up-b")):
    """A gateway relay with a server NodeLink (a Hub) behind each upstream."""
    clock = Clock()
    relay = GatewayRelay(clock, max_clients=10, upstreams=list(names))
    relay.prepare = lambda payload: ("prepared", payload)
    hubs: dict[str, Hub] = {}
    nodes: dict[str, NodeLink] = {}
    for i, name in enumerate(names):
        hub = hubs[name] = Hub()
        hub.server_name = f"server-{i}"  # type: ignore[misc]

        def to_node(data: bytes, name=name, hub=hub) -> None:
            header, payload = link.decode(data, link.SERVER_SENDS)
            if header["t"] == "welcome":
                assert relay.link_up(name, Upstream(nodes[name]), header["server"]) is None
            else:
                relay.from_server(header, payload, name)

        # max_batch=0: each link message leaves at once (batching: test_relay_units.py)
        nodes[name] = NodeLink(name, to_node, lambda c, r: None, hub, clock, max_batch=0)
        nodes[name].message_received(
            link.encode({"t": "hello", "name": "gw1", "role": "gateway", "url": "wss://gw"})
        )
    return clock, relay, hubs, nodes


def test_agents_are_routed_by_the_server_in_their_certificate():
    _, relay, hubs, nodes = _gateway()
    assert relay.routing.route("server-1") == ("up-b", None)
    assert relay.routing.route("server-0") == ("up-a", None)
    status, why = relay.routing.route(None)[1]
    assert status == 403 and "names no server" in why
    assert relay.routing.route("server-9")[1] == (
        403,
        "no upstream of this gateway leads to server 'server-9'",
    )
    assert relay.routing.route(None, "up-b") == ("up-b", None)  # enrollment: named in the URL
    assert relay.routing.route(None, "nope")[1][0] == 404
    assert "belongs to server" in relay.routing.route("server-0", "up-b")[1][1]

    a, b = Conn("a-1"), Conn("a-2")
    a.relay_conn = relay.opened(a, "a-1", "tcp4:1.2.3.4:5", {}, "up-a", "core")
    b.relay_conn = relay.opened(b, "a-2", "tcp4:1.2.3.4:6", {}, "up-b", "task")
    relay.from_agent(a.relay_conn, _hello())
    relay.from_agent(b.relay_conn, _hello())
    # a gateway's link takes the channel from `open`: a core session and a task session
    assert [(s.agent_id, s.channel) for s in hubs["up-a"].opened] == [("a-1", "core")]
    assert [(s.agent_id, s.channel) for s in hubs["up-b"].opened] == [("a-2", "task")]
    assert relay.sessions_per_upstream() == {"up-a": 1, "up-b": 1}
    # a server speaks only for its own agents: up-b cannot write to up-a's connection
    relay.from_server({"t": "frame", "c": a.relay_conn}, b"intruder", "up-b")
    assert b"intruder" not in a.frames
    # a push crosses the link once, is framed once, fans out here
    sizes: list[int] = []
    relay.counters.fanout = sizes.append
    nodes["up-a"].deliver(b'{"x":1}', hubs["up-a"].opened * 2)
    assert sizes == [2] and relay.counters.pushes == 1


def test_a_server_refuses_core_sessions_through_a_gateway_when_persistent_is_off():
    _, relay, hubs, _ = _gateway(("up-a",))
    hubs["up-a"].persistent = False
    conn = Conn("a-1")
    relay.opened(conn, "a-1", "tcp4:1.2.3.4:5", {}, "up-a", "core")
    assert conn.closed == (
        codes.CLOSE_PERSISTENT_OFF,
        codes.CLOSE_REASONS[codes.CLOSE_PERSISTENT_OFF],
    )


def test_revoked_agents_are_refused_and_their_sessions_closed():
    _, relay, hubs, nodes = _gateway()
    live = Conn("a-1")
    live.relay_conn = relay.opened(live, "a-1", "tcp4:1.2.3.4:5", {}, "up-a", "core")
    other = Conn("a-1")  # the same id at the other server is another agent: untouched
    other.relay_conn = relay.opened(other, "a-1", "tcp4:1.2.3.4:6", {}, "up-b", "core")
    nodes["up-a"].revoked(["a-1"])
    assert live.closed == (codes.CLOSE_REVOKED, codes.CLOSE_REASONS[codes.CLOSE_REVOKED])
    assert other.closed is None
    assert relay.refusal("a-1", "up-a") == (403, "agent a-1 is revoked")
    assert relay.refusal("a-1", "up-b") is None


def test_the_revoked_list_comes_with_the_welcome():
    hub = Hub()
    hub.revoked = ["a-3"]
    raw: list[bytes] = []
    clock = Clock()
    node = NodeLink("gw", raw.append, print, hub, clock)
    node.message_received(link.encode({"t": "hello", "name": "gw", "role": "gateway", "url": "x"}))
    clock.advance(0)  # the welcome and the lists leave together, as one batch
    (frame,) = raw
    header, payload = link.decode(frame, link.SERVER_SENDS)
    sent = [h for h, _ in link.unbatch(header, payload, link.SERVER_SENDS)]
    assert sent[0]["t"] == "welcome" and sent[0]["server"] == "s1"
    assert sent[1] == {"t": "revoked", "agents": ["a-3"], "full": True}
    assert sent[2] == {"t": "pending", "agents": [], "full": True}


def test_https_calls_cross_the_link_as_request_envelopes():
    _, relay, _, _ = _gateway(("up-a",))
    env = encode(Envelope(type="request", data={"method": "GET", "path": "/agent/v1/whoami"}))
    got: list[bytes] = []
    relay.request("up-a", "a-1", "tcp4:1.2.3.4:5", env).addCallback(got.append)
    reply = decode(got[0], 0)
    assert reply.type == "response" and reply.data == {"status": 200, "body": {"agent": "a-1"}}


def test_a_lost_link_fails_its_pending_calls_and_closes_its_agents():
    _, relay, _, _ = _gateway()
    relay.links.up("up-a", type("Silent", (), {"send": lambda self, h, p=b"": None})())
    failures: list[Any] = []
    env = encode(Envelope(type="request", data={"method": "GET", "path": "/agent/v1/work?wait=30"}))
    relay.request("up-a", "a-1", "p", env).addErrback(failures.append)
    conn = Conn("a-2")
    conn.relay_conn = relay.opened(conn, "a-2", "p", {}, "up-b", "core")
    relay.link_lost("up-a")
    assert failures and failures[0].check(RequestLost)
    assert conn.closed is None  # up-b's agents stay
    assert relay.refusal("a-1", "up-a")[0] == 503


def test_bad_link_requests_are_refused():
    with pytest.raises(link.LinkError, match="'agent' must be"):
        link.decode(b'{"t":"request","r":1,"agent":5}\n', link.NODE_SENDS)
    with pytest.raises(link.LinkError, match="channel"):
        link.decode(b'{"t":"open","c":1,"agent":"a","channel":"video"}\n', link.NODE_SENDS)
    with pytest.raises(link.LinkError, match="list of agent ids"):
        link.decode(b'{"t":"revoked","agents":"a-1"}\n', link.SERVER_SENDS)
    _, relay, hubs, nodes = _gateway(("up-a",))
    closes: list[tuple[int, str]] = []
    nodes["up-a"]._close = lambda c, r: closes.append((c, r))
    nodes["up-a"].message_received(link.encode({"t": "request", "r": 1, "agent": "a-1"}, b"nope"))
    assert closes and closes[0][0] == codes.CLOSE_PROTOCOL_ERROR


def test_drain_refuses_new_agents_and_tells_the_others_to_go():
    _, relay, _, _ = _gateway(("up-a",))
    conn = Conn("a-1")
    conn.relay_conn = relay.opened(conn, "a-1", "p", {}, "up-a", "core")
    assert relay.drain() == 1
    assert conn.closed == (codes.CLOSE_DRAIN, codes.CLOSE_REASONS[codes.CLOSE_DRAIN])
    assert relay.refusal("a-2", "up-a") == (503, "this node is draining; reconnect elsewhere")


def test_upstream_named_in_the_path():
    assert wanted_upstream(b"/upstream/up-a/agent/v1/ws") == "up-a"
    assert wanted_upstream("/agent/v1/ws") is None
    assert wanted_upstream("/upstream//agent") is None


# -- the agent's destinations -----------------------------------------------------------


def test_destinations_prefer_the_server_and_rotate_through_gateways():
    d = Destinations(["https://srv:1", "https://gw1:2/", "https://gw2:3", "https://gw1:2"])
    assert d.urls == ["https://srv:1", "https://gw1:2", "https://gw2:3"]
    d.move_on("unreachable")
    assert d.current == "https://gw1:2"
    d.session_ended(codes.CLOSE_DRAIN)  # a draining gateway: the next one
    assert d.current == "https://gw2:3"
    d.session_ended(codes.CLOSE_UPSTREAM_LOST)
    assert d.current == "https://srv:1"  # round again
    d.move_on("x")
    d.session_ended(1006)  # any other end: the direct connection is preferred again
    assert d.current == "https://srv:1"
    with pytest.raises(ValueError):
        Destinations([])


def test_rotating_endpoint_follows_the_destination():
    from twisted.internet.defer import fail

    d = Destinations(["https://srv:1", "https://gw:2"])
    switched: list[str] = []
    attempts: list[str] = []

    class Endpoint:
        def __init__(self, url: str) -> None:
            self.url = url

        def connect(self, factory):
            attempts.append(self.url)
            if self.url == "https://srv:1":
                return fail(ConnectionRefusedError("down"))
            return succeed("proto")

    rotating = RotatingEndpoint(d, Endpoint, switched.append)
    rotating.connect(None).addErrback(lambda f: None)
    got: list[Any] = []
    rotating.connect(None).addCallback(got.append)
    assert attempts == ["https://srv:1", "https://gw:2"] and got == ["proto"]
    assert switched == ["https://srv:1", "https://gw:2"]
    assert ws_url("https://gw:2/upstream/up-a") == "wss://gw:2/upstream/up-a/agent/v1/ws"


# -- JSON logs ---------------------------------------------------------------------------------


def test_json_log_lines_carry_the_message_and_the_fields():
    stream = io.StringIO()
    log = Logger(namespace="tcm.test", observer=JsonLineObserver(stream))
    log.info("agent {agent} refused: {why}", agent="a-1", why="revoked", obj=object())
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("it broke")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "agent a-1 refused: revoked"
    assert first["agent"] == "a-1" and first["level"] == "info" and first["namespace"] == "tcm.test"
    assert "obj" not in first and first["time"].endswith("Z")
    assert second["level"] == "critical" and "ZeroDivisionError" in second["traceback"]


def test_worker_command_line_keeps_the_options_but_not_pid_and_log_files():
    from tcm.gateway.service import worker_argv

    argv = [
        "twistd",
        "--pidfile",
        "gw.pid",
        "--logfile=gw.log",
        "--logger",
        "tcm.logs.json_observer",
        "tcm-gateway",
        "--port",
        "8445",
        "--workers",
        "2",
        "--worker-index",
        "1",
    ]
    assert worker_argv(argv) == [
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "--logger",
        "tcm.logs.json_observer",
        "tcm-gateway",
        "--port",
        "8445",
        "--workers",
        "2",
    ]


def test_gateway_paths():
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyRequest

    from tcm.gateway.service import GatewayRoot

    relay = GatewayRelay(Clock(), 10, ["up-a", "up-b"])
    core_ws, task_ws = Resource(), Resource()
    root = GatewayRoot(relay, core_ws, task_ws, 1024)

    def child(path: str):
        parts = path.strip("/").split("/")
        request = DummyRequest([p.encode() for p in parts[1:]])
        request.channel = None
        return root.getChild(parts[0].encode(), request)

    assert child("/agent/v1/ws") is core_ws
    assert child("/task/v1/ws") is task_ws
    assert child("/upstream/up-b/agent/v1/ws") is core_ws
    assert child("/agent/v1/work") is root.forward
    assert child("/upstream/up-a/agent/v1/enroll") is root.named["up-a"]
    assert child("/upstream/nope/agent/v1/enroll") not in (root.forward, *root.named.values())
    assert child("/api/v1/status") not in (root.forward, core_ws, task_ws)
    assert child("/taskserver/ts1/task/v1/ws") is task_ws  # the edge routes it by name
    assert child("/taskserver/ts1/agent/v1/ws") not in (core_ws, task_ws)


def test_which_upstreams_are_task_servers_and_whose_identity_they_use(tmp_path):
    from twisted.python import usage

    from tcm.gateway.service import GatewayConfig, GatewayService
    from tcm.gateway.tap import Options

    def kinds(upstreams, tokens=(), servers=None):
        cfg = GatewayConfig(
            state_dir=str(tmp_path),
            upstreams=[(n, f"https://{n}:1") for n in upstreams],
            tokens={n: "x.y" for n in tokens},
            upstream_servers=servers or {},
        )
        return GatewayService(cfg, Clock())

    # a management server has a token (or an identity); the others are task servers
    gw = kinds(["alpha", "ts1", "beta", "ts2"], tokens=["alpha", "beta"], servers={"ts2": "beta"})
    assert sorted(gw.relay.routing.ts_names) == ["ts1", "ts2"]
    assert gw.identity_of("ts1") is gw.states["alpha"]  # the first management server's
    assert gw.identity_of("ts2") is gw.states["beta"]  # the one named
    assert gw.identity_of("beta") is gw.states["beta"]
    # alone and without a token, an upstream is a server that is not enrolled yet
    assert kinds(["alpha"]).relay.routing.ts_names == set()
    # the options say what is wrong
    for argv, why in (
        (["--upstream-server", "ts1"], "wants TS=NAME"),
        (["--upstream-server", "ts1=nope"], "names unknown upstream ['nope']"),
    ):
        opts = Options()
        with pytest.raises(usage.UsageError, match=re.escape(why)):
            opts.parseOptions(
                [
                    "--state-dir",
                    str(tmp_path),
                    "--upstream",
                    "a=https://a:1",
                    "--upstream",
                    "ts1=https://t:1",
                    *argv,
                ]
            )


def test_only_a_gateway_link_carries_https_calls():
    hub = Hub()
    closes: list[tuple[int, str]] = []
    node = NodeLink("ts1", lambda d: None, lambda c, r: closes.append((c, r)), hub, Clock())
    node.message_received(
        link.encode({"t": "hello", "name": "ts1", "role": "taskserver", "url": "x"})
    )
    env = encode(Envelope(type="request", data={"method": "GET", "path": "/agent/v1/whoami"}))
    node.message_received(link.encode({"t": "request", "r": 1, "agent": "a-1"}, env))
    assert closes == [(codes.CLOSE_PROTOCOL_ERROR, "only a gateway carries agents' HTTPS calls")]


def test_a_frame_for_a_connection_closed_meanwhile_is_dropped_quietly():
    """During a drain (or an agent's own close) the table may still name a connection whose
    close has begun: Autobahn refuses to send on it; the frame is dropped, not an error."""
    from autobahn.exception import Disconnected

    _, relay, _hubs, _nodes = _gateway()

    class Closing(Conn):
        def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
            raise Disconnected("closing")

        def sendPreparedMessage(self, prepared) -> None:
            raise Disconnected("closing")

    gone, live = Closing("a-1"), Conn("a-2")
    gone.relay_conn = relay.opened(gone, "a-1", "tcp4:1.2.3.4:5", {}, "up-a", "core")
    live.relay_conn = relay.opened(live, "a-2", "tcp4:1.2.3.4:6", {}, "up-a", "core")
    relay.from_server({"t": "frame", "c": gone.relay_conn}, b'{"x":1}', "up-a")
    relay.from_server({"t": "push", "c": [gone.relay_conn, live.relay_conn]}, b'{"y":2}', "up-a")
    assert live.prepared == [("prepared", b'{"y":2}')]


# -- resumption tokens: sealed where the agent's TLS ends (here), welcomed by the server ------

NOW = 1_800_000_000.0


def _welcome(conn: Conn) -> dict[str, Any]:
    [welcome] = [e for e in (decode(f, 1 << 20) for f in conn.frames) if e.type == "welcome"]
    return welcome.data


def test_the_token_the_gateway_seals_comes_back_in_the_servers_welcome_once():
    clock, relay, hubs, nodes = _gateway()
    keys = ResumptionKeys(b"g" * 32)  # the gateway's: the server never holds them
    peer = Resumed("a-1", "server-0", "ab" * 32, NOW + 86400)
    token = issue_token(keys, peer, "a-1", NOW)
    assert token is not None
    a = Conn("a-1")
    a.relay_conn = relay.opened(a, "a-1", "tcp4:1.2.3.4:5", {}, "up-a", "core", resume=token)
    node = nodes["up-a"]
    assert node._tokens == {a.relay_conn: token}  # held until the welcome
    relay.from_agent(a.relay_conn, _hello())
    resume = _welcome(a)["resume"]
    assert resume == token
    identity, psk, lifetime = read_token_message(resume)  # what the agent keeps
    assert keys.open(identity, NOW + 60) == (peer, psk) and lifetime == 86400
    assert node._tokens == {}  # taken: a session holds no token after its welcome

    # a node that sends none (one of before, or without keys): a welcome without `resume`
    b = Conn("a-2")
    b.relay_conn = relay.opened(b, "a-2", "tcp4:1.2.3.4:6", {}, "up-a", "core")
    relay.from_agent(b.relay_conn, _hello())
    assert "resume" not in _welcome(b)

    # a connection gone before its hello leaves nothing behind, nor does a lost link
    c = Conn("a-3")
    c.relay_conn = relay.opened(c, "a-3", "tcp4:1.2.3.4:7", {}, "up-a", "core", resume=token)
    relay.closed(c.relay_conn)
    assert node._tokens == {}
    d = Conn("a-3")
    d.relay_conn = relay.opened(d, "a-3", "tcp4:1.2.3.4:8", {}, "up-a", "core", resume=token)
    node.lost()
    assert node._tokens == {}


def test_issue_token_gives_none_without_keys_peer_or_a_valid_certificate():
    keys = ResumptionKeys(b"g" * 32)
    peer = Resumed("a-1", "server-0", "ab" * 32, NOW + 86400)
    assert issue_token(None, peer, "a-1", NOW) is None  # no keys: no token
    assert issue_token(keys, None, "a-1", NOW) is None  # no certificate, no token offered
    assert issue_token(keys, peer, "a-2", NOW) is None  # the peer is another agent
    assert issue_token(keys, peer, "a-1", NOW + 86400) is None  # its certificate expired
    assert read_token_message(issue_token(keys, peer, "a-1", NOW)) is not None


def test_a_malformed_token_in_open_closes_the_link_with_the_reason():
    closes: list[tuple[int, str]] = []
    node = NodeLink("gw1", lambda data: None, lambda c, r: closes.append((c, r)), Hub(), Clock())
    node.message_received(
        link.encode({"t": "hello", "name": "gw1", "role": "gateway", "url": "wss://gw"})
    )
    bad = {"identity": "x", "key": "y"}  # no lifetime
    node.message_received(link.encode({"t": "open", "c": 1, "agent": "a-1", "resume": bad}))
    assert closes == [
        (
            codes.CLOSE_PROTOCOL_ERROR,
            "link message 'open': 'resume' must be a resumption token {identity, key, lifetime}",
        )
    ]
    assert node.sessions == {} and node._tokens == {}
