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
