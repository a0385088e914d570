"""Task servers with real processes: twistd tcm-server, two twistd tcm-taskserver, six agents.

What is checked (issue: task servers and the all-in-one service):
- agents spread over the task servers by the policy, and task jobs go through them;
- a task server's maximum is enforced, and the agent left over says why;
- stopping a task server moves its agents to the other, and a task running meanwhile ends
  with its result stored exactly once;
- output of a long command reaches `tcm jobs follow` while the command still runs;
- `twistd tcm` serves agents and tasks from one process.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.harness import (
    PYTHON,
    AgentProc,
    Process,
    Server,
    TaskServerProc,
    agent_status,
    start_agents,
    wait_until,
)

pytestmark = pytest.mark.integration

TASK_OPEN = "task session open with"


def _taskservers(server: Server) -> dict[str, dict]:
    return {t["name"]: t for t in server.cli_json("taskservers")}


def _run(server: Server, *args: str) -> dict:
    out = server.cli("run", *args, "--json")
    return json.loads(out)


def _agents(base, server: Server, n: int, add) -> list[AgentProc]:
    return [add(a) for a in start_agents(str(base), server, n)]


def _wait_task_sessions(agents: list[AgentProc], n: int = 1) -> None:
    for a in agents:
        wait_until(lambda a=a: a.count(TASK_OPEN) >= n, 30, 0.05, f"{a.name} task session")


def test_two_task_servers_spread_failover_and_exactly_once(stack):
    base, add = stack
    server = add(Server(str(base)))
    server.start()
    ts1 = add(TaskServerProc(str(base), "ts1", server))
    ts2 = add(TaskServerProc(str(base), "ts2", server))
    ts1.start()
    ts2.start()
    agents = _agents(base, server, 6, add)
    _wait_task_sessions(agents)

    listing = wait_until(
        lambda: (lambda t: t if t["ts1"]["clients"] + t["ts2"]["clients"] == 6 else None)(
            _taskservers(server)
        ),
        20,
        0.1,
        "six task sessions",
    )
    # policy "fewest": three and three
    assert listing["ts1"]["assigned"] == 3 and listing["ts2"]["assigned"] == 3
    assert listing["ts1"]["clients"] == 3 and listing["ts2"]["clients"] == 3
    on = {a.agent_id: agent_status(a)["task"]["task_server"] for a in agents}
    assert sorted(on.values()) == ["ts1"] * 3 + ["ts2"] * 3

    # A task goes through the task servers: one push per task server link.
    pushes = {n: t["link"]["pushes"] for n, t in listing.items()}
    job = _run(
        server, "command.run", "--arg", 'argv=["echo","via-ts"]', "--targets", "all", "--wait"
    )
    assert job["counts"]["succeeded"] == 6, job
    listing = _taskservers(server)
    assert all(listing[n]["link"]["pushes"] == pushes[n] + 1 for n in ("ts1", "ts2"))
    # ... a quick action does not.
    frames = {n: t["link"]["frames_out"] for n, t in listing.items()}
    ping = _run(server, "ping", "--targets", "all", "--wait")
    assert ping["counts"]["succeeded"] == 6
    listing = _taskservers(server)
    assert all(listing[n]["link"]["frames_out"] == frames[n] for n in ("ts1", "ts2"))

    # A long task; ts2 dies while it runs.
    gate = base / "go"
    job_id = server.gated_task(gate)
    wait_until(lambda: server.job(job_id)["counts"]["running"] == 6, 30, 0.1, "all six running")
    moved = [a for a in agents if on[a.agent_id] == "ts2"]
    ts2.kill()  # dies: no drain, no goodbye
    # Its agents go to ts1 (a notify from the server), within their backoff.
    for a in moved:
        wait_until(lambda a=a: a.count(TASK_OPEN) >= 2, 30, 0.05, f"{a.name} moved to ts1")
        assert agent_status(a)["task"]["task_server"] == "ts1"
    assert "task server ts2 is down" in server.log()
    listing = _taskservers(server)
    assert listing["ts2"]["state"] == "down"
    assert listing["ts1"]["assigned"] == 6
    gate.write_text("go")
    result = wait_until(
        lambda: (lambda j: j if j["counts"]["completed"] == 6 else None)(server.job(job_id)),
        30,
        0.1,
        "the long task to finish everywhere",
    )
    assert result["counts"]["succeeded"] == 6, result
    for r in result["results"]:
        assert r["result"]["stdout"] == "started\nfinished\n"  # ran once, to the end
    for a in agents:
        entry = a.ledger().get(job_id)
        assert entry is None or entry["state"] == "acked"
        assert "interrupted" not in a.log()


def test_task_server_maximum_and_overflowagent_status(stack):
    base, add = stack
    server = add(Server(str(base)))
    server.start()
    ts = add(TaskServerProc(str(base), "small", server, max_clients=1))
    ts.start()
    agents = _agents(base, server, 2, add)
    wait_until(lambda: sum(a.count(TASK_OPEN) for a in agents) >= 1, 30, 0.05, "one task session")
    statuses = [agent_status(a)["task"] for a in agents]
    placed = [s for s in statuses if s["task_server"] == "small"]
    left = [s for s in statuses if s["task_server"] is None]
    assert len(placed) == 1 and len(left) == 1, statuses
    assert left[0]["assignment"] == "all 1 task servers are full"
    listing = _taskservers(server)
    assert listing["small"]["state"] == "full"
    assert listing["small"]["assigned"] == 1 and listing["small"]["max_clients"] == 1
    # The agent without a task server still runs tasks, over its own session.
    job = _run(server, "command.run", "--arg", 'argv=["echo","ok"]', "--targets", "all", "--wait")
    assert job["counts"]["succeeded"] == 2


def test_output_reaches_follow_while_the_command_runs(stack):
    base, add = stack
    server = add(Server(str(base)))
    server.start()
    add(TaskServerProc(str(base), "ts1", server)).start()
    (agent,) = _agents(base, server, 1, add)
    _wait_task_sessions([agent])
    gate = base / "release"
    job_id = server.gated_task(gate, "first-line", "last-line")
    follow = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "tcm.cli.admin",
            "--state-dir",
            server.state_dir,
            "jobs",
            "follow",
            job_id,
            "--raw",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        first = follow.stdout.readline()  # blocks until follow prints it (bounded below)
        assert first == "first-line\n"
        # The command is still running: it waits for the gate, which does not exist yet.
        assert server.job(job_id)["counts"]["running"] == 1
        assert not gate.exists()
        gate.write_text("go")
        rest, _ = follow.communicate(timeout=30)
        assert rest == "last-line\n"
        assert follow.returncode == 0
    finally:
        if follow.poll() is None:
            follow.kill()
    assert _taskservers(server)["ts1"]["link"]["frames_in"] > 0


def test_all_in_one_serves_agents_and_tasks_from_one_process(stack):
    base, add = stack
    server = add(Server(str(base), name="tcm", plugin="tcm"))
    server.start()
    (agent,) = _agents(base, server, 1, add)
    _wait_task_sessions([agent])
    assert agent_status(agent)["task"]["task_server"] == "local"
    listing = _taskservers(server)
    assert listing["local"]["clients"] == 1
    job = _run(
        server, "command.run", "--arg", 'argv=["echo","one-process"]', "--targets", "all", "--wait"
    )
    assert job["counts"]["succeeded"] == 1
    assert job["results"][0]["result"]["stdout"] == "one-process\n"
    assert _taskservers(server)["local"]["link"]["frames_in"] > 0  # result came via the relay
    assert _run(server, "ping", "--targets", "all", "--wait")["counts"]["succeeded"] == 1
    assert server.alive() and "task server local: agents at" in server.log()  # one process


# -- bad input ---------------------------------------------------------------------------------


def _upgrade(port: int, ca: str, path: str, cert: tuple[str, str] | None = None) -> str:
    """A WebSocket upgrade over real TLS; the HTTP status line and body of the answer."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(
                (
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: "
                    f"{'tcm.link.v1' if 'link' in path else 'tcm.v1'}\r\n\r\n"
                ).encode()
            )
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            try:
                data += s.recv(4096)
            except (TimeoutError, OSError):
                pass
    return data.decode("latin-1")


def test_refusals_at_the_task_server_and_the_link(stack):
    base, add = stack
    server = add(Server(str(base)))
    server.start()
    ts = add(TaskServerProc(str(base), "ts1", server))
    ts.start()
    (agent,) = _agents(base, server, 1, add)
    agent_cert = (
        os.path.join(agent.state_dir, "cert.pem"),
        os.path.join(agent.state_dir, "key.pem"),
    )
    # no client certificate at the task server's agent endpoint
    answer = _upgrade(ts.port, server.ca, "/task/v1/ws")
    assert answer.startswith("HTTP/1.1 403") and "an agent certificate is required" in answer
    # an agent's certificate on the node link
    answer = _upgrade(server.port, server.ca, "/link/v1/ws", cert=agent_cert)
    assert answer.startswith("HTTP/1.1 403") and "a node certificate is required" in answer
    # a node's certificate at the agent endpoints
    node_cert = (os.path.join(ts.state_dir, "cert.pem"), os.path.join(ts.state_dir, "key.pem"))
    answer = _upgrade(ts.port, server.ca, "/task/v1/ws", cert=node_cert)
    assert answer.startswith("HTTP/1.1 403")
    answer = _upgrade(server.port, server.ca, "/agent/v1/ws", cert=node_cert)
    assert answer.startswith("HTTP/1.1 403") and "unknown agent node:ts1" in answer
    # the task server's link endpoint for gateways: an agent's certificate, and a node
    # certificate of a node that is no gateway the server enrolled
    answer = _upgrade(ts.port, server.ca, "/link/v1/ws", cert=agent_cert)
    assert answer.startswith("HTTP/1.1 403") and "node certificate is required" in answer
    answer = _upgrade(ts.port, server.ca, "/link/v1/ws", cert=node_cert)
    assert answer.startswith("HTTP/1.1 403")
    assert "gateway 'ts1' is not registered with this task server's server" in answer


def test_bad_task_server_registrations_and_enrollments(stack):
    base, add = stack
    server = add(Server(str(base)))
    server.start()
    r = server.cli_result("taskservers", "enroll", "Bad Name!")
    assert r.returncode != 0 and "'name' must be a node name" in r.stderr
    r = server.cli_result("taskservers", "enroll", "ts1", "--max-clients", "0")
    assert r.returncode != 0 and "'max_clients' must be a positive integer" in r.stderr
    good = server.cli("taskservers", "enroll", "ts1").strip()
    # a wrong secret: the task server says why and exits 1
    ts = TaskServerProc(str(base), "ts1", server)
    ts.args = [
        "tcm-taskserver",
        "--server",
        server.url,
        "--state-dir",
        ts.state_dir,
        "--port",
        str(ts.port),
        "--ca-cert",
        server.ca,
        "--token",
        "ts1." + "0" * 48,
    ]
    Process.start(ts)
    assert ts.proc is not None and ts.proc.wait(30) == 1
    assert "no enrollment pending for node 'ts1' with this token" in ts.log()
    # a malformed token
    ts.args[-1] = "nodot"
    Process.start(ts)
    assert ts.proc.wait(30) == 1
    assert "a node token looks like NAME.SECRET" in ts.log()
    # the right one still works: a refused attempt does not use it up
    ts.args[-1] = good
    add(ts)
    Process.start(ts)
    wait_until(lambda: _taskservers(server)["ts1"]["state"] == "up", 30, 0.1, "ts1 up")
    # a token is good once
    again = TaskServerProc(str(base), "ts1-copy", server)
    again.args = [
        "tcm-taskserver",
        "--server",
        server.url,
        "--state-dir",
        again.state_dir,
        "--port",
        str(again.port),
        "--ca-cert",
        server.ca,
        "--token",
        good,
    ]
    Process.start(again)
    assert again.proc is not None and again.proc.wait(30) == 1
    assert "no enrollment pending for node 'ts1'" in again.log()


def test_server_killed_mid_task_with_a_task_server_loses_nothing(stack):
    base, add = stack
    server = add(Server(str(base)))
    server.start()
    ts = add(TaskServerProc(str(base), "ts1", server))
    ts.start()
    agents = _agents(base, server, 2, add)
    _wait_task_sessions(agents)
    gate = base / "go"
    job_id = server.gated_task(gate)
    wait_until(lambda: server.job(job_id)["counts"]["running"] == 2, 30, 0.1, "both running")
    server.kill()  # the management server dies; the task server and the agents stay
    gate.write_text("go")  # the tasks finish while it is down: results wait in the spools
    for a in agents:
        wait_until(
            lambda a=a: (a.ledger().get(job_id) or {}).get("state") == "finished",
            30,
            0.1,
            f"{a.name} finished the task",
        )
    server.start()
    # the link comes back, the agents get their task sessions again, the results are stored
    for a in agents:
        wait_until(lambda a=a: a.count(TASK_OPEN) >= 2, 60, 0.1, f"{a.name} task session again")
    result = wait_until(
        lambda: (lambda j: j if j["counts"]["completed"] == 2 else None)(server.job(job_id)),
        60,
        0.2,
        "both results stored",
    )
    assert result["counts"]["succeeded"] == 2
    assert all(r["result"]["stdout"] == "started\nfinished\n" for r in result["results"])
    for a in agents:
        assert a.ledger().get(job_id) is None or a.ledger()[job_id]["state"] == "acked"
    job = _run(
        server, "command.run", "--arg", 'argv=["echo","after"]', "--targets", "all", "--wait"
    )
    assert job["counts"]["succeeded"] == 2
    assert _taskservers(server)["ts1"]["state"] == "up"


def test_a_restarted_task_server_resumes_task_sessions_with_its_own_tokens(stack):
    """issue 17: the agent's task session ends its TLS at the task server, which seals its
    token (the server's welcome of the task session gives it); restarted, the task server
    resumes the agent's handshake with it. The core session on the same host keeps its own
    token: tokens are kept per HOST:PORT."""
    base, add = stack
    server = add(Server(str(base)))
    server.start()
    ts = add(TaskServerProc(str(base), "ts1", server))
    ts.start()
    (agent,) = _agents(base, server, 1, add)
    _wait_task_sessions([agent])
    first = agent_status(agent)["task"]
    assert first["task_server"] == "ts1" and first["tls"]["handshake"] == "full"
    core = agent_status(agent)["persistent"]["session"]

    ts.stop()
    ts.start()
    _wait_task_sessions([agent], 2)

    def second_session() -> dict | None:
        task = agent_status(agent)["task"]
        return task if task["connected"] and task["session"] != first["session"] else None

    second = wait_until(second_session, 30, 0.2, "the task session back at ts1")
    assert second["task_server"] == "ts1" and second["tls"]["handshake"] == "token"
    assert "resumption token" not in ts.log()  # the server's token never went to ts1
    assert agent_status(agent)["persistent"]["session"] == core  # untouched meanwhile
