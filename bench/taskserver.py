#!/usr/bin/env python3
"""Task servers: task round trip through a task server vs straight through the management
server, and task-client sessions one task server process holds (RSS each, idle CPU).

Round trip: a twistd tcm-server, one twistd tcm-taskserver and a `tcm-agent swarm` of N real
agents (each with its core session and its task session). `command.run ["true"]` to all N,
created -> every result stored (server clock), R rounds through the task server; then the
task server is stopped, the agents are told there is none, and the same R rounds go straight
over the agents' own sessions. Same agents, same run.

Sessions: for each count, a fresh server + task server and a swarm of that many agents; the
task server's RSS before and after they connect, and its CPU while they idle.

Usage: .venv/bin/python bench/taskserver.py [--agents 100] [--rounds 5]
           [--sessions 1000,5000] [--idle 30] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchServer, SwarmProcs, cpu_percent, emit, run_job, wait_until  # noqa: E402

from tests.harness import TaskServerProc  # noqa: E402

TASK = {"action": "command.run", "args": {"argv": ["true"]}, "targets": "all"}


def _task_clients(server: BenchServer, name: str) -> int:
    for t in server.api().call("GET", "/taskservers")["taskservers"]:
        if t["name"] == name:
            return t["clients"] if t["state"] in ("up", "full") else 0
    return 0


def _rounds(server: BenchServer, n: int, rounds: int) -> dict:
    stored_last, stored_p50 = [], []
    for _ in range(rounds):
        r = run_job(server.api(), dict(TASK), n, timeout=120)
        assert r["counts"]["succeeded"] == n, r["counts"]
        stored_last.append(r["stored"][-1])
        stored_p50.append(r["stored"][len(r["stored"]) // 2])
        time.sleep(0.5)
    return {
        "last_stored_ms": round(1000 * statistics.median(stored_last), 1),
        "p50_stored_ms": round(1000 * statistics.median(stored_p50), 1),
        "best_last_ms": round(1000 * min(stored_last), 1),
    }


def round_trip(n: int, rounds: int, work: str) -> list[dict]:
    base = os.path.join(work, f"rt{n}")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    server = BenchServer(base)
    server.start()
    ts = TaskServerProc(base, "ts1", server)
    ts.start()
    swarm = SwarmProcs(base, server, n, server.token(uses=n + 10), extra=["--backoff-max", "5"])
    rows = []
    try:
        swarm.start()
        server.wait_sessions(n, timeout=300)
        wait_until(lambda: _task_clients(server, "ts1") >= n, 300, 0.25, f"{n} task sessions")
        time.sleep(2)
        rows.append({"path": "through task server ts1", "agents": n, **_rounds(server, n, rounds)})
        ts.stop()
        wait_until(lambda: _task_clients(server, "ts1") == 0, 60, 0.25, "ts1 down")
        time.sleep(2)  # the agents were told: no task server; tasks take their own session
        rows.append({"path": "straight to the server", "agents": n, **_rounds(server, n, rounds)})
    finally:
        swarm.stop()
        ts.stop()
        server.stop()
    return rows


def sessions(n: int, idle: float, work: str) -> dict:
    base = os.path.join(work, f"ts{n}")
    os.makedirs(base, exist_ok=True)
    shutil.rmtree(os.path.join(base, "server"), ignore_errors=True)
    shutil.rmtree(os.path.join(base, "ts1"), ignore_errors=True)
    shutil.rmtree(os.path.join(base, "swarm"), ignore_errors=True)
    server = BenchServer(base, extra=["--taskserver-max-clients", str(n + 1000)])
    server.start()
    ts = TaskServerProc(base, "ts1", server, extra=["--max-clients", str(n + 1000)])
    ts.start()
    assert ts.proc is not None
    ps = psutil.Process(ts.proc.pid)
    swarm = SwarmProcs(base, server, n, server.token(uses=n + 10), extra=["--backoff-max", "5"])
    try:
        time.sleep(1)
        rss0 = ps.memory_info().rss
        t0 = time.monotonic()
        swarm.start()
        wait_until(lambda: _task_clients(server, "ts1") >= n, max(600, n / 10), 0.5, "sessions")
        connect_s = time.monotonic() - t0
        time.sleep(5)
        rss1 = ps.memory_info().rss
        cpu = cpu_percent(ps, idle)
        clients = _task_clients(server, "ts1")
    finally:
        swarm.stop()
        ts.stop()
        server.stop()
    return {
        "task_sessions": clients,
        "connect_s": round(connect_s, 1),
        "ts_rss_mb": round(rss1 / 2**20, 1),
        "rss_per_session_kb": round((rss1 - rss0) / n / 1024, 1),
        "idle_cpu_pct": round(cpu, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sessions", default="1000,5000")
    p.add_argument("--idle", type=float, default=30.0)
    p.add_argument("--work", default="/tmp/tcm-bench")
    args = p.parse_args()
    rows = round_trip(args.agents, args.rounds, args.work)
    emit(
        "taskserver-round-trip",
        rows,
        [
            ("path", "path"),
            ("agents", "agents"),
            ("p50_stored_ms", "p50 stored ms"),
            ("last_stored_ms", "last stored ms (median)"),
            ("best_last_ms", "best last ms"),
        ],
        notes=["command.run ['true'] to all agents: job created -> result stored (server clock)"],
    )
    if args.sessions:
        srows = [sessions(int(n), args.idle, args.work) for n in args.sessions.split(",")]
        emit(
            "taskserver-sessions",
            srows,
            [
                ("task_sessions", "task sessions"),
                ("connect_s", "connect s"),
                ("ts_rss_mb", "task server MB"),
                ("rss_per_session_kb", "KB/session"),
                ("idle_cpu_pct", "idle CPU %"),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
