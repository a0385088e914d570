"""Daemons that cannot start say why and exit with status 1 (a supervisor sees the failure)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.harness import PYTHON, free_port

pytestmark = pytest.mark.integration

TWISTD = [PYTHON, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]


def run(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(TWISTD + args, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_server_with_a_broken_database_exits_1(tmp_path):
    state = tmp_path / "server"
    state.mkdir()
    (state / "tcm.sqlite").write_bytes(b"this is not a database" * 100)
    port = free_port()
    r = run(["tcm-server", "--state-dir", str(state), "--port", str(port)], str(tmp_path))
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "server failed to start" in out
    assert "file is not a database" in out


def test_agent_without_enrollment_data_exits_1(tmp_path):
    r = run(["tcm-agent", "--state-dir", str(tmp_path / "agent")], str(tmp_path))
    assert r.returncode == 1
    assert "not enrolled yet: give --server, --ca-cert and --token" in r.stdout + r.stderr


def test_agent_refused_enrollment_exits_1(tmp_path):
    from tests.harness import Server

    server = Server(str(tmp_path))
    server.start()
    try:
        r = run(
            [
                "tcm-agent",
                "--state-dir",
                str(tmp_path / "agent"),
                "--server",
                server.url,
                "--ca-cert",
                server.ca,
                "--token",
                "nope.nope",
            ],
            str(tmp_path),
        )
    finally:
        server.stop()
    assert r.returncode == 1
    assert "enrollment refused" in r.stdout and "unknown enrollment token" in r.stdout
    assert not os.path.exists(tmp_path / "agent" / "cert.pem")


def test_agent_waits_for_an_unreachable_server_to_enroll_then_enrolls(tmp_path):
    """A server that is down (or too busy to answer) at the agent's first start is tried
    again with the backoff; once it answers, the agent enrolls and opens its session."""
    from tests.harness import AgentProc, Server, wait_until

    server = Server(str(tmp_path))
    server.start()
    token = server.token(uses=1)
    server.stop()
    agent = AgentProc(str(tmp_path), "patient", server, token, extra=["--backoff-max", "2"])
    try:
        agent.start(wait=False)
        wait_until(
            lambda: agent.count("to enroll: ") >= 2 and agent.count("trying again in") >= 2,
            30,
            0.1,
            "two attempts while the server is down",
        )
        assert agent.alive()
        server.start()
        agent.wait_session(1, timeout=60)
        assert [a["id"] for a in server.agents()] == [agent.agent_id]
    finally:
        agent.stop()
        server.stop()


def test_agent_given_the_wrong_ca_does_not_retry_enrollment_and_exits_1(tmp_path):
    """A server whose certificate the agent's --ca-cert does not verify is a configuration
    error, not an outage: the agent says so and exits 1 instead of retrying."""
    from tcm.server.ca import CertificateAuthority
    from tests.harness import Server

    other = CertificateAuthority.load_or_create(str(tmp_path / "other"), "other")
    wrong = tmp_path / "other.pem"
    wrong.write_bytes(other.cert_pem)
    server = Server(str(tmp_path))
    server.start()
    try:
        token = server.token(uses=1)
        r = run(
            ["tcm-agent", "--state-dir", str(tmp_path / "agent"), "--server", server.url,
             "--ca-cert", str(wrong), "--token", token],
            str(tmp_path),
        )  # fmt: skip
    finally:
        server.stop()
    assert r.returncode == 1
    assert "its certificate is not trusted with the given --ca-cert" in r.stdout
    assert "certificate verify failed" in r.stdout and "trying again" not in r.stdout
