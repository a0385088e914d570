"""Reach every endpoint, with real processes: HTTP fallback, the runtime switch, local control.

The server polls fast here (poll interval 2 s, long-polls up to 5 s) so the plain-poll cases
finish quickly; the agents retry their session within 1 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.harness import PYTHON, AgentProc, Server, wait_until

pytestmark = pytest.mark.integration

SERVER_ARGS = ["--poll-interval", "2", "--long-poll", "5"]
AGENT_ARGS = ["--backoff-max", "1"]


@pytest.fixture(scope="module")
def agents(base, server):
    token = server.token(uses=3)
    procs = [
        with_counter(AgentProc(base, f"agent{i}", server, token, extra=AGENT_ARGS))
        for i in range(3)
    ]
    for p in procs:
        p.start(wait=False)
    for p in procs:
        p.wait_session(1)
    yield procs
    for p in procs:
        p.stop()


def agent_cli(agent: AgentProc, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "tcm.cli.agent", "--state-dir", agent.state_dir, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def status(agent: AgentProc) -> dict:
    r = agent_cli(agent, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_mode(agent: AgentProc, mode: str, timeout: float = 20) -> dict:
    return wait_until(
        lambda: (lambda s: s if s["mode"] == mode else None)(status(agent)),
        timeout,
        0.1,
        f"{agent.name} in mode {mode}",
    )


def counted_job(server: Server, agents: list[AgentProc], sleep: float = 0) -> str:
    """One command.run job for `agents`; each run appends a line to the running agent's own
    counter file (its path is in the agent's environment, which the command inherits)."""
    argv = ["sh", "-c", f'sleep {sleep}; echo ran >> "$TCM_TEST_COUNTER"']
    return server.cli(
        "run",
        "command.run",
        "--args-json",
        json.dumps({"argv": argv}),
        "--targets",
        ",".join(a.agent_id for a in agents),
    ).strip()


def with_counter(agent: AgentProc) -> AgentProc:
    agent.env = {"TCM_TEST_COUNTER": os.path.join(agent.state_dir, "counter")}
    return agent


def runs_of(agent: AgentProc) -> int:
    try:
        with open(os.path.join(agent.state_dir, "counter")) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def wait_done(server: Server, job_id: str, timeout: float = 30) -> dict:
    def done():
        job = server.job(job_id)
        return job if job["counts"]["completed"] == job["counts"]["total"] else None

    return wait_until(done, timeout, 0.1, f"job {job_id} to finish")


def ping(server: Server, agent: AgentProc) -> dict:
    out = server.cli_json(
        "run", "ping", "--targets", agent.agent_id, "--wait", "--wait-timeout", "30"
    )
    assert out["counts"]["succeeded"] == 1, out
    return out


def test_status_fields_are_real(server, agents):
    agent = agents[0]
    st = wait_mode(agent, "persistent")
    p = st["persistent"]
    assert p["connected"] and p["session"]
    # the TLS the agent reports is the TLS the server negotiated with it
    seen = {a["id"]: a for a in server.agents()}[agent.agent_id]
    assert seen["tls"] == p["tls"]
    assert p["tls"]["version"] in ("TLSv1.2", "TLSv1.3") and p["tls"]["cipher"]
    before_sent, before_recv = p["bytes_sent"], p["bytes_received"]
    assert before_sent > 1000 and before_recv > 1000  # the TLS handshake is on the wire too
    ping(server, agent)
    p2 = status(agent)["persistent"]
    assert p2["bytes_sent"] > before_sent and p2["bytes_received"] > before_recv
    assert st["server"] == server.url and st["proxy"] is None
    assert st["results_waiting"] == 0
    # only the agent's user may open the control socket
    sock = os.path.join(agent.state_dir, "control.sock")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"


def test_same_job_reaches_an_agent_in_each_mode(server, agents):
    agent = agents[1]
    # persistent
    wait_mode(agent, "persistent")
    j = counted_job(server, [agent])
    assert wait_done(server, j)["results"][0]["state"] == "succeeded"
    assert runs_of(agent) == 1

    # persistent connections switched off on the server: HTTPS long-poll
    server.cli("settings", "set", "persistent_connections", "false")
    try:
        wait_mode(agent, "http")
        st = wait_until(
            lambda: (lambda s: s if s["http"]["last_poll_ok"] else None)(status(agent)),
            10,
            0.1,
            "first poll answered",
        )
        assert st["http"]["polling"] and st["http"]["long_poll"] == 5
        assert "4005" in st["mode_history"][-1]["reason"]
        t0 = time.monotonic()
        j = counted_job(server, [agent])
        job = wait_done(server, j)
        assert job["results"][0]["state"] == "succeeded"
        assert time.monotonic() - t0 < 2.0  # answered by the held long-poll, not a later poll
        assert runs_of(agent) == 2
        assert {a["id"]: a for a in server.agents()}[agent.agent_id]["mode"] == "http"
    finally:
        server.cli("settings", "set", "persistent_connections", "true")
    wait_mode(agent, "persistent")

    # terminated on the endpoint by its owner: stays on HTTPS until reconnect
    r = agent_cli(agent, "disconnect")
    assert r.returncode == 0 and "http" in r.stdout
    st = wait_mode(agent, "http")
    assert st["persistent"]["disabled_by_user"] is True
    j = counted_job(server, [agent])
    assert wait_done(server, j)["results"][0]["state"] == "succeeded"
    assert runs_of(agent) == 3
    time.sleep(1.5)  # longer than the backoff cap: it must not come back by itself
    assert status(agent)["mode"] == "http"
    assert agent_cli(agent, "reconnect").returncode == 0
    wait_mode(agent, "persistent")
    assert runs_of(agent) == 3


def test_plain_polling_gets_work_at_the_next_poll(base, server):
    agent = with_counter(
        AgentProc(
            base,
            "plain-poller",
            server,
            server.token(uses=1),
            extra=AGENT_ARGS + ["--no-long-poll"],
        )
    )
    agent.start()
    try:
        assert agent_cli(agent, "disconnect").returncode == 0
        wait_mode(agent, "http")
        st = wait_until(
            lambda: (lambda s: s if s["http"]["last_poll_ok"] else None)(status(agent)),
            10,
            0.1,
            "first poll answered",
        )
        assert st["http"]["long_poll"] == 0
        j = counted_job(server, [agent])
        job = wait_done(server, j, timeout=15)
        assert job["results"][0]["state"] == "succeeded"
        assert runs_of(agent) == 1
        assert status(agent)["http"]["polls"] >= 2
    finally:
        agent.stop()


def test_switch_off_and_on_under_load_loses_nothing_runs_nothing_twice(server, agents):
    for a in agents:
        wait_mode(a, "persistent")
    before = {a.name: runs_of(a) for a in agents}
    jobs = [counted_job(server, agents, sleep=1)]  # running across the switch
    time.sleep(0.3)
    server.cli("settings", "set", "persistent_connections", "off")
    jobs.append(counted_job(server, agents))  # created while agents fall back
    for a in agents:
        wait_mode(a, "http")
    jobs.append(counted_job(server, agents))  # created while every agent polls
    server.cli("settings", "set", "persistent_connections", "on")
    jobs.append(counted_job(server, agents))  # created while they come back
    for a in agents:
        wait_mode(a, "persistent")
    jobs.append(counted_job(server, agents))
    for j in jobs:
        job = wait_done(server, j)
        assert job["counts"]["succeeded"] == 3, job
    for a in agents:
        assert runs_of(a) - before[a.name] == len(jobs), a.name
        history = status(a)["mode_history"]
        assert [h["to"] for h in history][-2:] == ["http", "persistent"]


@pytest.fixture
def proxy_factory(tmp_path):
    from tests.test_proxy import TINYPROXY, Tinyproxy

    if TINYPROXY is None:
        pytest.fail("tinyproxy is not installed: apt-get install tinyproxy (.ci/run does)")
    started = []

    def start(connect_ports, basic_auth=None):
        directory = tmp_path / f"tinyproxy{len(started)}"
        directory.mkdir()
        proxy = Tinyproxy(str(directory), connect_ports, basic_auth)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        p.stop()


def test_agent_through_a_real_proxy_enrolls_connects_and_polls(base, server, proxy_factory):
    proxy = proxy_factory([server.port], basic_auth=("agent", "s3cret"))
    url = f"http://agent:s3cret@127.0.0.1:{proxy.port}"
    agent = with_counter(
        AgentProc(
            base, "proxied", server, server.token(uses=1), extra=AGENT_ARGS + ["--proxy", url]
        )
    )
    agent.start()
    try:
        st = wait_mode(agent, "persistent")
        assert st["proxy"] == f"http://agent:***@127.0.0.1:{proxy.port}"
        assert "s3cret" not in agent.log()
        j = counted_job(server, [agent])
        assert wait_done(server, j)["results"][0]["state"] == "succeeded"
        # the same proxy carries the HTTPS fallback
        assert agent_cli(agent, "disconnect").returncode == 0
        wait_mode(agent, "http")
        j = counted_job(server, [agent])
        assert wait_done(server, j)["results"][0]["state"] == "succeeded"
        assert runs_of(agent) == 2
        assert proxy.log_text().count(f"CONNECT 127.0.0.1:{server.port}") >= 3  # enroll, WSS, HTTPS
    finally:
        agent.stop()


def test_proxy_that_forbids_connect_is_named_as_the_reason(base, server, proxy_factory):
    agent = AgentProc(base, "blocked", server, server.token(uses=1), extra=AGENT_ARGS)
    agent.start()  # enrolled directly
    agent.stop()
    proxy = proxy_factory([443])  # CONNECT only to 443: not to the server's port
    agent.args += ["--proxy", f"http://127.0.0.1:{proxy.port}"]
    agent.start(wait=False)
    try:
        expected = f"refused CONNECT to 127.0.0.1:{server.port}: 403"

        def reason_given():
            r = agent_cli(agent, "status", "--json")
            if r.returncode != 0:  # the control socket is not up yet
                return None
            st = json.loads(r.stdout)
            return (
                st
                if (
                    st["mode"] == "disconnected"
                    and expected in (st["last_refusal"] or "")
                    and expected in (st["http"]["last_error"] or "")
                )
                else None
            )

        st = wait_until(reason_given, 20, 0.2, "the proxy refusal in the status")
        assert st["persistent"]["connected"] is False
        assert expected in agent.log()  # and a clear log line, not a hang
        assert agent.alive()
    finally:
        agent.stop()
