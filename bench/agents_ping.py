#!/usr/bin/env python3
"""Ping through real agent processes: `tcm run ping --targets all` to all results stored.

Starts a twistd tcm-server and N twistd tcm-agent processes on loopback (each a full agent:
own key and certificate, mutual TLS, own spool), then runs the CLI several times and reports:

- created -> all stored: from the job's creation to the last result stored (server clock)
- CLI wall time: `tcm run ping --targets all --wait --json` from exec to exit
- server RSS per connected agent

Usage: .venv/bin/python bench/agents_ping.py [--agents 3,50] [--rounds 5] [--json]
Bounded: every wait has a timeout; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from tests.harness import PYTHON, AgentProc, Server  # noqa: E402


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def run_round(server: Server) -> dict[str, float]:
    t0 = time.monotonic()
    r = subprocess.run(
        [
            PYTHON,
            "-m",
            "tcm.cli.admin",
            "--state-dir",
            server.state_dir,
            "run",
            "ping",
            "--targets",
            "all",
            "--wait",
            "--json",
            "--wait-timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.monotonic() - t0
    out = json.loads(r.stdout)
    job = server.job(out["job"])
    from tcm.cli.admin import Api

    with open(os.path.join(server.state_dir, "admin.token")) as f:
        api = Api(server.url, server.ca, f.read().strip())
    full = api.call("GET", f"/jobs/{out['job']}")
    finished = [t["finished_at"] for t in full["results"] if t["finished_at"]]
    delivered = [t["delivered_at"] for t in full["results"] if t["delivered_at"]]
    assert job["counts"]["succeeded"] == job["counts"]["total"], job["counts"]
    return {
        "created_to_all_stored": max(finished) - full["created_at"],
        "created_to_last_delivered": max(delivered) - full["created_at"] if delivered else 0.0,
        "cli_wall": wall,
    }


def measure(n: int, rounds: int, base: str) -> dict:
    server = Server(base, name=f"server-{n}")
    server.start()
    agents: list[AgentProc] = []
    try:
        idle_rss = rss(server.proc.pid)  # type: ignore[union-attr]
        token = server.token(uses=n)
        agents = [AgentProc(base, f"a{n}-{i}", server, token) for i in range(n)]
        t0 = time.monotonic()
        for a in agents:
            a.start(wait=False)
        for a in agents:
            a.wait_session(1, timeout=300)
        connect_time = time.monotonic() - t0
        run_round(server)  # warm-up (imports, first statements)
        results = [run_round(server) for _ in range(rounds)]
        loaded_rss = rss(server.proc.pid)  # type: ignore[union-attr]
        agent_rss = statistics.mean(rss(a.proc.pid) for a in agents)  # type: ignore[union-attr]
    finally:
        for a in agents:
            a.stop()
        server.stop()

    def stat(key: str) -> dict[str, float]:
        values = sorted(r[key] for r in results)
        return {"median": statistics.median(values), "min": values[0], "max": values[-1]}

    return {
        "agents": n,
        "rounds": rounds,
        "enroll_and_connect_s": connect_time,
        "created_to_all_stored_s": stat("created_to_all_stored"),
        "created_to_last_delivered_s": stat("created_to_last_delivered"),
        "cli_wall_s": stat("cli_wall"),
        "server_rss_idle_mb": idle_rss / 2**20,
        "server_rss_per_agent_kb": (loaded_rss - idle_rss) / n / 1024,
        "agent_process_rss_mb": agent_rss / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", default="3,50", help="comma-separated agent counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print only JSON")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcm-bench-") as base:
        for n in [int(x) for x in args.agents.split(",")]:
            rows.append(measure(n, args.rounds, base))
    if not args.json:
        print(
            f"{'agents':>6} {'created->stored p50 (max)':>27} {'delivered p50':>14} "
            f"{'CLI wall p50':>13} {'srv KB/agent':>13} {'connect s':>10}"
        )
        for r in rows:
            s = r["created_to_all_stored_s"]
            print(
                f"{r['agents']:>6} {s['median'] * 1000:>18.1f} ms ({s['max'] * 1000:.1f})"
                f" {r['created_to_last_delivered_s']['median'] * 1000:>11.1f} ms"
                f" {r['cli_wall_s']['median'] * 1000:>10.0f} ms"
                f" {r['server_rss_per_agent_kb']:>13.1f} {r['enroll_and_connect_s']:>10.1f}"
            )
    print(
        json.dumps(
            {
                "bench": "agents_ping",
                "machine": {
                    "cpus": os.cpu_count(),
                    "mem_gb": round(psutil.virtual_memory().total / 2**30),
                },
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
