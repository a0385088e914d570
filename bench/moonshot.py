#!/usr/bin/env python3
"""As many concurrent agent sessions as this machine holds, toward 100,000: one
`twistd tcm-server`, `twistd tcm-gateway --workers W` (processes sharing the port with
SO_REUSEPORT, each under the 20,000-descriptor limit, each with one link to the server that
carries its sessions), and `tcm-agent swarm` processes (at most 9,000 agents each, over 16
loopback source addresses). Agents enroll through the gateway on a first run and keep their
identities in --work.

Measured once every session is open: memory per session on each side (server, gateway
workers, swarms: RSS; for the swarms also less what each process held before its first
agent, and the agents' state directories in /dev/shm, memory outside any RSS), the idle
CPU of the server and gateway processes over --idle seconds (agents ping every 50 s), then
one `ping` job to all: last delivery (agent clock) and all results stored (server clock),
from the job's creation.

Usage: .venv/bin/python bench/moonshot.py [--agents 100000] [--workers 6] [--idle 60]
       [--tls-groups X25519] [--enroll-rate 120] [--swarm-nice 5] [--max-seconds 1800]
       [--work /tmp/tcm-bench-moonshot]
Heavy: run it under the bench lock. Everything it starts, it stops; every wait is bounded
and the whole run gives up after --max-seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PER_SWARM, BenchServer, SwarmProcs, cpu_seconds, emit, run_job, summary  # noqa: E402

from tests.harness import GatewayProc  # noqa: E402

PER_WORKER = 19000  # sessions one gateway worker holds (its descriptor limit less headroom)


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            total += cpu_seconds(p)
        except psutil.NoSuchProcess:
            pass
    return total


def measure(args: argparse.Namespace) -> dict:
    started = time.monotonic()

    def left() -> float:
        remaining = args.max_seconds - (time.monotonic() - started)
        if remaining <= 0:
            raise TimeoutError(f"moonshot gave up after {args.max_seconds} s")
        return remaining

    n = args.agents
    workers = args.workers or max(1, -(-n // PER_WORKER))
    base = os.path.join(args.work, f"n{n}")
    os.makedirs(base, exist_ok=True)
    tls = ["--tls-groups", args.tls_groups] if args.tls_groups else []
    server = BenchServer(base, extra=["--name", "bench", *tls])
    server.start()
    gw = GatewayProc(
        base,
        "gw",
        {"s": server},
        extra=["--max-clients", str(PER_WORKER), "--workers", str(workers), *tls],
    )
    swarm: SwarmProcs | None = None
    row: dict = {"agents": n, "gateway_workers": workers, "tls_groups": args.tls_groups}
    try:
        gw.start()
        time.sleep(2)  # the other workers start after the first one's links are up
        gw_procs = [psutil.Process(gw.proc.pid)]  # type: ignore[union-attr]
        gw_procs += gw_procs[0].children()
        srv = [server.ps()]
        rss_server0, rss_gw0 = rss(srv), rss(gw_procs)
        token = server.token(uses=n + 10)
        # First run: CSR signing is the server's dearest request, so the swarm processes
        # together start no more agents that must enroll than the server signs
        # (--enroll-rate); and, sharing two cores with the server and the gateway workers
        # where the agents would have machines of their own, they run at a lower priority.
        processes = -(-n // PER_SWARM)
        enroll_rate = max(1.0, args.enroll_rate / processes)
        swarm = SwarmProcs(
            base,
            server,
            n,
            token,
            extra=["--backoff-max", "10", "--enroll-rate", str(enroll_rate)],
            url=gw.url,
            nice=args.swarm_nice,
        )
        t0 = time.monotonic()
        swarm.start()
        sessions = 0
        while time.monotonic() - t0 < min(left(), args.connect_timeout):
            sessions = server.status()["sessions"]
            if sessions >= n:
                break
            time.sleep(2)
        row["connect_s"] = round(time.monotonic() - t0, 1)
        row["sessions"] = sessions
        time.sleep(min(10, left()))  # settle: hellos and their writes done, heap settled
        swarm_procs = [psutil.Process(p.pid) for p in swarm.procs]
        row["server_rss_mb"] = round(rss(srv) / 2**20, 1)
        row["gateway_rss_mb"] = round(rss(gw_procs) / 2**20, 1)
        row["swarm_rss_mb"] = round(rss(swarm_procs) / 2**20, 1)
        if sessions:
            row["server_kb_per_session"] = round((rss(srv) - rss_server0) / sessions / 1024, 1)
            row["gateway_kb_per_session"] = round((rss(gw_procs) - rss_gw0) / sessions / 1024, 1)
            # the swarm processes' RSS / agents, the same less what each process held
            # before its first agent (what one more agent costs), and the agents' state
            # directories in /dev/shm (the machine's memory, but no process's RSS)
            swarm_mem = swarm.rss_per_agent(sessions)
            row["swarm_kb_per_agent"] = swarm_mem["total_kb"]
            row["swarm_marginal_kb_per_agent"] = swarm_mem["marginal_kb"]
            row["swarm_state_kb_per_agent"] = swarm_mem.get("state_kb")
        c0 = cpu(srv + gw_procs)
        window = min(args.idle, left())
        time.sleep(window)
        row["idle_cpu_pct_server_and_gateway"] = round(100 * (cpu(srv + gw_procs) - c0) / window, 2)
        row["idle_window_s"] = window
        if sessions:
            job = run_job(
                server.api(),
                {"action": "ping", "targets": "all", "ttl": 300},
                sessions,
                min(240, left()),
                cpu_of=server.ps(),
            )
            row["push"] = summary(job["received"])
            row["push_last_s"] = row["push"]["last"]
            row["all_stored_s"] = max(job["stored"]) if job["stored"] else None
            row["succeeded"] = job["counts"]["succeeded"]
            row["server_cpu_per_result_ms"] = (
                round(1000 * job["server_cpu_s"] / job["counts"]["succeeded"], 3)
                if job["counts"]["succeeded"]
                else None
            )
    finally:
        if swarm is not None:
            swarm.stop()
        gw.stop(timeout=30)
        server.stop(timeout=30)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=100000)
    p.add_argument("--workers", type=int, default=0, help="gateway workers (0: agents/19,000)")
    p.add_argument("--idle", type=float, default=60.0)
    p.add_argument(
        "--enroll-rate",
        type=float,
        default=120.0,
        help="agents enrolling per second, all swarm processes together (first run)",
    )
    p.add_argument("--swarm-nice", type=int, default=5, help="the swarm processes' niceness")
    p.add_argument("--tls-groups", default=None)
    p.add_argument("--connect-timeout", type=float, default=900.0)
    p.add_argument("--max-seconds", type=float, default=1800.0)
    p.add_argument("--work", default="/tmp/tcm-bench-moonshot")
    args = p.parse_args()
    row = measure(args)
    emit(
        "moonshot",
        [row],
        [
            ("agents", "agents"),
            ("sessions", "sessions"),
            ("gateway_workers", "gw workers"),
            ("connect_s", "connect s"),
            ("server_kb_per_session", "server KB/s"),
            ("gateway_kb_per_session", "gateway KB/s"),
            ("swarm_kb_per_agent", "swarm KB/agent"),
            ("swarm_marginal_kb_per_agent", "marginal"),
            ("swarm_state_kb_per_agent", "state KB"),
            ("idle_cpu_pct_server_and_gateway", "idle CPU %"),
            ("push_last_s", "last delivery s"),
            ("all_stored_s", "all stored s"),
            ("succeeded", "ok"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
