#!/usr/bin/env python3
"""Where a swarm's memory per simulated agent goes: a diagnostic, not a figure for the goals
(bench/sessions.py and bench/moonshot.py measure those on `tcm-agent swarm` processes).

Runs a real `twistd tcm-server` subprocess and the swarm (`tcm.agent.swarm.Swarm`, what
`tcm-agent swarm` runs) inside this process: N real agents, each with its own identity,
mutual TLS and WebSocket session. Once all N sessions are open it reports, per agent: RSS
growth, the C heap (glibc mallinfo2: OpenSSL's allocations and Python's larger blocks),
Python objects by type (gc) and with --tracemalloc Python's allocations by source line.
RSS beyond the traced Python allocations is OpenSSL's (contexts, connections, BIOs,
sessions) and the allocators'.

Identities are kept in --work: a first run enrolls (its figures include enrollment), the
next ones reconnect, as a swarm does in the benchmarks.

Usage: .venv/bin/python bench/swarm_memory.py [--count 1000] [--tracemalloc] [--work DIR]
Heavy above ~500 agents: run it under the bench lock.
"""

from __future__ import annotations

import argparse
import collections
import gc
import inspect
import os
import sys
import time
import tracemalloc

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    SOURCES,
    BenchServer,
    heap_in_use,
    memory_arguments,
    print_growth,
    print_traced,
    run_async,
    sleep,
    type_counts,
)
from twisted.internet import reactor  # noqa: E402

from tcm.agent.swarm import Swarm, parse_sources  # noqa: E402
from tcm.process import release_memory  # noqa: E402


def detail(n: int) -> None:
    """Bound methods, functions and timers per agent, by what they are."""
    kinds: collections.Counter = collections.Counter()
    for o in gc.get_objects():
        if inspect.ismethod(o):
            kinds[f"method {type(o.__self__).__qualname__}.{o.__func__.__name__}"] += 1
        elif inspect.isfunction(o):
            kinds[f"function {o.__qualname__}"] += 1
        elif type(o).__name__ == "DelayedCall":
            func = getattr(o, "func", None) or getattr(o, "callback", o)
            name = getattr(func, "__qualname__", type(func).__qualname__)
            kinds[f"timer {name}"] += 1
    print("Bound methods, functions and timers per agent (>= 0.5):")
    for name, count in kinds.most_common():
        if count / n < 0.5:
            break
        print(f"  {count / n:7.2f}  {name}")


async def run(args: argparse.Namespace) -> None:
    base = os.path.join(args.work, f"swarmmem{args.count}")
    os.makedirs(base, exist_ok=True)
    server = BenchServer(base, extra=["--keepalive", "3600"])
    server.start()
    proc = psutil.Process()
    swarm = None
    try:
        token = server.token(uses=args.count + 10)
        swarm = Swarm(
            reactor,
            args.count,
            os.path.join(base, "swarm"),
            server.url,
            server.ca,
            token,
            parse_sources(SOURCES),
            rate=1000,
            keepalive=3600,
            backoff_max=5,
        )
        enrolled = os.path.exists(os.path.join(swarm.member_dir(0), "cert.pem"))
        before = type_counts()
        rss0, heap0 = proc.memory_info().rss, heap_in_use()
        if args.tracemalloc:
            tracemalloc.start(args.frames)
            snap0 = tracemalloc.take_snapshot()
        t0 = time.monotonic()
        swarm.startService()
        while True:
            counts = swarm.counts()
            if counts["persistent"] >= args.count:
                break
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"only {counts['persistent']} sessions after {args.timeout} s")
            await sleep(0.5)
        took = time.monotonic() - t0
        print(f"{args.count} sessions in {took:.1f} s (enrolled now: {not enrolled})")
        await sleep(args.settle)
        n = args.count
        rss1, heap1 = proc.memory_info().rss, heap_in_use()
        if args.tracemalloc:
            snap1 = tracemalloc.take_snapshot()
            tracemalloc.stop()
        gc.unfreeze()  # the swarm freezes its settled agents' objects: count them too
        after = type_counts()
        print(f"RSS per agent: {(rss1 - rss0) / n / 1024:.1f} KB")
        print(f"C heap in use (mallinfo2) per agent: {(heap1 - heap0) / n / 1024:.1f} KB")
        if args.trim and release_memory():
            rss2 = proc.memory_info().rss
            print(f"RSS per agent after malloc_trim: {(rss2 - rss0) / n / 1024:.1f} KB")
        print_growth(before, after, n, "agent")
        if args.detail:
            detail(n)
        if args.tracemalloc:
            print_traced(snap0, snap1, n, "agent", args.frames, args.top)
    finally:
        if swarm is not None:
            await swarm.stopService()
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--detail", action="store_true", help="methods, functions, timers")
    memory_arguments(p)
    args = p.parse_args()
    return run_async(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
