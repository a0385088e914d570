#!/usr/bin/env python3
"""The server's own work per result that a gateway carries, without sockets: a diagnostic
for comparing code (the figures for the goals come from bench/push.py --modes gateway).

Runs the real server (`make_server_service`, as twistd runs it, with its SQLite store)
inside this process and hands its node-link end (`NodeLink`, with the server's hub) the
`batch` link messages a gateway would send: N agents' sessions opened, then, per round, a
`ping` job to all of them and N result requests in batches of at most `link.MAX_BATCH`
bytes, as a gateway's `LinkWriter` gathers them. Measured per round: the process's CPU (both
threads: the reactor's and the store's) from the first batch until every result is committed
and acknowledged, per result. No TLS or WebSocket framing is in it, and no other process:
far less noise than the push through real processes, on a machine other benchmarks share.

Usage: .venv/bin/python bench/link_ingest.py [--agents 1000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import emit, run_async, sleep  # noqa: E402

from tcm.protocol import link  # noqa: E402
from tcm.server.links import NodeLink  # noqa: E402
from tests.inproc import hello_envelope, start_server  # noqa: E402


def batches(messages: list[bytes]) -> list[bytes]:
    """The messages as a gateway's LinkWriter sends them: batches of at most MAX_BATCH."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for m in messages:
        group.append(m)
        size += len(m)
        if size >= link.MAX_BATCH:
            out.append(link.encode({"t": "batch", "n": [len(g) for g in group]}, b"".join(group)))
            group, size = [], 0
    if group:
        out.append(link.encode({"t": "batch", "n": [len(g) for g in group]}, b"".join(group)))
    return out


def result_frame(c: int, job: str, i: int) -> bytes:
    now = time.time()
    body = {
        "state": "succeeded",
        "result": {"pong": True, "time": now, "echo": None},
        "received": now,
        "started": now,
        "finished": now,
    }
    envelope = {
        "id": f"{i:08x}{c:08x}",
        "type": "request",
        "data": {"method": "POST", "path": f"/agent/v1/jobs/{job}/result", "body": body},
    }
    return link.encode({"t": "frame", "c": c}, json.dumps(envelope).encode())


async def measure(args: argparse.Namespace) -> dict:
    from twisted.internet import reactor

    state = tempfile.mkdtemp(prefix="tcm-link-ingest-")
    server = await start_server(os.path.join(state, "server"))
    parts = server.parts
    try:
        n = args.agents
        ids = [f"bench-{i:06d}" for i in range(n)]
        now = time.time()
        for a in ids:
            await parts.db.agents.add_agent(a, "bench", "00" * 32, now)
            parts.admission.directory.add(a, "bench")
        sent: list[bytes] = []
        node = NodeLink("gw", sent.append, lambda code, reason: None, parts.hub, reactor)
        hello = {"t": "hello", "name": "gw", "role": "gateway", "url": "wss://gw.example"}
        node.message_received(link.encode(hello))
        opens = []
        for c, a in enumerate(ids):
            opens.append(link.encode({"t": "open", "c": c, "agent": a, "channel": "core"}))
            opens.append(link.encode({"t": "frame", "c": c}, json.dumps(hello_envelope()).encode()))
        for message in batches(opens):
            node.message_received(message)
        deadline = time.monotonic() + 60
        while len(parts.presence.registry) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(parts.presence.registry)} of {n} sessions opened")
            await sleep(0.1)
        await sleep(2)
        per_result = []
        for r in range(args.rounds + 1):  # the first: a warm-up
            job = await parts.jobs.create("ping", {}, ids, 300, None)
            await parts.db.writes.flushed()
            await sleep(0.05)
            messages = batches([result_frame(c, job, r) for c in range(n)])
            sent.clear()
            cpu0 = time.process_time()
            for message in messages:
                node.message_received(message)
            await parts.db.writes.flushed()
            deadline = time.monotonic() + 60
            while parts.jobs.book.jobs.get(job) is not None or not parts.db.writes.idle():
                if time.monotonic() > deadline:
                    raise AssertionError(f"round {r}: results not all stored in 60 s")
                await sleep(0)
            await sleep(0)  # the last acknowledgements' batch leaves
            cpu = time.process_time() - cpu0
            acks = sum(m.count(b'"stored":true') for m in sent)
            if acks != n:
                raise AssertionError(f"round {r}: {acks} of {n} results acknowledged")
            if r:
                per_result.append(1000 * cpu / n)
        per_result.sort()
        return {
            "agents": n,
            "rounds": args.rounds,
            "cpu_per_result_ms_median": round(per_result[len(per_result) // 2], 4),
            "cpu_per_result_ms_min": round(per_result[0], 4),
            "load": os.getloadavg()[0],
        }
    finally:
        await server.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    rows: list[dict] = []

    async def go() -> None:
        rows.append(await measure(args))

    code = run_async(go)
    if rows:
        emit(
            "link_ingest",
            rows,
            [
                ("agents", "agents"),
                ("rounds", "rounds"),
                ("cpu_per_result_ms_median", "CPU ms/result (median)"),
                ("cpu_per_result_ms_min", "min"),
                ("load", "load"),
            ],
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
