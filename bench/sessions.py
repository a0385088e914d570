#!/usr/bin/env python3
"""Sessions one server process holds over mutual TLS: RSS per session, idle CPU with the
default keepalive (agents ping every 50 s), and how fast N agents get connected.

Starts a twistd tcm-server and `tcm-agent swarm` processes (real agents) on loopback; the
agents were enrolled on a first run and keep their identities in --work, so the connect time
is the reconnect of already-enrolled agents (TLS handshake + upgrade + hello/welcome).

Usage: .venv/bin/python bench/sessions.py [--counts 1000,10000,19000] [--idle 60] [--work DIR]
       [--server-args '--tls-groups X25519']
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    BenchServer,
    SwarmProcs,
    cpu_percent,
    cpu_seconds,
    emit,
    swarm_state_dir,
)


def measure(n: int, idle: float, work: str, server_args: list[str] | None = None) -> dict:
    base = os.path.join(work, f"n{n}")
    os.makedirs(base, exist_ok=True)
    swarm_dir = swarm_state_dir(base)
    enrolled = os.path.exists(os.path.join(swarm_dir, "agent-000000", "cert.pem"))
    server = BenchServer(base, extra=server_args or [])
    server.start()
    swarm = SwarmProcs(base, server, n, server.token(uses=n + 10), extra=["--backoff-max", "5"])
    try:
        time.sleep(1)
        rss0 = server.ps().memory_info().rss
        cpu0 = cpu_seconds(server.ps())
        t0 = time.monotonic()
        swarm.start()
        server.wait_sessions(n, timeout=max(600, n / 10))
        connect_s = time.monotonic() - t0
        connect_cpu = cpu_seconds(server.ps()) - cpu0
        time.sleep(5)  # settle: handshakes, hellos and their store writes done
        rss1 = server.ps().memory_info().rss
        cpu = cpu_percent(server.ps(), idle)
        rss_idle = server.ps().memory_info().rss  # after the idle window: the heap settled
        sessions = server.status()["sessions"]
        swarm_mem = swarm.rss_per_agent(n)
    finally:
        swarm.stop()
        server.stop()
    return {
        "sessions": sessions,
        "target": n,
        "connect_s": round(connect_s, 2),
        "accepts_per_s": round(n / connect_s, 1),
        "server_cpu_per_connect_ms": round(1000 * connect_cpu / n, 3),
        "first_run_enrolled": not enrolled,
        "server_rss_mb": round(rss1 / 2**20, 1),
        "rss_per_session_kb": round((rss1 - rss0) / n / 1024, 1),
        # the same at the end of the idle window (the server settles its heap by itself once
        # the fleet holds steady: tcm/heap.py): what an idle fleet costs
        "rss_per_idle_session_kb": round((rss_idle - rss0) / n / 1024, 1),
        "idle_cpu_pct": round(cpu, 2),
        "idle_window_s": idle,
        "swarm_rss_per_agent_kb": swarm_mem["total_kb"],  # the processes' RSS / agents
        "swarm_marginal_kb_per_agent": swarm_mem["marginal_kb"],  # less each process's start
        "swarm_state_kb_per_agent": swarm_mem.get("state_kb"),  # state dirs in /dev/shm
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1000,10000,19000")
    p.add_argument(
        "--idle",
        type=float,
        default=60.0,
        help="seconds of idle CPU sampling (>= keepalive to include pings)",
    )
    p.add_argument("--work", default="/tmp/tcm-bench")
    p.add_argument("--server-args", default="", help="more tcm-server options")
    args = p.parse_args()
    extra = args.server_args.split()
    rows = [measure(int(n), args.idle, args.work, extra) for n in args.counts.split(",")]
    for row in rows:
        row["server_args"] = args.server_args
    emit(
        "sessions",
        rows,
        [
            ("sessions", "sessions"),
            ("connect_s", "connect s"),
            ("accepts_per_s", "accepts/s"),
            ("rss_per_session_kb", "KB/session"),
            ("rss_per_idle_session_kb", "KB/idle session"),
            ("server_cpu_per_connect_ms", "srv CPU ms/connect"),
            ("server_rss_mb", "server MB"),
            ("idle_cpu_pct", "idle CPU %"),
            ("swarm_rss_per_agent_kb", "swarm KB/agent"),
            ("swarm_marginal_kb_per_agent", "marginal"),
            ("swarm_state_kb_per_agent", "state KB"),
            ("first_run_enrolled", "enrolled now"),
        ],
        notes=[
            "connect s includes enrollment when 'enrolled now' is True (first run).",
            "swarm KB/agent: the swarm processes' RSS / agents; marginal: less what each "
            "process held before its first agent; state KB: the agents' state directories "
            "in /dev/shm (memory, outside RSS).",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
