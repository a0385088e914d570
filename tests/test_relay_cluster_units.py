"""Unit tests of a relay node in front of a cluster of server nodes: the spread of agents over
node links, what a lost node link takes with it, and the `cluster` message. No sockets: each
node link's two ends (the relay's and a server node's NodeLink) are joined by functions, time
is a Clock (as tests/test_relay_units.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from twisted.application import service
from twisted.internet.task import Clock

from tcm.protocol import codes, link
from tcm.relay.node import NodeService
from tcm.relay.relays import GatewayRelay
from tcm.relay.requests import RequestLost
from tcm.relay.routing import UpstreamLinks, choose_node
from tcm.server.links import NodeLink
from tests.test_relay_units import AgentConn, Hub, _hello

NODES = ("https://n1:1", "https://n2:2", "https://n3:3")


class Conn(AgentConn):
    def __init__(self, agent_id: str) -> None:
        super().__init__()
        self.agent_id = agent_id


class Everyone:
    def __contains__(self, agent_id: object) -> bool:
        return True


class NodeEnd:
    """The relay's end of one node link, wired to that server node's NodeLink."""

    def __init__(self, node: NodeLink, address: str) -> None:
        self.node = node
        self.address = address
        self.factory = type("Factory", (), {"server_name": None})()

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.node.message_received(link.encode(header, payload))


class ClusterGateway:
    """A gateway relay whose upstream "up" is a cluster: one NodeLink (a Hub each) per node."""

    def __init__(self, addresses: tuple[str, ...] = NODES) -> None:
        self.clock = Clock()
        self.relay = GatewayRelay(self.clock, max_clients=100, upstreams=["up"])
        self.relay.prepare = lambda payload: ("prepared", payload)
        self.hubs: dict[str, Hub] = {}
        self.nodes: dict[str, NodeLink] = {}
        self.ends: dict[str, NodeEnd] = {}
        for i, address in enumerate(addresses):
            self.link(address, f"n{i + 1}")

    def link(self, address: str, server: str) -> None:
        hub = self.hubs[address] = Hub()
        hub.server_name = server  # type: ignore[misc]
        hub.known = Everyone()  # type: ignore[assignment]

        def to_relay(data: bytes, address: str = address) -> None:
            outer, body = link.decode(data, link.SERVER_SENDS)
            for header, payload in link.unbatch(outer, body, link.SERVER_SENDS):
                end = self.ends[address]
                if header["t"] == "welcome":
                    end.factory.server_name = header["server"]
                    assert self.relay.link_up("up", end, header["server"], key=address) is None
                else:
                    self.relay.from_server(header, payload, "up", end)

        node = self.nodes[address] = NodeLink("gw1", to_relay, lambda c, r: None, hub, self.clock)
        self.ends[address] = NodeEnd(node, address)
        node.message_received(
            link.encode({"t": "hello", "name": "gw1", "role": "gateway", "url": "wss://gw"})
        )
        self.clock.advance(0)

    def open(self, agent_id: str, channel: str = "core") -> Conn:
        conn = Conn(agent_id)
        conn.relay_conn = self.relay.opened(conn, agent_id, "tcp4:1.2.3.4:5", {}, "up", channel)
        self.relay.from_agent(conn.relay_conn, _hello())
        self.clock.advance(0)
        return conn

    def lose(self, address: str) -> None:
        end = self.ends[address]
        self.relay.link_lost("up", end)
        self.nodes[address].lost()

    def held_by(self, address: str) -> list[str]:
        """Agents with an open session on that node."""
        return [s.agent_id for s in self.nodes[address].sessions.values()]


# -- the spread --------------------------------------------------------------------------------


def test_the_spread_is_stable_even_and_moves_only_a_lost_nodes_agents():
    agents = [f"agent-{i:04d}" for i in range(3000)]
    keys = sorted(NODES)
    first = {a: choose_node(a, keys) for a in agents}
    assert first == {a: choose_node(a, list(reversed(keys))) for a in agents}  # any order
    counts = Counter(first.values())
    assert set(counts) == set(NODES)
    assert all(800 < n < 1200 for n in counts.values()), counts  # about a third each
    # n2 goes: only its agents move, and they spread over both others
    left = [k for k in keys if k != "https://n2:2"]
    second = {a: choose_node(a, left) for a in agents}
    assert all(second[a] == first[a] for a in agents if first[a] != "https://n2:2")
    moved = Counter(second[a] for a in agents if first[a] == "https://n2:2")
    assert set(moved) == set(left) and min(moved.values()) > counts["https://n2:2"] // 3
    # it comes back: its agents' new sessions go to it again
    assert {a: choose_node(a, keys) for a in agents} == first
    assert choose_node(None, keys) == keys[0]  # no agent id (enrolling): the first
    assert choose_node("a", []) is None


def test_upstream_links_hold_one_link_per_node():
    links = UpstreamLinks(["up"])
    a, b = object(), object()
    links.up("up", a, "https://n1:1")
    links.up("up", b, "https://n2:2")
    assert links.all("up") == [a, b] and links.holds("up", b) and links.is_up("up")
    assert links.pick("up", "x") in (a, b)
    assert links.down("up", object()) is False  # not one of its links
    assert links.down("up", a) is True and links.all("up") == [b] and links.is_up("up")
    assert links.pick("up", "anyone") is b
    assert links.down("up", b) is True and not links.is_up("up") and links.pick("up", "x") is None


# -- a gateway in front of three nodes -----------------------------------------------------------


def test_agents_spread_over_the_nodes_and_each_agents_sessions_stay_together():
    gw = ClusterGateway()
    agents = [f"a-{i}" for i in range(30)]
    for a in agents:
        gw.open(a)
    keys = sorted(NODES)
    for address in NODES:
        assert sorted(gw.held_by(address)) == sorted(
            a for a in agents if choose_node(a, keys) == address
        )
    assert sum(n["sessions"] for n in gw.relay.node_links("up")) == 30
    # an agent's task session goes to the node holding its core session, even when the
    # spread would now pick another (that node came later)
    gw.lose("https://n1:1")
    late = next(a for a in agents if choose_node(a, keys) == "https://n1:1")
    assert late not in gw.held_by("https://n1:1")
    reopened = gw.open(late)  # on n2 or n3 now
    gw.link("https://n1:1", "n1")  # n1 back
    where = [addr for addr in NODES if late in gw.held_by(addr)]
    assert where != ["https://n1:1"] and len(where) == 1
    task = gw.open(late, "task")
    assert [addr for addr in NODES if late in gw.held_by(addr)] == where  # together
    assert task.closed is None and reopened.closed is None
    # with its sessions gone, its next one goes where the spread says: n1
    gw.relay.closed(task.relay_conn)
    gw.relay.closed(reopened.relay_conn)
    gw.clock.advance(0)
    gw.open(late)
    assert late in gw.held_by("https://n1:1")


def test_a_lost_node_link_closes_only_its_agents_and_its_calls():
    gw = ClusterGateway()
    conns = {a: gw.open(a) for a in (f"a-{i}" for i in range(12))}
    keys = sorted(NODES)
    on_n2 = {a for a in conns if choose_node(a, keys) == "https://n2:2"}
    assert on_n2 and len(on_n2) < len(conns)
    # an agent's HTTPS call goes to the node its session is on; one to n2 is pending
    caller = sorted(on_n2)[0]
    pending = gw.relay.request("up", caller, "tcp4:1.2.3.4:5", b"{}")
    failures: list[Any] = []
    pending.addErrback(failures.append)
    other = next(a for a in conns if a not in on_n2)
    answered = gw.relay.request("up", other, "tcp4:1.2.3.4:6", b"{}")
    gw.lose("https://n2:2")
    for a, conn in conns.items():
        if a in on_n2:
            assert conn.closed == (
                codes.CLOSE_UPSTREAM_LOST,
                codes.CLOSE_REASONS[codes.CLOSE_UPSTREAM_LOST],
            )
        else:
            assert conn.closed is None
    assert failures and failures[0].check(RequestLost)
    assert not answered.called  # its node is up: still waiting
    # the upstream is still up: the lost node's agents come back on the others
    assert gw.relay.refusal("x", "up") is None
    for a in on_n2:
        gw.open(a)
    assert not gw.held_by("https://n2:2")
    assert sorted(
        a for addr in ("https://n1:1", "https://n3:3") for a in gw.held_by(addr)
    ) == sorted(conns)
    rows = {n["address"]: n for n in gw.relay.node_links("up")}
    assert set(rows) == {"https://n1:1", "https://n3:3"}
    # every node gone: no link, agents refused until one is back
    gw.lose("https://n1:1")
    gw.lose("https://n3:3")
    assert gw.relay.refusal("x", "up") == (
        503,
        "this node has no link to its server now; try again later",
    )


def test_a_node_speaks_only_for_the_agents_it_holds():
    gw = ClusterGateway()
    keys = sorted(NODES)
    agent = next(f"a-{i}" for i in range(50) if choose_node(f"a-{i}", keys) == "https://n1:1")
    conn = gw.open(agent)
    n3 = gw.ends["https://n3:3"]
    gw.relay.from_server({"t": "frame", "c": conn.relay_conn}, b"intruder", "up", n3)
    gw.relay.from_server({"t": "push", "c": [conn.relay_conn]}, b"intruder", "up", n3)
    gw.relay.from_server({"t": "close", "c": conn.relay_conn, "code": 4000}, b"", "up", n3)
    assert b"intruder" not in conn.frames and conn.closed is None
    n1 = gw.ends["https://n1:1"]
    gw.relay.from_server({"t": "close", "c": conn.relay_conn, "code": 4000}, b"", "up", n1)
    assert conn.closed == (4000, "")


def test_the_cluster_message_routes_every_nodes_agents_and_names_the_nodes_to_link():
    gw = GatewayRelay(Clock(), max_clients=10, upstreams=["up", "other"])
    told: list[tuple[str, dict[str, Any]]] = []
    gw.on_cluster = lambda name, nodes: told.append((name, nodes))
    gw.link_up("up", object(), "n1", key="https://n1:1")
    gw.link_up("other", object(), "elsewhere")
    nodes = [
        {"node": "n1", "url": "https://n1:1", "state": "up"},
        {"node": "n2", "url": "https://n2:2", "state": "up"},
        {"node": "n3", "url": "https://n3:3", "state": "down"},
    ]
    header, payload = link.decode(link.encode({"t": "cluster", "nodes": nodes}), link.SERVER_SENDS)
    gw.from_server(header, payload, "up")
    # an agent enrolled at n3 (its certificate names n3) goes to upstream up
    assert gw.routing.route("n3") == ("up", None)
    assert gw.routing.route("elsewhere") == ("other", None)
    assert told == [
        (
            "up",
            {
                "n1": {"url": "https://n1:1", "state": "up"},
                "n2": {"url": "https://n2:2", "state": "up"},
                "n3": {"url": "https://n3:3", "state": "down"},
            },
        )
    ]
    rows = {n["node"]: n["link"] for n in gw.node_links("up")}
    assert rows == {"n1": "up", "n2": "down", "n3": "down"}
    # a node name that is another upstream's server is not taken over
    gw.from_server(
        {"t": "cluster", "nodes": [{"node": "elsewhere", "url": "https://x:1"}]}, b"", "up"
    )
    assert gw.routing.route("elsewhere") == ("other", None)


def test_a_bad_cluster_message_is_refused():
    with pytest.raises(link.LinkError, match="'cluster' needs nodes"):
        link.decode(b'{"t":"cluster","nodes":[{"node":"n1","url":"wss://x"}]}\n', link.SERVER_SENDS)
    with pytest.raises(link.LinkError, match="'cluster' needs nodes"):
        link.decode(b'{"t":"cluster","nodes":{"n1":"https://x"}}\n', link.SERVER_SENDS)


def test_a_server_node_tells_linked_relays_the_cluster():
    """At welcome, and whenever the members change (AgentHub.cluster_changed)."""
    hub = Hub()
    members = [{"node": "n1", "url": "https://n1:1", "state": "up"}]
    hub.cluster_members = members  # type: ignore[attr-defined]
    seen: list[dict[str, Any]] = []

    def to_relay(data: bytes) -> None:
        outer, body = link.decode(data, link.SERVER_SENDS)
        seen.extend(h for h, _ in link.unbatch(outer, body, link.SERVER_SENDS))

    clock = Clock()
    node = NodeLink("gw1", to_relay, lambda c, r: None, hub, clock, max_batch=0)
    node.message_received(
        link.encode({"t": "hello", "name": "gw1", "role": "gateway", "url": "wss://gw"})
    )
    assert {"t": "cluster", "nodes": members} in seen
    node.cluster([*members, {"node": "n2", "url": "https://n2:2", "state": "up"}])
    assert seen[-1]["nodes"][-1]["node"] == "n2"


# -- the service: links to the nodes a cluster names -----------------------------------------------


class FakeFactory:
    def __init__(self, server_name: str | None = None) -> None:
        self.server_name = server_name


class Follower(NodeService):
    """A NodeService whose links are plain services (what `cluster_told` manages)."""

    def __init__(self, configured: list[str]) -> None:
        super().__init__(Clock())
        self.configured = configured
        self.relay = GatewayRelay(self.reactor, 10, ["up"])
        for url in configured:
            self.add_link_to("up", url)

    def addresses_of(self, name: str) -> list[str]:
        return self.configured

    def add_link_to(self, name: str, url: str) -> None:
        self.links.setdefault(name, {})[url] = FakeFactory()
        svc = service.Service()
        self.link_services.setdefault(name, {})[url] = svc
        svc.setServiceParent(self)


def test_the_node_links_to_each_node_the_cluster_names_up_and_lets_down_ones_rest():
    f = Follower(["https://n1:1"])
    f.startService()
    f.links["up"]["https://n1:1"].server_name = "n1"  # welcomed by n1
    # n1 under another spelling: not linked twice; n2 up: linked; n3 down: not yet
    f.cluster_told(
        "up",
        {
            "n1": {"url": "https://localhost:1", "state": "up"},
            "n2": {"url": "https://n2:2", "state": "up"},
            "n3": {"url": "https://n3:3", "state": "down"},
        },
    )
    assert sorted(f.link_services["up"]) == ["https://n1:1", "https://n2:2"]
    assert f.link_services["up"]["https://n2:2"].running
    # n2 goes down without a live link: its service stops until n2 is up again; a
    # configured address (n1) is always kept
    n2 = f.link_services["up"]["https://n2:2"]
    f.cluster_told(
        "up",
        {
            "n1": {"url": "https://n1:1", "state": "down"},
            "n2": {"url": "https://n2:2", "state": "down"},
        },
    )
    assert sorted(f.link_services["up"]) == ["https://n1:1"] and not n2.running
    f.cluster_told("up", {"n2": {"url": "https://n2:2", "state": "up"}})
    assert sorted(f.link_services["up"]) == ["https://n1:1", "https://n2:2"]
    # a node down whose link is still up keeps it (the cluster may be behind)
    live = type("Live", (), {"factory": f.links["up"]["https://n2:2"]})()
    f.relay.links.up("up", live, "https://n2:2")
    f.cluster_told("up", {"n2": {"url": "https://n2:2", "state": "down"}})
    assert "https://n2:2" in f.link_services["up"]


def test_one_node_under_two_addresses_is_linked_once():
    """An address the cluster named that leads to a node linked already (another spelling
    of a configured address) stops; two configured spellings are an error logged."""
    f = Follower(["https://n1:1"])
    f.startService()
    f.cluster_told("up", {"n1": {"url": "https://localhost:1", "state": "up"}})  # not welcomed
    assert sorted(f.link_services["up"]) == ["https://localhost:1", "https://n1:1"]
    f.links["up"]["https://n1:1"].server_name = "n1"
    f.welcomed("up", "https://n1:1", "n1")
    f.links["up"]["https://localhost:1"].server_name = "n1"
    discovered = f.link_services["up"]["https://localhost:1"]
    f.welcomed("up", "https://localhost:1", "n1")
    assert sorted(f.link_services["up"]) == ["https://n1:1"] and not discovered.running
    # the configured one welcomed after the discovered one: the discovered one goes too
    f.cluster_told("up", {"n1b": {"url": "https://n1b:1", "state": "up"}})
    f.links["up"]["https://n1b:1"].server_name = "n1"
    f.welcomed("up", "https://n1:1", "n1")
    assert sorted(f.link_services["up"]) == ["https://n1:1"]
    # two configured spellings: both kept (the operator's to fix), the error said
    both = Follower(["https://n1:1", "https://localhost:1"])
    both.startService()
    for factory in both.links["up"].values():
        factory.server_name = "n1"
    both.welcomed("up", "https://localhost:1", "n1")
    assert sorted(both.link_services["up"]) == ["https://localhost:1", "https://n1:1"]


class Capture:
    """A node link that keeps what is sent on it."""

    def __init__(self, server_name: str | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.factory = FakeFactory(server_name)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.sent.append(header)


def test_a_task_session_goes_to_the_node_its_url_names():
    """?node=NAME in the task server URL (the node holding the agent's own session): the
    task server takes the session to that node when linked to it, else by the spread; a
    gateway passes the name on to a task server in `open`."""
    from tcm.relay.relays import TaskServerRelay

    ts = TaskServerRelay(Clock(), max_clients=10)
    links = {n: Capture(n) for n in ("n1", "n2", "n3")}
    for n, up in links.items():
        ts.link_up("server", up, n, key=f"https://{n}:1")
    keys = sorted(f"https://{n}:1" for n in links)
    agent = next(f"a-{i}" for i in range(50) if choose_node(f"a-{i}", keys) == "https://n1:1")
    ts.opened(Conn(agent), agent, "tcp4:1.2.3.4:5", {}, node="n3")
    assert [h["agent"] for h in links["n3"].sent] == [agent] and not links["n1"].sent
    other = agent + "x"
    ts.opened(Conn(other), other, "tcp4:1.2.3.4:5", {}, node="n9")  # not linked: the spread
    assert [h["agent"] for up in links.values() for h in up.sent].count(other) == 1

    gw = GatewayRelay(Clock(), max_clients=10, upstreams=["up", "ts"], task_server_upstreams=["ts"])
    server, task_server = Capture("n1"), Capture()
    gw.link_up("up", server, "n1", key="https://n1:1")
    gw.link_up("ts", task_server, "n1", role="taskserver", node="ts1")
    gw.opened(Conn("a-1"), "a-1", "tcp4:1.2.3.4:5", {}, "ts", "task", node="n2")
    gw.opened(Conn("a-2"), "a-2", "tcp4:1.2.3.4:5", {}, "up", "core", node="n2")
    assert [h.get("node") for h in task_server.sent if h["t"] == "open"] == ["n2"]
    assert all("node" not in h for h in server.sent if h["t"] == "open")  # not to a server


def test_every_node_hears_which_task_servers_the_gateway_reaches():
    """A task server linked to another node of the cluster than the one the gateway heard
    of first: once the cluster names that node, every node link is told the reach."""
    gw = GatewayRelay(
        Clock(), max_clients=10, upstreams=["up", "ts1"], task_server_upstreams=["ts1"]
    )
    n1, ts = Capture("n1"), Capture()
    gw.link_up("up", n1, "n1", key="https://n1:1")
    gw.link_up("ts1", ts, "n2", role="taskserver", node="ts1")  # ts1 says its server is n2
    assert [h for h in n1.sent if h["t"] == "reach"][-1]["task_servers"] == []
    gw.from_server(
        {
            "t": "cluster",
            "nodes": [{"node": "n1", "url": "https://n1:1"}, {"node": "n2", "url": "https://n2:2"}],
        },
        b"",
        "up",
    )
    assert [h for h in n1.sent if h["t"] == "reach"][-1]["task_servers"] == ["ts1"]
    n2 = Capture("n2")
    gw.link_up("up", n2, "n2", key="https://n2:2")
    assert [h for h in n2.sent if h["t"] == "reach"][-1]["task_servers"] == ["ts1"]
    # an agent whose certificate names n1 may use ts1 (linked to n2: the same cluster)
    assert gw.routing.route_task_server("n1", "ts1") == ("ts1", None)


def test_the_certificate_renews_through_any_node_that_answers():
    """Renewal goes to the first node that answers (a node down does not block it); a node
    that refuses is the answer (not passed over); the list is asked at each renewal."""
    from twisted.internet.defer import fail, succeed

    from tcm.relay.node import any_issuer
    from tcm.tls.renewal import RenewalFailed

    asked: list[str] = []

    def issuer_for(url: str):
        def issue(csr: bytes):
            asked.append(url)
            if "down" in url:
                return fail(RenewalFailed(f"cannot reach {url}: connection refused"))
            if "refuses" in url:
                return fail(RenewalFailed(f"refused by {url} (403): node 'gw1' is revoked"))
            return succeed(b"CERT from " + url.encode())

        return issue

    servers = ["https://down:1", "https://n2:2"]
    issue = any_issuer(lambda: list(servers), issuer_for)
    results: list[Any] = []
    issue(b"CSR").addBoth(results.append)
    assert results == [b"CERT from https://n2:2"] and asked == servers
    servers[:] = ["https://refuses:1", "https://n2:2"]
    issue(b"CSR").addBoth(results.append)
    assert results[-1].check(RenewalFailed) and "revoked" in str(results[-1].value)
    servers[:] = ["https://down:1", "https://down:2"]
    issue(b"CSR").addBoth(results.append)
    assert results[-1].check(RenewalFailed) and "down:2" in str(results[-1].value)
