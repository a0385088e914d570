#!/usr/bin/env python3
"""The agent list at N agents: `GET /api/v1/agents` whole (what the console read before) and
in pages of `--page` (`?limit=N&after=ID`, what it reads now): bytes, time to the first
page, time to all of it.

N agents are written straight into the store of a fresh state directory (enrolled rows with
the capabilities an agent advertises; no sessions), then one real `twistd tcm-server` on
127.0.0.1 serves them. Every request is bounded (--timeout).

Usage: .venv/bin/python bench/agent_list.py [--agents 10000] [--page 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness import Server  # noqa: E402

CAPABILITIES = [
    {"name": n, "schema": {"type": "object", "properties": {"argv": {"type": "array"}}}}
    for n in ("ping", "command.run", "inventory.collect", "policy.apply", "file.fetch")
]


def fill_store(state_dir: str, n: int) -> None:
    """N enrolled agents in the server's SQLite store (migrated here as the server would)."""
    import sqlalchemy as sa

    from tcm.store import Database
    from tcm.store import schema as t

    os.makedirs(state_dir, exist_ok=True)
    db = Database(f"sqlite:///{os.path.join(state_dir, 'tcm.sqlite')}")
    db.open()
    try:
        with db.engine.begin() as c:
            c.execute(
                t.agents.insert(),
                [
                    dict(
                        id=f"a-{uuid.uuid4().hex[:20]}",
                        hostname=f"host-{i:05d}",
                        platform="linux",
                        fingerprint=uuid.uuid4().hex * 2,
                        enrolled_at=1.7e9 + i,
                        last_seen=1.7e9 + i,
                        capabilities=CAPABILITIES,
                        approved=True,
                    )
                    for i in range(n)
                ],
            )
            assert c.execute(sa.select(sa.func.count()).select_from(t.agents)).scalar() == n
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--page", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="tcm-bench-agent-list-")
    server = Server(base)
    fill_store(server.state_dir, args.agents)
    server.start()
    try:
        with open(os.path.join(server.state_dir, "admin.token")) as f:
            token = f.read().strip()
        http = requests.Session()
        http.trust_env = False
        http.verify = server.ca
        http.headers["Authorization"] = f"Bearer {token}"
        url = f"{server.url}/api/v1/agents"
        whole, first, paged = [], [], []
        for _ in range(args.rounds):
            started = time.monotonic()
            r = http.get(url, timeout=args.timeout)
            whole.append(time.monotonic() - started)
            assert r.status_code == 200 and len(r.json()["agents"]) == args.agents
            whole_bytes = len(r.content)
            started, after, seen, page_bytes = time.monotonic(), None, 0, []
            while True:
                params = {"limit": args.page, **({"after": after} if after else {})}
                r = http.get(url, params=params, timeout=args.timeout)
                assert r.status_code == 200
                if not seen:
                    first.append(time.monotonic() - started)
                body = r.json()
                seen += len(body["agents"])
                page_bytes.append(len(r.content))
                after = body["next"]
                if after is None:
                    break
            paged.append(time.monotonic() - started)
            assert seen == args.agents
        print(
            f"{args.agents} agents: whole list {whole_bytes / 1e6:.2f} MB in "
            f"{statistics.median(whole):.2f} s (median of {args.rounds}); pages of {args.page}: "
            f"{len(page_bytes)} x ~{statistics.median(page_bytes) / 1e3:.0f} kB, first in "
            f"{statistics.median(first):.3f} s, all in {statistics.median(paged):.2f} s"
        )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
