#!/usr/bin/env python3
"""A cluster of 1, 2 and 3 server nodes on this machine (one PostgreSQL database, one
Redis), with `tcm-agent swarm` processes on 127.0.0.x spread evenly over the nodes (each
agent prefers its node and lists the others after it):

  push   a `ping` job to every agent created on node n1: delivery (p50, p99, last, agent
         clock) and all results stored (server clock), and each node's CPU seconds during
         the push per 1,000 results stored
  kill   (2 and 3 nodes) the last node SIGKILLed: its agents back on the others at 50, 99
         and 100 % (from the nodes' session counts), and the surviving nodes' CPU seconds
         per 1,000 reconnects; then a job to everyone, to check that none is lost

CPU seconds (user + system of the node processes, from /proc) are less distorted by the
shared cores than wall times; on a 2-core machine the swarm shares them with the nodes, so
wall times say more about the machine than about tcm.

Usage: flock /work/wt/_notes/bench.lock .venv/bin/python bench/cluster.py
           [--agents 10000] [--nodes 1,2,3] [--work DIR] [--database URL] [--redis URL]
Each run makes a fresh database (dropped at the end), so every agent enrolls again.
Everything it starts, it stops; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchServer, SwarmProcs, emit, run_job, summary  # noqa: E402


def cpu_seconds(server: BenchServer) -> float:
    t = server.ps().cpu_times()
    return t.user + t.system


class ClusterSwarm(SwarmProcs):
    """A swarm whose agents prefer `server` and know the other nodes after it."""

    def __init__(self, base: str, server: BenchServer, others: list[BenchServer], *a, **kw):
        super().__init__(base, server, *a, **kw)
        self.extra = [*self.extra, *(x for o in others for x in ("--server", o.url))]


#: The columns the cluster benches share (bench/cluster_gateway.py adds its own CPU figures).
COLUMNS = [
    ("nodes", "nodes"),
    ("test", "test"),
    ("agents", "N"),
    ("spread", "spread"),
    ("ok", "ok"),
    ("delivery.p50", "deliver p50 s"),
    ("delivery.last", "last s"),
    ("all_stored_s", "all stored s"),
    ("back_50_s", "back 50%"),
    ("back_99_s", "99%"),
    ("back_100_s", "100%"),
]


def cluster_sessions(api: Any) -> dict[str, int]:
    return {
        n["node"]: n["sessions"]["core"]
        for n in api.call("GET", "/cluster")["nodes"]
        if n["state"] == "up"
    }


def wait_spread(api: Any, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(cluster_sessions(api).values()) >= total:
            return
        time.sleep(1.0)
    raise AssertionError(f"{total} sessions not reached in {timeout} s: {cluster_sessions(api)}")


def cluster_nodes(work: str, k: int, database: str, redis: str) -> tuple[str, list[BenchServer]]:
    """A fresh directory `work`/nodesK and K nodes of one cluster in it (not started)."""
    base = os.path.join(work, f"nodes{k}")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    key = os.path.join(base, "cluster.key")
    nodes = [
        BenchServer(
            base,
            name=f"n{i + 1}",
            extra=[
                *("--database", database, "--redis", redis),
                *("--node-name", f"n{i + 1}", "--cluster-key", key),
                *("--max-handshakes", "200"),
            ],
        )
        for i in range(k)
    ]
    return base, nodes


def kill_node(
    victim: BenchServer, survivors: list[BenchServer], moving: int
) -> tuple[dict[str, float], list[float]]:
    """SIGKILL `victim`; seconds until 50, 99 and 100 % of its `moving` agents have a
    session on the survivors (their own /status: the nodes table lags a heartbeat), and
    each survivor's CPU seconds meanwhile. Bounded: 300 s."""
    before = [cpu_seconds(x) for x in survivors]
    held = {x.name: x.status()["sessions"] for x in survivors}
    t0 = time.monotonic()
    victim.kill()
    marks: dict[str, float] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and "100" not in marks:
        back = sum(x.status()["sessions"] - held[x.name] for x in survivors)
        for name, frac in (("50", 0.5), ("99", 0.99), ("100", 1.0)):
            if name not in marks and back >= frac * moving:
                marks[name] = round(time.monotonic() - t0, 1)
        time.sleep(0.25)
    return marks, [cpu_seconds(x) - b for x, b in zip(survivors, before, strict=True)]


def measure(k: int, n: int, work: str, database: str, redis: str) -> list[dict[str, Any]]:
    base, nodes = cluster_nodes(work, k, database, redis)
    swarms: list[SwarmProcs] = []
    rows: list[dict[str, Any]] = []
    try:
        for node in nodes:
            node.start()
        api = nodes[0].api()
        token = nodes[0].token(uses=n + 10)
        share = [n // k + (1 if i < n % k else 0) for i in range(k)]
        for i, node in enumerate(nodes):
            others = [o for o in nodes[i + 1 :] + nodes[:i]]
            swarm_base = os.path.join(base, f"swarm{i + 1}")
            os.makedirs(swarm_base)
            swarm = ClusterSwarm(
                swarm_base, node, others, share[i], token, extra=["--backoff-max", "5"]
            )
            # identities of an earlier run belong to another cluster's CA: enroll afresh
            shutil.rmtree(os.path.realpath(swarm.state_dir), ignore_errors=True)
            os.makedirs(os.path.realpath(swarm.state_dir), exist_ok=True)
            swarm.start()
            swarms.append(swarm)
        wait_spread(api, n, max(600, n / 5))
        time.sleep(3)
        spread = cluster_sessions(api)

        # -- push -------------------------------------------------------------------------
        run_job(api, {"action": "ping", "targets": "all", "ttl": 300}, n, 120)  # warm-up
        before = [cpu_seconds(x) for x in nodes]
        job = run_job(api, {"action": "ping", "targets": "all", "ttl": 300}, n, 180)
        used = [cpu_seconds(x) - b for x, b in zip(nodes, before, strict=True)]
        stored = job["counts"]["succeeded"]
        rows.append(
            {
                "nodes": k,
                "test": "push",
                "agents": n,
                "spread": "/".join(str(spread.get(x.name, 0)) for x in nodes),
                "ok": stored,
                "delivery": summary(job["received"]),
                "all_stored_s": max(job["stored"]) if job["stored"] else None,
                "node_cpu_s": [round(u, 2) for u in used],
                # each node stored about its own agents' results: its CPU per 1,000 of them
                "cpu_s_per_1000": round(
                    max(
                        u / (spread.get(x.name, 1) / 1000) for x, u in zip(nodes, used, strict=True)
                    ),
                    3,
                ),
                "total_cpu_s_per_1000": round(sum(used) / (stored / 1000), 3) if stored else None,
            }
        )

        # -- kill -------------------------------------------------------------------------
        if k >= 2:
            victim = nodes[-1]
            survivors = nodes[:-1]
            moving = spread.get(victim.name, 0)
            marks, used = kill_node(victim, survivors, moving)
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
                    "node_cpu_s": [round(u, 2) for u in used],
                    "total_cpu_s_per_1000": round(sum(used) / (moving / 1000), 3)
                    if moving
                    else None,
                }
            )
    finally:
        for swarm in swarms:
            swarm.stop()
        for node in nodes:
            node.stop()
    return rows


def fresh_database(admin_url: str) -> tuple[str, Any]:
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = "tcm_bench_cluster_" + uuid.uuid4().hex[:8]
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    return admin.url.set(database=name).render_as_string(hide_password=False), drop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10000)
    p.add_argument("--nodes", default="1,2,3")
    p.add_argument("--work", default="/tmp/tcm-bench-cluster")
    p.add_argument(
        "--database",
        default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server's maintenance database: a fresh database is made per run",
    )
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for k in [int(x) for x in args.nodes.split(",")]:
        url, drop = fresh_database(args.database)
        try:
            rows.extend(measure(k, args.agents, args.work, url, args.redis))
        finally:
            drop()
    emit(
        "cluster",
        rows,
        [
            *COLUMNS,
            ("cpu_s_per_1000", "node CPU s/1000"),
            ("total_cpu_s_per_1000", "all nodes CPU s/1000"),
        ],
        notes=[
            "push: CPU s per 1,000 results stored (node CPU s/1000: the busiest node per "
            "1,000 of its own agents; all nodes: summed, per 1,000 of all)",
            "kill: the surviving nodes' CPU s per 1,000 reconnects",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
