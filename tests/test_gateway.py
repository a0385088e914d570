"""The internet gateway with real processes: two twistd tcm-server, twistd tcm-gateway, agents.

Everything over real TLS with certificates from the tcm CA (shared by the two servers):
- agents of two servers behind one gateway; each server's jobs reach only its agents, and
  each server sees its agents' sessions on one link of the gateway;
- HTTPS fallback (long-polls) through the gateway when a server switches persistent off;
- a revoked agent's live session is closed and it is refused at the gateway with the reason;
- SIGTERM drains a gateway: its agents move to a second gateway, no job is lost;
- agents' task sessions go through the gateway to a task server (an upstream of the
  gateway), fall back through the gateway to the server when it dies, and return;
- /metrics parses as Prometheus text and its counters move with traffic.
"""

from __future__ import annotations

import http.client
import json
import signal
import ssl
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    AgentProc,
    GatewayProc,
    Process,
    Server,
    agent_status,
    free_port,
    share_ca,
    wait_until,
)

pytestmark = pytest.mark.integration


def _servers(base, add) -> tuple[Server, Server]:
    alpha = add(Server(str(base), name="alpha", extra=["--name", "alpha"]))
    beta = add(Server(str(base), name="beta", extra=["--name", "beta"]))
    alpha.start()
    share_ca(alpha, beta)
    beta.start()
    return alpha, beta


def _agents_via(
    base, gw: GatewayProc, upstream: str, server: Server, n: int, add, extra=None, prefix="agent"
):
    """n agents enrolled with `server` through the gateway (/upstream/NAME/)."""
    token = server.token(uses=n)
    agents = []
    for i in range(n):
        a = AgentProc(str(base), f"{upstream}-{prefix}{i}", extra=extra)
        a.args += [
            "--server",
            f"{gw.url}/upstream/{upstream}",
            "--ca-cert",
            server.ca,
            "--token",
            token,
        ]
        agents.append(add(a))
    for a in agents:
        a.start(wait=False)
    for a in agents:
        a.wait_session(1)
    return agents


def _run(server: Server, *args: str) -> dict:
    return json.loads(server.cli("run", *args, "--json"))


def _gateway_listing(server: Server, name: str) -> dict:
    return next(g for g in server.cli_json("gateways") if g["name"] == name)


def test_two_servers_behind_one_gateway_routing_fallback_and_revocation(stack):
    base, add = stack
    alpha, beta = _servers(base, add)
    # alpha has a task server registered (its agents get task sessions), beta none
    alpha.cli("taskservers", "enroll", "ts-inside")
    gw = add(GatewayProc(str(base), "gw1", {"up-a": alpha, "up-b": beta}))
    gw.start()
    a_agents = _agents_via(base, gw, "up-a", alpha, 3, add)
    b_agents = _agents_via(base, gw, "up-b", beta, 2, add)

    # Each server sees only its own agents, all on the gateway's one link.
    assert {a["id"] for a in alpha.agents()} == {a.agent_id for a in a_agents}
    assert {a["id"] for a in beta.agents()} == {a.agent_id for a in b_agents}
    listing = wait_until(
        lambda: (lambda g: g if g["sessions"] == 3 else None)(_gateway_listing(alpha, "gw1")),
        20,
        0.1,
        "alpha sees three sessions through gw1",
    )
    assert len(listing["links"]) == 1 and listing["links"][0]["sessions"] == 3
    assert _gateway_listing(beta, "gw1")["links"][0]["sessions"] == 2
    assert all(a["online"] for a in alpha.agents())

    # Jobs of each server reach only its agents, and results come back: alpha's push
    # crosses alpha's link once (for three agents) and nothing crosses beta's.
    pushes = listing["links"][0]["pushes"]
    beta_out = _gateway_listing(beta, "gw1")["links"][0]["frames_out"]
    job_a = _run(alpha, "ping", "--targets", "all", "--wait")
    assert job_a["counts"]["succeeded"] == 3, job_a
    assert _gateway_listing(alpha, "gw1")["links"][0]["pushes"] == pushes + 1
    assert _gateway_listing(beta, "gw1")["links"][0]["frames_out"] == beta_out
    targets = {t["agent"]: t["state"] for t in alpha.job(job_a["job"])["results"]}
    assert targets == {a.agent_id: "succeeded" for a in a_agents}
    job_b = _run(beta, "ping", "--targets", "all", "--wait")
    assert job_b["counts"]["succeeded"] == 2, job_b
    targets = {t["agent"]: t["state"] for t in beta.job(job_b["job"])["results"]}
    assert targets == {a.agent_id: "succeeded" for a in b_agents}

    # Task sessions stay on the gateway too (no task server is reachable from outside):
    # the welcome names the gateway's /task/v1/ws, and a task goes over it.
    for a in a_agents:
        wait_until(
            lambda a=a: a.count("task session open with gateway:gw1") >= 1,
            30,
            0.1,
            f"{a.name} task session through the gateway",
        )
    assert alpha.count("task session open via gateway:gw1") >= 3
    assert _gateway_listing(alpha, "gw1")["task_sessions"] == 3
    assert _gateway_listing(beta, "gw1")["task_sessions"] == 0  # beta has no task servers
    task = _run(
        alpha, "command.run", "--arg", 'argv=["echo","via-gw"]', "--targets", "all", "--wait"
    )
    assert task["counts"]["succeeded"] == 3, task
    assert all(r["result"]["stdout"] == "via-gw\n" for r in task["results"])

    # HTTPS fallback through the gateway: beta switches persistent connections off; its
    # agents poll (long-polls, relayed as link requests) and still get and answer jobs.
    beta.cli("settings", "set", "persistent_connections", "false")
    for a in b_agents:
        wait_until(
            lambda a=a: a.count("connection mode persistent -> http") >= 1,
            30,
            0.1,
            f"{a.name} in HTTP mode",
        )
    job_b2 = _run(beta, "ping", "--targets", "all", "--wait", "--timeout", "60")
    assert job_b2["counts"]["succeeded"] == 2, job_b2
    assert _gateway_listing(beta, "gw1")["links"][0]["requests"] > 0
    # alpha's agents are untouched by beta's switch
    assert _gateway_listing(alpha, "gw1")["sessions"] == 3

    # Revocation: the live session is closed (4007), and the gateway refuses the agent at
    # the upgrade with the reason (it learnt of the revocation over its link).
    victim = a_agents[0]
    alpha.cli("agents", "revoke", victim.agent_id)
    wait_until(lambda: victim.count("4007") >= 1, 20, 0.1, "revoked session closed")
    wait_until(
        lambda: (
            gw.count(f"agent {victim.agent_id} refused: 403 agent {victim.agent_id} is revoked")
            >= 1
        ),
        30,
        0.1,
        "the gateway refuses the revoked agent",
    )
    assert victim.count("is revoked") >= 1  # the agent's log names the reason
    job_a2 = _run(alpha, "ping", "--targets", "all", "--wait")
    assert job_a2["counts"]["succeeded"] == 2, job_a2  # the revoked agent is no target

    # Approval: with require_approval on, a new agent enrolls but is refused at the gateway
    # until an admin approves it; then its session opens without a restart.
    alpha.cli("settings", "set", "require_approval", "true")
    newcomer = AgentProc(str(base), "up-a-newcomer")
    newcomer.args += [
        "--server",
        f"{gw.url}/upstream/up-a",
        "--ca-cert",
        alpha.ca,
        "--token",
        alpha.token(uses=1),
    ]
    add(newcomer)
    newcomer.start(wait=False)
    wait_until(
        lambda: gw.count("is awaiting approval") >= 1, 30, 0.1, "the gateway refuses the newcomer"
    )
    assert newcomer.count(AgentProc.SESSION_OPEN) == 0
    pending = [a for a in alpha.agents() if not a["approved"]]
    assert [a["id"] for a in pending] == [newcomer.agent_id]
    assert "awaiting approval" in newcomer.log()
    alpha.cli("agents", "approve", newcomer.agent_id)
    newcomer.wait_session(1, timeout=60)
    assert "agent.approve" in alpha.cli("audit")


def _metrics(port: int) -> dict[str, float]:
    """Scrape /metrics and parse it as Prometheus text: {sample name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def test_drain_moves_agents_to_a_second_gateway_without_losing_a_job(stack):
    base, add = stack
    alpha = add(Server(str(base), name="alpha", extra=["--name", "alpha"]))
    alpha.start()
    gw1 = add(GatewayProc(str(base), "gw1", {"up-a": alpha}, extra=["--drain-grace", "1"]))
    gw2 = add(GatewayProc(str(base), "gw2", {"up-a": alpha}))
    gw1.start()
    gw2.start()
    # two agents know gw2 from their command line, the third from its connection profile
    agents = _agents_via(base, gw1, "up-a", alpha, 2, add, extra=["--gateway", gw2.url])
    (third,) = _agents_via(base, gw1, "up-a", alpha, 1, add, prefix="outside")
    agents.append(third)
    alpha.cli("targets", "create", "outside", "--agents", third.agent_id)
    gw2_ws = "wss://" + gw2.url.split("://", 1)[1] + "/agent/v1/ws"
    alpha.cli("profiles", "create", "dmz", "--set", f'gateways=["{gw2_ws}"]', "--target", "outside")
    wait_until(lambda: third.count("connection profile dmz v1 in force") >= 1, 30, 0.1, "profile")
    assert third.count(f"reconnecting: gateways {gw2.url}") == 1
    third.wait_session(2)  # a change of gateways reconnects the session
    assert agent_status(third)["profile"]["applied"] == ["gateways"]
    wait_until(lambda: _gateway_listing(alpha, "gw1")["sessions"] == 3, 20, 0.1, "three on gw1")
    table = alpha.cli("gateways")
    assert "gw1" in table and "gw2" in table and "this server: alpha" in table

    gate = base / "go"
    job_id = alpha.gated_task(gate)
    wait_until(lambda: alpha.job(job_id)["counts"]["running"] == 3, 30, 0.1, "all running")

    gw1.signal(signal.SIGTERM)  # drain: 4006 to every agent, then stop
    for a in agents:
        wait_until(lambda a=a: a.count("4006") >= 1, 20, 0.1, f"{a.name} told to go")
        a.wait_session(3 if a is third else 2)
    assert gw1.count("draining: told 3 sessions to reconnect elsewhere") == 1
    wait_until(lambda: _gateway_listing(alpha, "gw2")["sessions"] == 3, 30, 0.1, "three on gw2")
    wait_until(lambda: not gw1.alive(), 30, 0.1, "gw1 stopped after its grace period")

    gate.write_text("")
    job = wait_until(
        lambda: (lambda j: j if j["counts"]["succeeded"] == 3 else None)(alpha.job(job_id)),
        60,
        0.2,
        "the job running during the drain finishes on all three",
    )
    assert all("finished" in r["result"]["stdout"] for r in job["results"])
    ping = _run(alpha, "ping", "--targets", "all", "--wait")
    assert ping["counts"]["succeeded"] == 3, ping


def test_metrics_parse_and_move_with_traffic_and_the_status_page(stack):
    base, add = stack
    sport = free_port()
    alpha = add(
        Server(str(base), name="alpha", extra=["--name", "alpha", "--metrics-port", str(sport)])
    )
    alpha.start()
    mport = free_port()
    gw = add(GatewayProc(str(base), "gw1", {"up-a": alpha}, extra=["--metrics-port", str(mport)]))
    gw.start()
    _agents_via(base, gw, "up-a", alpha, 2, add)
    before = wait_until(
        lambda: (lambda m: m if m["tcm_gateway_sessions"] == 2 else None)(_metrics(mport)),
        20,
        0.1,
        "two sessions in the metrics",
    )
    assert before["tcm_gateway_upstream_up{upstream=up-a}"] == 1
    assert before["tcm_gateway_upstream_sessions{upstream=up-a}"] == 2
    assert before["tcm_gateway_handshakes_total"] >= 2

    job = _run(alpha, "ping", "--targets", "all", "--wait")
    assert job["counts"]["succeeded"] == 2
    after = _metrics(mport)
    assert after["tcm_gateway_pushes_total"] == before["tcm_gateway_pushes_total"] + 1
    assert after["tcm_gateway_messages_out_total"] >= before["tcm_gateway_messages_out_total"] + 2
    assert after["tcm_gateway_messages_in_total"] > before["tcm_gateway_messages_in_total"]
    assert after["tcm_gateway_bytes_out_total"] > before["tcm_gateway_bytes_out_total"]
    assert (
        after["tcm_gateway_push_fanout_count"] == before.get("tcm_gateway_push_fanout_count", 0) + 1
    )
    assert after["tcm_gateway_push_fanout_sum"] >= before.get("tcm_gateway_push_fanout_sum", 0) + 2

    # a connection without a client certificate is refused, and counted by reason
    ctx = ssl.create_default_context(cafile=alpha.ca)
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=10)
    conn.putrequest("GET", "/agent/v1/ws")
    for name, value in {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Protocol": "tcm.v1",
    }.items():
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 403
    assert "an agent certificate is required" in resp.reason
    conn.close()
    assert _metrics(mport)["tcm_gateway_handshake_failures_total{reason=certificate}"] == 1

    # the server's own metrics: the sessions it holds through the gateway, the gateway's link
    server = _metrics(sport)
    assert server["tcm_server_sessions_by_route{via=gateway:gw1}"] == 2
    assert server["tcm_server_node_links{role=gateway}"] == 1
    assert server["tcm_server_link_pushes_total"] >= 1
    assert server["tcm_server_sessions"] == 2
    # admission control: nothing waits now, and no handshake is left counting
    assert server["tcm_server_handshakes_waiting"] == 0
    assert server["tcm_server_handshakes_in_progress"] == 0
    assert "tcm_server_handshakes_queued_total" in server

    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=10) as resp:
        page = resp.read().decode()
    assert resp.headers["content-type"].startswith("text/html")
    assert "up-a" in page and "alpha" in page and "<table>" in page


def test_worker_processes_share_the_port_each_with_its_own_link(stack):
    import re

    import psutil

    base, add = stack
    alpha = add(Server(str(base), name="alpha", extra=["--name", "alpha"]))
    alpha.start()
    gw = add(
        GatewayProc(
            str(base),
            "gw1",
            {"up-a": alpha},
            extra=["--workers", "2", "--max-clients", "4", "--drain-grace", "1"],
        )
    )
    gw.start()
    wait_until(
        lambda: len(_gateway_listing(alpha, "gw1")["links"]) == 2, 30, 0.1, "two worker links"
    )
    # six agents, at most four per worker: both workers hold some (a full one answers 503
    # and the agent's next attempt lands wherever the kernel sends it)
    _agents_via(base, gw, "up-a", alpha, 6, add)
    listing = wait_until(
        lambda: (lambda g: g if g["sessions"] == 6 else None)(_gateway_listing(alpha, "gw1")),
        60,
        0.2,
        "six sessions over two workers",
    )
    per_worker = sorted(link["sessions"] for link in listing["links"])
    assert sum(per_worker) == 6 and per_worker[0] >= 2, listing
    assert all(link["task_sessions"] == 0 for link in listing["links"])  # no task servers
    assert sorted(link["worker"] for link in listing["links"]) == [0, 1]
    ping = _run(alpha, "ping", "--targets", "all", "--wait")
    assert ping["counts"]["succeeded"] == 6

    pids = [int(p) for p in re.findall(r"worker 1 started \(pid (\d+)\)", gw.log())]
    assert len(pids) == 1
    gw.signal(signal.SIGTERM)  # the first process drains and stops its workers too
    wait_until(lambda: not gw.alive(), 30, 0.1, "gateway stopped")
    wait_until(lambda: not psutil.pid_exists(pids[0]), 30, 0.1, "worker 1 stopped")


def test_a_gateway_that_cannot_enroll_says_why_in_json_and_exits_1(stack):
    base, add = stack
    args = ["--logger", "tcm.logs.json_observer", "tcm-gateway", "--state-dir", str(base / "gw")]
    gw = add(Process("gw", [*args, "--upstream", "a=https://127.0.0.1:1"], str(base / "gw.log")))
    gw.start()
    wait_until(lambda: not gw.alive(), 30, 0.1, "the gateway to give up")
    assert gw.proc is not None and gw.proc.returncode == 1
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    errors = [e for e in lines if e["level"] == "error"]
    assert errors and "upstream a is not enrolled yet" in errors[0]["message"]
    assert all("time" in e and "namespace" in e for e in lines)


def test_task_sessions_through_the_gateway_go_to_the_task_server_and_fail_over(stack):
    """An agent outside keeps its task session on the gateway, which carries it to task
    server ts1 (an upstream of the gateway); ts1 relays it to the server. ts1 dies: the
    agents' task sessions go through the gateway to the server itself; ts1 comes back:
    they return to it. Tasks run at each stage."""
    from tests.harness import TaskServerProc

    base, add = stack
    server = add(Server(str(base), name="alpha", extra=["--name", "alpha"]))
    server.start()
    ts1 = add(TaskServerProc(str(base), "ts1", server))
    ts1.start()
    gw = add(
        GatewayProc(
            str(base),
            "gw1",
            {"srv": server},
            extra=["--upstream", f"ts1=https://127.0.0.1:{ts1.port}"],
        )
    )
    gw.start()
    wait_until(
        lambda: _gateway_listing(server, "gw1")["task_servers"] == ["ts1"],
        30,
        0.1,
        "the gateway says it reaches ts1",
    )
    agents = _agents_via(base, gw, "srv", server, 2, add)
    for a in agents:
        wait_until(
            lambda a=a: a.count("task session open with ts1") >= 1, 30, 0.1, f"{a.name} on ts1"
        )
        status = agent_status(a)["task"]
        assert status["task_server"] == "ts1"
        assert status["url"].endswith(f"127.0.0.1:{gw.port}/taskserver/ts1/task/v1/ws")
    listing = {t["name"]: t for t in server.cli_json("taskservers")}["ts1"]
    assert listing["clients"] == 2 and listing["via_gateways"] == 2
    assert server.count("task session open via taskserver:ts1 via gateway:gw1") == 2
    gateway = _gateway_listing(server, "gw1")
    assert gateway["sessions"] == 2 and gateway["task_sessions"] == 0  # not on this link

    # A task: server -> ts1 (one push) -> gw1 -> agents; results back the same way.
    pushes = listing["link"]["pushes"]
    job = _run(
        server, "command.run", "--arg", 'argv=["echo","via-gw-ts"]', "--targets", "all", "--wait"
    )
    assert job["counts"]["succeeded"] == 2, job
    assert all(r["result"]["stdout"] == "via-gw-ts\n" for r in job["results"])
    assert {t["name"]: t for t in server.cli_json("taskservers")}["ts1"]["link"]["pushes"] == (
        pushes + 1
    )

    # ts1 dies: the gateway tells the server it reaches no task server; the agents' task
    # sessions go through the gateway to the server, and a task still runs.
    ts1.kill()
    for a in agents:
        wait_until(
            lambda a=a: a.count("task session open with gateway:gw1") >= 1,
            30,
            0.1,
            f"{a.name} task session through the gateway to the server",
        )
    assert _gateway_listing(server, "gw1")["task_servers"] == []
    assert "links to no connected task server" in agent_status(agents[0])["task"]["assignment"]
    job = _run(
        server, "command.run", "--arg", 'argv=["echo","fallback"]', "--targets", "all", "--wait"
    )
    assert job["counts"]["succeeded"] == 2, job
    assert all(r["result"]["stdout"] == "fallback\n" for r in job["results"])

    # ts1 is back: the gateway links to it again and the agents return to it.
    ts1.start()
    for a in agents:
        wait_until(
            lambda a=a: a.count("task session open with ts1") >= 2, 60, 0.1, f"{a.name} back"
        )
    assert _gateway_listing(server, "gw1")["task_servers"] == ["ts1"]


def _new_session(agent: AgentProc, other: str | None) -> dict:
    """The agent's persistent status once it has a session other than `other`."""
    seen: dict = {}

    def opened() -> bool:
        seen.update(agent_status(agent)["persistent"])
        return bool(seen["connected"] and seen["session"] != other)

    wait_until(opened, 60, 0.2, f"a new session of {agent.name}")
    return seen


def test_a_restarted_gateway_resumes_its_agents_with_the_tokens_it_sealed(stack):
    """issue 17: the agent's TLS ends at the gateway, which seals its resumption token (the
    server's welcome gives it); after the gateway's restart the agent's handshake resumes
    with it, no certificate on the wire. A gateway with other keys makes a full handshake
    and says why."""
    import os

    base, add = stack
    alpha = add(Server(str(base), name="alpha", extra=["--name", "alpha"]))
    alpha.start()
    mport = free_port()
    gw = add(
        GatewayProc(
            str(base),
            "gw1",
            {"up-a": alpha},
            extra=["--metrics-port", str(mport), "--drain-grace", "0.5"],
        )
    )
    gw.start()
    key_path = os.path.join(gw.state_dir, "resumption.key")
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    (agent,) = _agents_via(base, gw, "up-a", alpha, 1, add)
    first = _new_session(agent, None)
    assert first["tls"]["handshake"] == "full"

    def server_side() -> dict:  # what the gateway's `open` told the server of the handshake
        return {a["id"]: a for a in alpha.agents()}[agent.agent_id]["tls"]

    assert server_side()["handshake"] == "full"

    gw.stop()  # SIGTERM: drained (4006), then the process is gone
    gw.start()
    second = _new_session(agent, first["session"])
    # the token of the first welcome, sealed by the gateway before its restart, resumed
    # the handshake at the restarted gateway: both ends say so, and the server knows it
    assert second["tls"]["handshake"] == "token"
    wait_until(lambda: server_side()["handshake"] == "token", 20, 0.2, "the server told")
    metrics = _metrics(mport)
    assert metrics["tcm_gateway_tls_handshakes_total{kind=token}"] == 1
    assert "tcm_gateway_tls_handshakes_total{kind=full}" not in metrics

    # a gateway with other keys (another gateway's, or its secret lost): a full handshake,
    # never a refusal, and a line that says why
    gw.stop()
    with open(key_path, "wb") as f:
        f.write(os.urandom(32))
    gw.start()
    third = _new_session(agent, second["session"])
    assert third["tls"]["handshake"] == "full"
    assert gw.count("not taken (sealed with other keys): full handshake") == 1
    assert f"resumption token of agent {agent.agent_id} at 127.0.0.1:" in gw.log()
    metrics = _metrics(mport)
    assert metrics["tcm_gateway_tls_tokens_refused_total{reason=sealed with other keys}"] == 1
    assert metrics["tcm_gateway_tls_handshakes_total{kind=full}"] == 1
    # and the new gateway's own token resumes from then on
    gw.stop()
    gw.start()
    assert _new_session(agent, third["session"])["tls"]["handshake"] == "token"
