#!/usr/bin/env python3
"""Where an idle agent session's memory goes on the server: a diagnostic, not a figure for
the goals (bench/sessions.py measures those on `twistd tcm-server`).

Runs the real server (`make_server_service`, the service twistd runs) inside this process,
connects N real agents from a `tcm-agent swarm` subprocess over loopback TLS, and once all N
sessions are open reports, per session: RSS growth, Python objects by type (gc), and with
--tracemalloc the Python allocations by source line. What RSS has beyond the traced Python
allocations is OpenSSL's (connection, buffers, peer certificate) and the allocator's.

Identities are kept in --work: a second run reconnects without enrolling.

Usage: .venv/bin/python bench/session_memory.py [--count 2000] [--tracemalloc] [--trim]
       [--tls-groups X25519] [--work DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import (  # noqa: E402
    heap_in_use,
    memory_arguments,
    print_growth,
    print_traced,
    run_async,
    sleep,
    type_counts,
)

from tests.harness import PYTHON, free_port  # noqa: E402
from tests.inproc import start_server  # noqa: E402


def dump(presence) -> None:
    """The attributes of one session's objects, from the session down to the socket."""
    session = next(iter(presence.registry.all()))
    proto = session.transport
    chain = [("AgentSession", session), ("protocol", proto)]
    t = proto.transport
    while t is not None and len(chain) < 8:
        chain.append((type(t).__name__, t))
        t = getattr(t, "transport", None)
    for name, obj in chain:
        attrs = getattr(obj, "__dict__", {})
        print(f"{name}: {len(attrs)} attributes, {sys.getsizeof(attrs)} B dict")
        for k, v in sorted(attrs.items()):
            print(f"    {k} = {type(v).__name__} {sys.getsizeof(v)} B: {repr(v)[:80]}")
    channels = [o for o in gc.get_objects() if type(o).__name__ == "HTTPChannel"]
    print(f"{len(channels)} HTTP channels alive")
    for referrer in gc.get_referrers(*channels[:1]):
        print("  one is referred to by", type(referrer).__name__, repr(referrer)[:100])


class GcClock:
    """Time spent in the garbage collector, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.seconds = [0.0, 0.0, 0.0]
        self.runs = [0, 0, 0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds[info["generation"]] += time.perf_counter() - self._t0
            self.runs[info["generation"]] += 1


async def push_round(server, n: int, round_: int) -> None:
    """A ping job to every agent, with the garbage collector's share of the server's time."""
    clock = GcClock()
    gc.callbacks.append(clock)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    try:
        reply = await server.admin("POST", "/api/v1/jobs", {"action": "ping", "targets": "all"})
        job = reply.body["job"]
        while time.monotonic() - t0 < 120:
            status = await server.admin("GET", f"/api/v1/jobs/{job}?results=false")
            if status.body["counts"]["completed"] >= n:
                break
            await sleep(0.2)
    finally:
        gc.callbacks.remove(clock)
    cpu = time.process_time() - cpu0
    gcs = ", ".join(f"gen{g}: {clock.seconds[g]:.2f} s in {clock.runs[g]} runs" for g in range(3))
    print(
        f"job {round_}: {n} results in {time.monotonic() - t0:.2f} s, server CPU {cpu:.2f} s, "
        f"garbage collector {sum(clock.seconds):.2f} s ({gcs})"
    )


async def run(args: argparse.Namespace) -> None:
    base = os.path.join(args.work, f"mem{args.count}")
    os.makedirs(base, exist_ok=True)
    # The same port on every run: the agents remember the server they enrolled with.
    port_file = os.path.join(base, "port")
    if os.path.exists(port_file):
        with open(port_file) as f:
            port = int(f.read())
    else:
        port = free_port()
        with open(port_file, "w") as f:
            f.write(str(port))
    server = await start_server(
        os.path.join(base, "server"), port=port, keepalive=3600.0, tls_groups=args.tls_groups
    )
    presence = server.parts.presence
    proc = psutil.Process()
    swarm = None
    try:
        token = await server.create_token(uses=args.count + 10)
        ca = os.path.join(base, "ca.pem")
        with open(ca, "wb") as f:
            f.write(server.ca_pem)
        await sleep(1)
        before = type_counts()
        if args.trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        rss0 = proc.memory_info().rss
        heap0 = heap_in_use()
        if args.tracemalloc:
            tracemalloc.start(args.frames)
            snap0 = tracemalloc.take_snapshot()
        with open(os.path.join(base, "swarm.log"), "ab") as log:
            swarm = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "tcm.cli.agent",
                    "swarm",
                    "--count",
                    str(args.count),
                    "--server",
                    server.base_url,
                    "--ca-cert",
                    ca,
                    "--token",
                    token,
                    "--source-addresses",
                    "127.0.0.2-127.0.0.9",
                    "--state-dir",
                    os.path.join(base, "swarm"),
                    "--rate",
                    "1000",
                    "--keepalive",
                    "3600",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        t0 = time.monotonic()
        while len(presence.registry) < args.count:
            if time.monotonic() - t0 > args.timeout:
                raise SystemExit(f"only {len(presence.registry)} sessions after {args.timeout} s")
            if swarm.poll() is not None:
                raise SystemExit(f"the swarm exited ({swarm.returncode}); see {base}/swarm.log")
            await sleep(0.5)
        connect_s = time.monotonic() - t0
        await sleep(args.settle)
        n = len(presence.registry)
        rss1 = proc.memory_info().rss
        after = type_counts()
        print(f"{n} sessions in {connect_s:.1f} s")
        print(f"RSS per session: {(rss1 - rss0) / n / 1024:.1f} KB")
        heap1 = heap_in_use()
        print(f"C heap in use per session (glibc): {(heap1 - heap0) / n / 1024:.1f} KB")
        if args.trim:
            # What of that is memory freed but kept by the C allocator (glibc malloc)?
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            rss2 = proc.memory_info().rss
            print(f"RSS per session after malloc_trim: {(rss2 - rss0) / n / 1024:.1f} KB")
        print_growth(before, after, n, "session")
        if args.tracemalloc:
            snap1 = tracemalloc.take_snapshot()
            print_traced(snap0, snap1, n, "session", args.frames, args.top)
        if args.dump:
            dump(presence)
        for round_ in range(args.jobs):
            if args.freeze:
                gc.collect()
                gc.freeze()
            await push_round(server, n, round_)
            if args.freeze:
                gc.unfreeze()
    finally:
        if swarm is not None and swarm.poll() is None:
            swarm.send_signal(signal.SIGTERM)
            try:
                swarm.wait(30)
            except subprocess.TimeoutExpired:
                swarm.kill()
        await server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--tls-groups", default=None, help="the server's --tls-groups")
    p.add_argument("--dump", action="store_true", help="print one session's objects")
    p.add_argument("--jobs", type=int, default=0, help="ping jobs to all, timing the GC")
    p.add_argument(
        "--freeze",
        action="store_true",
        help="gc.freeze() before each job (the server also "
        "settles its heap by itself: tcm/heap.py)",
    )
    memory_arguments(p)
    args = p.parse_args()
    return run_async(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
