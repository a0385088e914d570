"""The core loop with real processes: twistd tcm-server, three twistd tcm-agent, the tcm CLI.

Real TLS on loopback, real certificates from the server's CA, the CLI used as an admin would.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.harness import AgentProc, Server, wait_until

pytestmark = pytest.mark.integration


def counter_command(path: str) -> list[str]:
    """A command whose every run leaves one line in `path`: counts executions."""
    return ["sh", "-c", f"echo ran >> {path}; echo done"]


def runs(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def test_enrolled_agents_are_listed_online(server, agents):
    listed = {a["id"]: a for a in server.agents()}
    for p in agents:
        assert listed[p.agent_id]["online"] is True
        assert listed[p.agent_id]["connected_since"] is not None
    # the agent id is the subject of the certificate the server's CA issued
    from tcm.tls import pki

    with open(os.path.join(agents[0].state_dir, "cert.pem"), "rb") as f:
        cert = pki.load_certificate(f.read())
    assert pki.common_name(cert) == agents[0].agent_id
    assert oct(os.stat(os.path.join(agents[0].state_dir, "key.pem")).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.join(server.state_dir, "admin.token")).st_mode & 0o777) == "0o600"


def test_inventory_collect_all_three(server, agents):
    ids = {p.agent_id for p in agents}
    out = server.cli_json("run", "inventory.collect", "--targets", ",".join(sorted(ids)), "--wait")
    assert out["counts"]["succeeded"] == 3 and out["counts"]["total"] == 3
    assert {r["agent"] for r in out["results"]} == ids
    for r in out["results"]:
        assert r["state"] == "succeeded"
        classes = r["result"]["classes"]
        assert classes["hostname"]["hostname"]
        assert classes["memory"]["total"] > 0
        assert classes["cpu"]["logical"] >= 1
        assert classes["os"]["system"] == "Linux"
        assert isinstance(classes["software"], (list, dict))
        assert classes["network"]


def test_ping_all_with_targets_all(server, agents):
    out = server.cli_json(
        "run", "ping", "--targets", "all", "--wait", "--ttl", "20", "--wait-timeout", "30"
    )
    mine = {r["agent"]: r for r in out["results"]}
    for p in agents:
        assert mine[p.agent_id]["state"] == "succeeded"
        assert mine[p.agent_id]["result"]["pong"] is True


def test_command_run_streams_output_before_it_ends(server, agents):
    target = agents[0].agent_id
    argv = json.dumps(["sh", "-c", "echo first; sleep 1.5; echo second"])
    job_id = server.cli("run", "command.run", "--arg", f"argv={argv}", "--targets", target).strip()

    def first_chunk_seen():
        out = server.cli("jobs", "show", job_id, "--json")
        job = json.loads(out)
        chunks = _output(server, job_id)
        text = "".join(c["text"] for c in chunks)
        return "first" in text and job["counts"]["completed"] == 0

    wait_until(first_chunk_seen, 10, 0.1, "first output line while the command runs")
    out = server.cli_json("run", "ping", "--targets", target, "--wait")  # still serving
    assert out["counts"]["succeeded"] == 1
    job = _wait_done(server, job_id)
    result = job["results"][0]["result"]
    assert result["exit_code"] == 0
    assert result["stdout"] == "first\nsecond\n"
    follow = server.cli("jobs", "follow", job_id)
    assert "first" in follow and "second" in follow


def test_command_run_failure_has_reason(server, agents):
    out = server.cli_json(
        "run",
        "command.run",
        "--arg",
        'argv=["sh","-c","exit 3"]',
        "--targets",
        agents[1].agent_id,
        "--wait",
    )
    r = out["results"][0]
    assert r["state"] == "failed"
    assert "exit code 3" in r["error"]
    assert r["result"]["exit_code"] == 3


def test_stopped_agent_runs_job_once_when_back_within_ttl(base, server, agents):
    agent = agents[2]
    counter = os.path.join(base, "counter-within-ttl")
    job_id = _counted_job_for_stopped_agent(server, agent, counter, ttl=60)
    queued = server.job(job_id)
    # queued for an agent with no session and no waiting poll: counted and said apart
    assert queued["counts"]["not_connected"] == 1 and queued["counts"]["pending"] == 0
    assert queued["results"][0]["state"] == "pending"
    assert queued["results"][0]["reason"] == "not connected"
    time.sleep(0.5)
    assert runs(counter) == 0
    agent.start()
    job = _wait_done(server, job_id)
    assert job["results"][0]["state"] == "succeeded"
    assert runs(counter) == 1
    # reconnecting again redelivers nothing that runs twice
    agent.stop()
    agent.start()
    out = server.cli_json("run", "ping", "--targets", agent.agent_id, "--wait")
    assert out["counts"]["succeeded"] == 1
    assert runs(counter) == 1


def test_agent_back_after_ttl_never_runs_it(base, server, agents):
    agent = agents[2]
    counter = os.path.join(base, "counter-after-ttl")
    job_id = _counted_job_for_stopped_agent(server, agent, counter, ttl=1)
    job = _wait_done(server, job_id, timeout=10)
    assert job["results"][0]["state"] == "expired"
    agent.start()
    out = server.cli_json("run", "ping", "--targets", agent.agent_id, "--wait")
    assert out["counts"]["succeeded"] == 1
    assert runs(counter) == 0
    assert server.job(job_id)["results"][0]["state"] == "expired"


def test_server_killed_mid_job_loses_no_result(base, server, agents):
    agent = agents[0]
    counter = os.path.join(base, "counter-server-kill")
    argv = ["sh", "-c", f"sleep 2; echo ran >> {counter}; echo finished"]
    job_id = server.cli(
        "run",
        "command.run",
        "--args-json",
        json.dumps({"argv": argv}),
        "--targets",
        agent.agent_id,
        "--timeout",
        "30",
    ).strip()
    wait_until(
        lambda: server.job(job_id)["results"][0]["state"] == "running", 10, 0.05, "job running"
    )
    sessions_before = agent.count(AgentProc.SESSION_OPEN)
    server.kill()
    time.sleep(2.5)  # the command finishes while the server is down
    assert runs(counter) == 1
    server.start()
    agent.wait_session(sessions_before + 1)
    job = _wait_done(server, job_id)
    r = job["results"][0]
    assert r["state"] == "succeeded"
    assert r["result"]["stdout"] == "finished\n"
    assert runs(counter) == 1
    for p in agents:  # everyone else is back too
        p.wait_session(2 if p is not agent else sessions_before + 1)


def test_agent_killed_after_finishing_before_ack_still_delivers(base, server, agents):
    agent = agents[1]
    counter = os.path.join(base, "counter-agent-kill")
    argv = ["sh", "-c", f"sleep 1; echo ran >> {counter}; echo result-line"]
    job_id = server.cli(
        "run", "command.run", "--args-json", json.dumps({"argv": argv}), "--targets", agent.agent_id
    ).strip()
    wait_until(
        lambda: server.job(job_id)["results"][0]["state"] == "running", 10, 0.05, "job running"
    )
    server.signal(signal.SIGSTOP)  # the server takes nothing more: no ack can come
    try:
        wait_until(
            lambda: agent.ledger().get(job_id, {}).get("state") == "finished",
            10,
            0.05,
            "result spooled on the agent",
        )
        agent.kill()
    finally:
        server.signal(signal.SIGCONT)
    assert agent.ledger()[job_id]["state"] == "finished"  # survived the kill, on disk
    agent.start()
    job = _wait_done(server, job_id)
    assert job["results"][0]["state"] == "succeeded"
    assert job["results"][0]["result"]["stdout"] == "result-line\n"
    assert runs(counter) == 1
    # acknowledged: the result left the spool
    wait_until(lambda: job_id not in agent.ledger(), 10, 0.05, "spooled result removed")


def _counted_job_for_stopped_agent(server: Server, agent: AgentProc, counter: str, ttl: float):
    """Stop the agent, wait until the server sees it offline, then create a job for it whose
    every run leaves a line in `counter`."""
    agent.stop()
    wait_until(lambda: not _online(server, agent.agent_id), 10, 0.1, "agent offline")
    return server.cli(
        "run",
        "command.run",
        "--args-json",
        json.dumps({"argv": counter_command(counter)}),
        "--targets",
        agent.agent_id,
        "--ttl",
        str(ttl),
    ).strip()


def _online(server: Server, agent_id: str) -> bool:
    return any(a["id"] == agent_id and a["online"] for a in server.agents())


def _output(server: Server, job_id: str) -> list[dict]:
    from tcm.cli.admin import Api

    with open(os.path.join(server.state_dir, "admin.token")) as f:
        api = Api(server.url, server.ca, f.read().strip())
    return api.call("GET", f"/jobs/{job_id}/output")["output"]


def _wait_done(server: Server, job_id: str, timeout: float = 30) -> dict:
    def done():
        job = server.job(job_id)
        return job if job["counts"]["completed"] == job["counts"]["total"] else None

    return wait_until(done, timeout, 0.1, f"job {job_id} to finish")


def test_example_plugin_installed_separately_runs_end_to_end(base, server, agents, tmp_path):
    """The example plugin, pip-installed into its own directory (as a separate distribution
    would be), is discovered by a real agent, declared in its hello and run by a job."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    src = tmp_path / "example-src"
    shutil.copytree(os.path.join(ROOT, "examples", "tcm-example-plugin"), src)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (target / "tcm" / "plugins" / "example_disk_usage.py").exists()
    agent = AgentProc(base, "plugin-agent", server, server.token(uses=1))
    agent.env = {"PYTHONPATH": str(target)}
    agent.start()
    try:
        out = server.cli_json(
            "run",
            "example.disk_usage",
            "--arg",
            f"path={base}",
            "--targets",
            agent.agent_id,
            "--wait",
        )
        r = out["results"][0]
        assert r["state"] == "succeeded", r
        assert r["result"]["total"] > 0 and r["result"]["path"] == base
        listed = {a["id"]: a for a in server.agents()}
        assert "example.disk_usage" in listed[agent.agent_id]["capabilities"]
        # an agent without the plugin: its target ends `unsupported` at once, never sent
        other = server.cli_json(
            "run",
            "example.disk_usage",
            "--arg",
            f"path={base}",
            "--targets",
            agents[0].agent_id,
            "--wait",
        )
        assert other["results"][0]["state"] == "unsupported"
        assert "no handler" in other["results"][0]["error"]
        assert other["counts"]["unsupported"] == 1
    finally:
        agent.stop()
