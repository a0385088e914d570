"""The admin listener (`--admin-listen`): the admin API answers under a handshake flood.

A real server with the admission gate's default (100 handshakes at once) and an admin
listener. 1,000 connections that never finish TLS (half idle, half stalled after the first
bytes of a ClientHello record) are opened on the agents' port until the server counts all
of them (100 running, 900 waiting). Then, with counts, not times:

- an admin request on the admin listener is answered while all 1,000 are still held open;
- on the agents' port a TLS handshake waits its turn behind them: the gate still counts
  connections waiting while it has not been answered.

server.json names the admin listener, so the CLI goes there by itself.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import ssl
import urllib.request

import pytest

from tests.harness import Server, free_port, wait_until

FLOOD = 1000
LIMIT = 100  # --max-handshakes (the default)


def _metric(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _still_open(sock: socket.socket) -> bool:
    """The server has not closed this connection (no EOF, no reset, nothing sent)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def _admin_get(port: int, ca: str, token: str, path: str) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_admin_listener_answers_while_1000_stalling_connections_are_held(tmp_path):
    admin_port, metrics_port = free_port(), free_port()
    server = Server(
        str(tmp_path),
        extra=[
            "--admin-listen",
            f"tcm:{admin_port}:interface=127.0.0.1",
            "--metrics-port",
            str(metrics_port),
        ],
    )
    server.start()
    flood: list[socket.socket] = []
    try:
        with open(os.path.join(server.state_dir, "server.json")) as f:
            assert json.load(f)["url"] == f"https://127.0.0.1:{admin_port}"
        with open(os.path.join(server.state_dir, "admin.token")) as f:
            token = f.read().strip()

        for i in range(FLOOD):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            if i % 2:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello record, cut short
            flood.append(sock)
        # every one of them accepted and counted by the gate: LIMIT run, the rest wait
        wait_until(
            lambda: _metric(metrics_port, "tcm_server_handshakes_queued_total") >= FLOOD - LIMIT,
            60,
            0.2,
            "the server to count the flood",
        )

        status, body = _admin_get(admin_port, server.ca, token, "/api/v1/agents")
        assert status == 200, body
        closed = [i for i, s in enumerate(flood) if not _still_open(s)]
        assert not closed, f"the flood must still be held: {len(closed)} closed, {closed[:20]}"
        assert _metric(metrics_port, "tcm_server_handshakes_waiting") > 0
        # the CLI finds the admin listener through server.json
        assert server.cli_result("status").returncode == 0
        assert all(_still_open(s) for s in flood)

        # On the agents' port a handshake waits its turn behind the flood.
        probe = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        context = ssl.create_default_context(cafile=server.ca)
        context.check_hostname = False
        tls = context.wrap_socket(probe, do_handshake_on_connect=False)
        tls.settimeout(2.0)
        with pytest.raises(TimeoutError):
            tls.do_handshake()
        waiting = _metric(metrics_port, "tcm_server_handshakes_waiting")
        assert waiting > 0, "the agents' port still has connections waiting their turn"
        tls.close()
    finally:
        for sock in flood:
            sock.close()
        server.stop()


def test_admin_listen_must_be_an_endpoint(tmp_path):
    from twisted.python import usage

    from tcm.server.tap import Options

    options = Options()
    with pytest.raises(usage.UsageError, match="--admin-listen"):
        options.parseOptions(["--state-dir", str(tmp_path), "--admin-listen", "nonsense:1"])
    options = Options()
    options.parseOptions(["--state-dir", str(tmp_path), "--admin-listen", "tcm:9443"])
    assert options["admin-listen"] == ["tcm:9443"]


def test_the_all_in_one_takes_admin_listen_too(tmp_path):
    from tcm.allinone import Options as AllInOneOptions
    from tcm.server.tap import config_from

    options = AllInOneOptions()
    options.parseOptions(
        ["--state-dir", str(tmp_path), "--admin-listen", "tcm:9443:interface=127.0.0.1"]
    )
    assert config_from(options).admin_listen == ["tcm:9443:interface=127.0.0.1"]
