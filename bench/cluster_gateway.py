#!/usr/bin/env python3
"""A gateway in front of a cluster of server nodes (one PostgreSQL database, one Redis): the
gateway is given the first node's address and links to every node (the cluster names the
others); `tcm-agent swarm` agents on 127.0.0.x connect only to the gateway, which spreads
their sessions over the nodes by agent id.

  push   a `ping` job to every agent: delivery and all results stored, and how the sessions
         were spread over the nodes
  kill   the last node SIGKILLed: its agents back through the gateway on the others at 50, 99
         and 100 % (from the surviving nodes' session counts), the gateway's and the
         survivors' CPU seconds per 1,000 reconnects; then a job to everyone (none lost)

Usage: flock /work/wt/_notes/bench.lock .venv/bin/python bench/cluster_gateway.py
           [--agents 2000] [--nodes 2] [--work DIR] [--database URL] [--redis URL]
Each run makes a fresh database (dropped at the end). Everything it starts, it stops; every
wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Any

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import (  # noqa: E402
    COLUMNS,
    cluster_nodes,
    cluster_sessions,
    fresh_database,
    kill_node,
    wait_spread,
)
from common import SwarmProcs, emit, run_job, summary, wait_until  # noqa: E402

from tests.harness import GatewayProc  # noqa: E402


def measure(k: int, n: int, work: str, database: str, redis: str) -> list[dict[str, Any]]:
    base, nodes = cluster_nodes(work, k, database, redis)
    gw = GatewayProc(base, "gw", {"up": nodes[0]}, extra=["--max-clients", str(n + 100)])
    swarm: SwarmProcs | None = None
    rows: list[dict[str, Any]] = []
    try:
        for node in nodes:
            node.start()
        gw.start()

        def linked() -> bool:
            listings = [x.api().call("GET", "/gateways")["gateways"] for x in nodes]
            return all(any(g["state"] == "up" for g in listing) for listing in listings)

        wait_until(linked, 60, 0.5, "the gateway linked to every node")
        api = nodes[0].api()
        token = nodes[0].token(uses=n + 10)
        swarm = SwarmProcs(
            base, nodes[0], n, token, extra=["--backoff-max", "5"], url=f"{gw.url}/upstream/up"
        )
        shutil.rmtree(os.path.realpath(swarm.state_dir), ignore_errors=True)
        os.makedirs(os.path.realpath(swarm.state_dir), exist_ok=True)
        swarm.start()
        wait_spread(api, n, max(600, n / 5))
        time.sleep(3)
        spread = cluster_sessions(api)

        # -- push -------------------------------------------------------------------------
        run_job(api, {"action": "ping", "targets": "all", "ttl": 300}, n, 120)  # warm-up
        job = run_job(api, {"action": "ping", "targets": "all", "ttl": 300}, n, 180)
        rows.append(
            {
                "nodes": k,
                "test": "push",
                "agents": n,
                "spread": "/".join(str(spread.get(x.name, 0)) for x in nodes),
                "ok": job["counts"]["succeeded"],
                "delivery": summary(job["received"]),
                "all_stored_s": max(job["stored"]) if job["stored"] else None,
            }
        )

        # -- kill -------------------------------------------------------------------------
        victim, survivors = nodes[-1], nodes[:-1]
        moving = spread.get(victim.name, 0)
        gw_ps = psutil.Process(gw.proc.pid)  # type: ignore[union-attr]
        gw_before = sum(gw_ps.cpu_times()[:2])
        marks, used = kill_node(victim, survivors, moving)
        gw_used = sum(gw_ps.cpu_times()[:2]) - gw_before
        after = run_job(api, {"action": "ping", "targets": "all", "ttl": 300}, n, 180)
        rows.append(
            {
                "nodes": k,
                "test": "kill",
                "agents": n,
                "spread": f"{moving} moved",
                "ok": after["counts"]["succeeded"],
                "back_50_s": marks.get("50"),
                "back_99_s": marks.get("99"),
                "back_100_s": marks.get("100"),
                "node_cpu_per_1000": round(sum(used) / (moving / 1000), 3) if moving else None,
                "gw_cpu_per_1000": round(gw_used / (moving / 1000), 3) if moving else None,
            }
        )
    finally:
        if swarm is not None:
            swarm.stop()
        gw.stop()
        for node in nodes:
            node.stop()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=2000)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--work", default="/tmp/tcm-bench-cluster-gateway")
    p.add_argument(
        "--database",
        default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server's maintenance database: a fresh database is made per run",
    )
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    if args.nodes < 2:
        p.error("--nodes: at least 2 (one is killed)")
    url, drop = fresh_database(args.database)
    try:
        rows = measure(args.nodes, args.agents, args.work, url, args.redis)
    finally:
        drop()
    emit(
        "cluster_gateway",
        rows,
        [
            *COLUMNS,
            ("node_cpu_per_1000", "survivors CPU s/1000"),
            ("gw_cpu_per_1000", "gateway CPU s/1000"),
        ],
        notes=["kill: CPU s per 1,000 agents moved (the survivors' summed, the gateway's)"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
