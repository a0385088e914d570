#!/usr/bin/env python3
"""How long an admin request takes while N connections stall on the agents' port, with and
without an admin listener (`--admin-listen`).

For each N: one real `twistd tcm-server` on loopback (max 100 handshakes at once, the
default), N TCP connections to its agents' port that never finish TLS (half idle, half
stalled after the first bytes of a ClientHello), then one admin request (`GET /api/v1/agents`,
a fresh TLS connection) timed on the agents' port and on the admin listener. Every wait is
bounded (--timeout); everything listens on 127.0.0.1 only.

Usage: .venv/bin/python bench/admin_flood.py [--counts 0,300,1000] [--timeout 60]
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import ssl
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchServer, emit  # noqa: E402


def admin_latency(port: int, ca: str, token: str, timeout: float) -> float | None:
    """Seconds until `GET /api/v1/agents` on `port` is answered 200; None past `timeout`."""
    context = ssl.create_default_context(cafile=ca)
    t0 = time.monotonic()
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=timeout)
    try:
        conn.request("GET", "/api/v1/agents", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"admin request answered {response.status}")
        return time.monotonic() - t0
    except TimeoutError:
        return None
    finally:
        conn.close()


def stall(port: int, n: int) -> list[socket.socket]:
    """N connections that never finish a TLS handshake."""
    held = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello record, cut short
        held.append(sock)
    return held


def run(n: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tcm-bench-") as base:
        server = BenchServer(base)
        admin_port = server.admin_port
        server.start()
        held: list[socket.socket] = []
        try:
            with open(os.path.join(server.state_dir, "admin.token")) as f:
                token = f.read().strip()
            held = stall(server.port, n)
            time.sleep(0.5)  # let the server accept them all
            via_admin = admin_latency(admin_port, server.ca, token, timeout)
            via_agents = admin_latency(server.port, server.ca, token, timeout)
            return {
                "stalling": n,
                "agents_port_s": via_agents,
                "admin_listener_s": via_admin,
            }
        finally:
            for sock in held:
                sock.close()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="0,300,1000", help="stalling connections, by comma")
    parser.add_argument("--timeout", type=float, default=60.0, help="most seconds per request")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if any(c < 0 or c > 5000 for c in counts):
        parser.error("--counts: each between 0 and 5000")
    rows = [run(n, args.timeout) for n in counts]
    emit(
        "admin_flood",
        rows,
        [
            ("stalling", "stalling conns"),
            ("agents_port_s", "admin req on agents' port (s)"),
            ("admin_listener_s", "admin req on --admin-listen (s)"),
        ],
        [f"None: not answered within --timeout {args.timeout:g} s"],
    )


if __name__ == "__main__":
    main()
