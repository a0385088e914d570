"""Relay nodes in front of a cluster of server nodes (tcm/server/cluster): a gateway links to
every node and spreads its agents over them; a task server links to every node. Real twistd
processes on the local PostgreSQL and Redis (as tests/test_cluster.py)."""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from typing import Any

import pytest

from tcm.relay.routing import choose_node
from tests.harness import AgentProc, GatewayProc, Server, TaskServerProc, free_port, wait_until
from tests.test_cluster import (  # noqa: F401 (fixtures)
    Cluster,
    _gated_job,
    _nodes,
    _runs,
    _states,
    cluster,
    database,
    redis_url,
)

pytestmark = pytest.mark.integration


def _gateway_links(server: Server, name: str) -> dict[str, Any] | None:
    """The gateway's entry in `tcm gateways` on that node (its links to that node)."""
    return next((g for g in server.cli_json("gateways") if g["name"] == name), None)


def _linked_to(server: Server, name: str) -> bool:
    g = _gateway_links(server, name)
    return g is not None and g["state"] == "up"


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _where(server: Server) -> dict[str, str]:
    """{agent id: node holding its session}, as the cluster lists them."""
    return {a["id"]: a.get("node") for a in server.agents() if a["online"]}


def _agents_behind(owner: Any, base: str, gw: Any, server: Server, n: int) -> list[AgentProc]:
    """`n` real agents enrolled through the gateway's upstream `up`, each with a session
    (stopped with the cluster `owner`)."""
    token = server.token(uses=n)
    agents = []
    for i in range(n):
        agent = AgentProc(
            base,
            f"a{i}",
            extra=["--server", f"{gw.url}/upstream/up", "--ca-cert", server.ca, "--token", token],
        )
        agent.env = {"TCM_TEST_AGENT": agent.name}
        owner.agents.append(agent)
        agents.append(agent)
        agent.start(wait=False)
    for a in agents:
        a.wait_session(1)
    return agents


def test_gateway_links_every_node_and_moves_agents_when_one_is_killed(
    cluster: Cluster,  # noqa: F811 (the fixture)
    tmp_path: Any,
) -> None:
    """A gateway given two nodes' addresses links to the third too (the cluster names it),
    spreads its agents over the three by their ids, and when a node is SIGKILLed its agents
    come back through the gateway on the others: every target of a job running then is
    stored once (none lost, none run twice). The node restarted is linked again and takes
    its agents' new sessions."""
    n1, n2, n3 = cluster.node("n1"), cluster.node("n2"), cluster.node("n3")
    by_url = {n.url: n for n in (n1, n2, n3)}
    metrics_port = free_port()
    gw = GatewayProc(
        str(tmp_path),
        "gw1",
        {"up": n1},
        nodes={"up": [n2]},
        extra=["--metrics-port", str(metrics_port)],
    )
    cluster.agents.append(gw)  # type: ignore[arg-type]  # stopped with the cluster
    gw.start()
    # n3 was not given: the cluster's `cluster` message names it, and the gateway links
    wait_until(lambda: all(_linked_to(n, "gw1") for n in (n1, n2, n3)), 30, 0.3, "gw1 on n3")
    assert "linking to cluster node n3" in gw.log()
    assert 'tcm_gateway_upstream_nodes_up{upstream="up"} 3.0' in _metrics(metrics_port)

    agents = _agents_behind(cluster, str(tmp_path), gw, n1, 6)

    # each agent on the node its id hashes to among the gateway's live node links
    def expected(urls: list[str]) -> dict[str, str]:
        keys = sorted(urls)
        return {a.agent_id: by_url[choose_node(a.agent_id, keys)].name for a in agents}

    want = expected([n1.url, n2.url, n3.url])
    wait_until(lambda: _where(n1) == want, 20, 0.3, f"agents spread as {want}")
    assert sum(g["sessions"] for g in (_gateway_links(n, "gw1") for n in (n1, n2, n3)) if g) == 6

    runs, gate = str(tmp_path / "runs.log"), str(tmp_path / "gate")
    job = _gated_job(n1, runs, gate)
    wait_until(lambda: sum(_runs(runs).values()) == 6, 30, 0.2, "six targets started")

    # kill the node (other than n1, which the test asks) holding the most of them
    held = Counter(want.values())
    victim = n2 if held["n2"] >= held["n3"] else n3
    moved = [a for a in agents if want[a.agent_id] == victim.name]
    opened = {a.name: a.count(a.SESSION_OPEN) for a in moved}
    killed_at = time.monotonic()
    victim.kill()
    for a in moved:
        a.wait_session(opened[a.name] + 1, timeout=40)  # back through the gateway, elsewhere
        assert "4010 the relay lost its link to the server" in a.log()
    back_s = time.monotonic() - killed_at  # printed, not asserted
    survivors = [n for n in (n1, n2, n3) if n is not victim]
    after = expected([n.url for n in survivors])
    assert all(after[a] == want[a] for a in want if want[a] != victim.name)  # others stayed
    wait_until(lambda: _where(n1) == after, 20, 0.3, f"agents on the survivors as {after}")
    with open(gate, "w"):
        pass
    wait_until(lambda: _states(n1, job)["succeeded"] == 6, 60, 0.3, "six results after the kill")
    stored = survivors[-1].job(job)
    assert len(stored["results"]) == 6
    assert Counter(r["state"] for r in stored["results"]) == {"succeeded": 6}  # none lost
    assert _runs(runs) == {a.name: 1 for a in agents}  # none ran twice
    assert 'tcm_gateway_upstream_nodes_up{upstream="up"} 2.0' in _metrics(metrics_port)
    # the status page: each node's link (the lost one down, no sessions)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/status", timeout=10) as r:
        page = r.read().decode()
    assert "<h2>Nodes</h2>" in page
    assert f"<td>up</td><td>{victim.url}</td><td>{victim.name}</td><td>down</td><td>0</td>" in page
    assert "<td>2 / 3</td>" in page  # nodes up, in the Upstreams table
    print(
        f"gateway node kill: targets 6, moved {len(moved)} (back in {back_s:.1f} s), stored 6, "
        f"lost 0, twice 0 ({dict(_runs(runs))})"
    )

    # the node comes back: linked again, and an agent that hashes to it lands there
    victim.start()
    wait_until(lambda: _linked_to(victim, "gw1"), 60, 0.5, f"gw1 linked to {victim.name} again")
    again = moved[0]
    opened = again.count(again.SESSION_OPEN)
    again.stop()
    again.start(sessions=opened + 1)
    wait_until(
        lambda: _where(n1).get(again.agent_id) == victim.name,
        20,
        0.3,
        f"{again.name} back on {victim.name}",
    )


def test_task_server_links_every_node_and_keeps_tasks_across_a_node_loss(
    cluster: Cluster,  # noqa: F811 (the fixture)
    tmp_path: Any,
) -> None:
    """A task server given one node links to every node of the cluster (each node can
    assign it); each agent's task session goes to the node holding its own session; a node
    SIGKILLed mid-task costs no target: all stored once."""
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    ts = TaskServerProc(str(tmp_path), "ts1", n1)
    cluster.agents.append(ts)  # type: ignore[arg-type]  # stopped with the cluster
    ts.start()

    def listed_up(node: Server) -> bool:
        return any(t["name"] == "ts1" and t["state"] == "up" for t in node.cli_json("taskservers"))

    wait_until(lambda: listed_up(n1) and listed_up(n2), 30, 0.3, "ts1 linked to both nodes")
    assert "linking to cluster node n2" in ts.log()

    token = n1.token(uses=4)
    agents = [cluster.agent(f"a{i}", node, token) for i, node in enumerate((n1, n2) * 2)]
    for a in agents:
        a.wait_session(1)
    for a in agents:
        wait_until(lambda a=a: a.count("task session open") >= 1, 30, 0.2, f"{a.name} task session")

    # each agent's task session goes through the task server to the node holding its own
    # session (that node names itself in the task server URL it gives: ?node=NAME)
    def clients(node: Server) -> int:
        return next(t["clients"] for t in node.cli_json("taskservers") if t["name"] == "ts1")

    wait_until(
        lambda: (
            (clients(n1), clients(n2)) == (2, 2)
            and Counter(_where(n1).values()) == {"n1": 2, "n2": 2}
        ),
        20,
        0.3,
        "task sessions on the nodes of the agents' own sessions",
    )
    assert all(a.count("?node=n1") + a.count("?node=n2") >= 1 for a in agents)
    runs, gate = str(tmp_path / "runs.log"), str(tmp_path / "gate")
    job = _gated_job(n1, runs, gate)
    wait_until(lambda: sum(_runs(runs).values()) == 4, 30, 0.2, "four targets started")

    n2.kill()
    wait_until(lambda: clients(n1) == 4, 40, 0.3, "every task session on n1")
    wait_until(lambda: listed_up(n1), 10, 0.3, "ts1 still linked to n1")
    with open(gate, "w"):
        pass
    wait_until(lambda: _states(n1, job)["succeeded"] == 4, 60, 0.3, "four results after the kill")
    stored = n1.job(job)
    assert Counter(r["state"] for r in stored["results"]) == {"succeeded": 4}
    assert _runs(runs) == {a.name: 1 for a in agents}
    assert all("finished" in r["result"]["stdout"] for r in stored["results"])
    print(f"task server node kill: targets 4, stored 4, lost 0, twice 0 ({dict(_runs(runs))})")


def test_gateway_upstream_addresses_option() -> None:
    """--upstream NAME=URL1,URL2: the nodes of one cluster; a bad address or one given
    twice is refused with the reason."""
    from twisted.python import usage

    from tcm.gateway.tap import Options

    o = Options()
    o.parseOptions(
        ["--state-dir", "/tmp/x", "--upstream", "up=https://n1:1,https://n2:2/", "--port", "0"]
    )
    assert o["upstreams"] == [("up", "https://n1:1")]
    assert o["upstream_addresses"] == {"up": ["https://n1:1", "https://n2:2"]}
    with pytest.raises(usage.UsageError, match="NAME=https://HOST:PORT"):
        Options().parseOptions(["--state-dir", "/tmp/x", "--upstream", "up=https://n1:1,n2:2"])
    with pytest.raises(usage.UsageError, match="an address given twice"):
        Options().parseOptions(
            ["--state-dir", "/tmp/x", "--upstream", "up=https://n1:1,https://n1:1"]
        )


def test_task_server_server_option() -> None:
    """--server more than once: the cluster's nodes, each once; not https is refused."""
    from twisted.python import usage

    from tcm.taskserver.tap import Options

    o = Options()
    o.parseOptions(["--state-dir", "/tmp/x", "-s", "https://n1:1", "--server", "https://n2:2"])
    assert (o["server"], o["servers"]) == ("https://n1:1", ["https://n2:2"])
    with pytest.raises(usage.UsageError, match="--server wants https://HOST:PORT"):
        Options().parseOptions(["--state-dir", "/tmp/x", "--server", "n1:1"])


def test_task_sessions_through_a_gateway_reach_the_node_of_the_agents_own_session(
    cluster: Cluster,  # noqa: F811 (the fixture)
    tmp_path: Any,
) -> None:
    """A gateway and a task server in front of a two-node cluster, each given only n1: agents
    behind the gateway spread over the nodes, and each one's task session goes gateway ->
    task server -> the node holding its own session (the node names itself in the URL, the
    gateway passes it on in `open`). A node killed mid-task: every target stored once."""
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    ts = TaskServerProc(str(tmp_path), "ts1", n1)
    cluster.agents.append(ts)  # type: ignore[arg-type]  # stopped with the cluster
    ts.start()
    gw = GatewayProc(
        str(tmp_path), "gw1", {"up": n1}, extra=["--upstream", f"ts1=https://127.0.0.1:{ts.port}"]
    )
    cluster.agents.append(gw)  # type: ignore[arg-type]
    gw.start()

    def reaches(node: Server) -> bool:
        g = _gateway_links(node, "gw1")
        return g is not None and g["state"] == "up" and g["task_servers"] == ["ts1"]

    wait_until(lambda: reaches(n1) and reaches(n2), 40, 0.3, "gw1 reaching ts1 on both nodes")
    agents = _agents_behind(cluster, str(tmp_path), gw, n1, 4)
    for a in agents:
        wait_until(lambda a=a: a.count("task session open with ts1") >= 1, 30, 0.2, a.name)
    # every agent listed online, with its node (other nodes' sessions from Redis presence)
    where = wait_until(lambda: (lambda w: w if len(w) == 4 else None)(_where(n1)), 20, 0.3)
    for node in (n1, n2):
        mine = sum(1 for n in where.values() if n == node.name)
        wait_until(
            lambda node=node, mine=mine: (
                node.count("task session open via taskserver:ts1 via gateway:gw1") == mine
            ),
            20,
            0.3,
            f"{mine} task sessions on {node.name}",
        )
    runs, gate = str(tmp_path / "runs.log"), str(tmp_path / "gate")
    job = _gated_job(n1, runs, gate)
    wait_until(lambda: sum(_runs(runs).values()) == 4, 30, 0.2, "four targets started")
    n2.kill()
    with open(gate, "w"):
        pass
    wait_until(lambda: _states(n1, job)["succeeded"] == 4, 60, 0.3, "four results after the kill")
    assert _runs(runs) == {a.name: 1 for a in agents}
    print(f"gateway + task server node kill: targets 4, stored 4, lost 0, twice 0 ({where})")
