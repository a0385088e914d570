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
import ctypes
import gc
import inspect
import os
import sys
import time
import tracemalloc

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import SOURCES, BenchServer  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.task import deferLater  # noqa: E402

from tcm.agent.swarm import Swarm, parse_sources  # noqa: E402
from tcm.process import release_memory  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def c_heap() -> int:
    """Bytes in use from glibc malloc (brk heap and mmapped blocks), 0 elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return 0
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def type_counts() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


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


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


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
        rss0, heap0 = proc.memory_info().rss, c_heap()
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
        rss1, heap1 = proc.memory_info().rss, c_heap()
        traced = 0
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
        print("Python objects per agent by type (gc-tracked, >= 0.5 per agent):")
        total = 0
        for name, count in sorted(
            ((k, after[k] - before.get(k, 0)) for k in after), key=lambda kv: -kv[1]
        ):
            if count / n >= 0.5:
                print(f"  {count / n:7.2f}  {name}")
            total += count
        print(f"  {total / n:7.2f}  all gc-tracked objects")
        if args.detail:
            detail(n)
        if args.tracemalloc:
            key = "traceback" if args.frames > 1 else "lineno"
            stats = snap1.compare_to(snap0, key)
            traced = sum(s.size_diff for s in stats)
            print(f"Python allocations per agent (tracemalloc): {traced / n / 1024:.1f} KB")
            for s in stats[: args.top]:
                if s.size_diff / n < 16:
                    break
                print(f"  {s.size_diff / n:8.0f} B  {s.count_diff / n:6.2f} blocks")
                for line in s.traceback.format()[-2 * args.frames :]:
                    print("     ", line)
    finally:
        if swarm is not None:
            await swarm.stopService()
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--frames", type=int, default=1, help="traceback depth for --tracemalloc")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--detail", action="store_true", help="methods, functions, timers")
    p.add_argument("--trim", action="store_true", help="also RSS after glibc malloc_trim(0)")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--work", default="/tmp/tcm-bench")
    args = p.parse_args()
    failure: list = []

    def go():
        d = ensureDeferred(run(args))
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    if failure:
        failure[0].printTraceback(file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
