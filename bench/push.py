#!/usr/bin/env python3
"""Push a `ping` job to N connected agents, side by side with the ways a user would otherwise
get it there, in one run on one machine:

  tcm           persistent WSS sessions (the default)
  long-poll     the same agents in HTTP mode, the server holding their polls (up to 30 s)
  poll-60s      the same agents in HTTP mode polling every 60 s (the legacy way)
  floor         a bare Twisted + Autobahn TLS server broadcasting one prepared message to
                N connections (bench/floor.py): what this stack cannot beat
  gateway       the same agents' persistent sessions through `twistd tcm-gateway` (one
                worker): the server gets their frames over the gateway's one link, in
                `batch` link messages, and acknowledges them the same way; the gateway's
                own CPU per result is reported beside the server's

For tcm modes, times are from the job's creation (server clock) to each agent receiving the
request (agent clock, same machine) and to each result being stored (server clock).

Usage: .venv/bin/python bench/push.py [--counts 1000,10000]
       [--modes tcm,long-poll,poll-60s,floor,gateway]
       [--rounds 3] [--work DIR]
Everything it starts, it stops; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import BenchServer, SwarmProcs, cpu_seconds, emit, run_job, summary  # noqa: E402
from floor import measure as floor_measure  # noqa: E402

from tests.harness import GatewayProc  # noqa: E402


def wait_mode(server: BenchServer, persistent: bool, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sessions = server.status()["sessions"]
        if (sessions >= n) if persistent else (sessions == 0):
            return
        time.sleep(0.5)
    raise AssertionError(f"agents did not reach persistent={persistent} in {timeout} s")


def tcm_rows(mode: str, n: int, results: list[dict]) -> dict:
    received = [x for r in results for x in r["received"]]
    sent = [x for r in results for x in r["sent"]]
    stored_last = [max(r["stored"]) for r in results if r["stored"]]
    cpus = sorted(r["server_cpu_s"] for r in results if r.get("server_cpu_s") is not None)
    cpu = cpus[len(cpus) // 2] if cpus else None  # the median round
    stored_n = min(r["counts"]["succeeded"] for r in results)
    return {
        "mode": mode,
        "agents": n,
        "rounds": len(results),
        "succeeded": min(r["counts"]["succeeded"] for r in results),
        "sent": summary(sent),
        "delivery": summary(received),
        "all_stored_s": max(stored_last) if stored_last else None,
        "all_stored_median_s": sorted(stored_last)[len(stored_last) // 2] if stored_last else None,
        # the server process's CPU from the job's creation until all stored (median round)
        "server_cpu_s": round(cpu, 3) if cpu is not None else None,
        "server_cpu_per_result_ms": round(1000 * cpu / stored_n, 4) if cpu and stored_n else None,
    }


def run_tcm_job(server: BenchServer, n: int, timeout: float) -> dict:
    return run_job(
        server.api(),
        {"action": "ping", "targets": "all", "ttl": timeout + 60},
        n,
        timeout,
        cpu_of=server.ps(),
    )


def gateway_row(base: str, n: int, rounds: int, settle: float) -> dict:
    """The tcm row's rounds with every agent's session through one gateway worker."""
    server = BenchServer(base, port=None, extra=["--name", "bench"])
    server.start()
    server.cli("settings", "set", "persistent_connections", "true")
    gw = GatewayProc(base, "gw", {"s": server}, extra=["--max-clients", "19000", "--workers", "1"])
    swarm: SwarmProcs | None = None
    try:
        gw.start()
        assert gw.proc is not None
        gw_proc = psutil.Process(gw.proc.pid)
        swarm = SwarmProcs(
            base, server, n, server.token(uses=n + 10), extra=["--backoff-max", "5"], url=gw.url
        )
        swarm.start()
        server.wait_sessions(n, timeout=max(300, n / 20))
        time.sleep(settle)
        run_tcm_job(server, n, 60)  # warm-up
        results, gw_cpu = [], []
        for _ in range(rounds):
            g0 = cpu_seconds(gw_proc)
            results.append(run_tcm_job(server, n, 60))
            gw_cpu.append(cpu_seconds(gw_proc) - g0)
        row = tcm_rows("gateway", n, results)
        stored = row["succeeded"]
        cpu = sorted(gw_cpu)[len(gw_cpu) // 2]
        row["gateway_cpu_per_result_ms"] = round(1000 * cpu / stored, 4) if stored else None
        return row
    finally:
        if swarm is not None:
            swarm.stop()
        gw.stop(timeout=30)
        server.stop(timeout=30)


def bench_count(
    n: int, modes: list[str], rounds: int, work: str, settle: float = 2.0
) -> list[dict]:
    rows: list[dict] = []
    base = os.path.join(work, f"n{n}")
    os.makedirs(base, exist_ok=True)
    tcm_modes = [m for m in modes if m not in ("floor", "gateway")]
    if tcm_modes:
        server = BenchServer(base, port=None, extra=["--poll-interval", "60", "--long-poll", "30"])
        server.start()
        server.cli("settings", "set", "persistent_connections", "true")
        server.cli("settings", "set", "poll_interval", "60")
        server.cli("settings", "set", "long_poll", "30")
        swarm = SwarmProcs(base, server, n, server.token(uses=n + 10), extra=["--backoff-max", "5"])
        try:
            swarm.start()
            server.wait_sessions(n, timeout=max(300, n / 20))
            time.sleep(settle)
            if "tcm" in tcm_modes:
                run_tcm_job(server, n, 60)  # warm-up
                rows.append(tcm_rows("tcm", n, [run_tcm_job(server, n, 60) for _ in range(rounds)]))
            if "poll-60s" in tcm_modes or "long-poll" in tcm_modes:
                server.cli("settings", "set", "long_poll", "0")
                server.cli("settings", "set", "persistent_connections", "false")
                wait_mode(server, False, n, 120)
                time.sleep(65)  # every agent has polled once and learned there is no long-poll
                if "poll-60s" in tcm_modes:
                    rows.append(tcm_rows("poll-60s", n, [run_tcm_job(server, n, 150)]))
                if "long-poll" in tcm_modes:
                    server.cli("settings", "set", "long_poll", "30")
                    time.sleep(65)  # each agent's next poll answer turns its long-polls on
                    rows.append(
                        tcm_rows(
                            "long-poll", n, [run_tcm_job(server, n, 90) for _ in range(rounds)]
                        )
                    )
                server.cli("settings", "set", "persistent_connections", "true")
        finally:
            swarm.stop()
            server.stop()
    if "gateway" in modes:
        rows.append(gateway_row(base, n, rounds, settle))
    if "floor" in modes:
        floors = [floor_measure(n) for _ in range(rounds)]
        rows.append(
            {
                "mode": "floor",
                "agents": n,
                "rounds": rounds,
                "succeeded": n,
                "delivery": {
                    "p50": sorted(f["p50"] for f in floors)[rounds // 2],
                    "p99": sorted(f["p99"] for f in floors)[rounds // 2],
                    "last": sorted(f["last"] for f in floors)[rounds // 2],
                    "n": n,
                },
                "all_stored_s": None,
                # the floor's CPU from its broadcast until every result is acknowledged
                "server_cpu_s": round(sorted(f["cpu_s"] for f in floors)[rounds // 2], 3),
                "server_cpu_per_result_ms": round(
                    sorted(f["cpu_per_result_ms"] for f in floors)[rounds // 2], 4
                ),
            }
        )
    floor_last = next((r["delivery"]["last"] for r in rows if r["mode"] == "floor"), None)
    poll_last = next((r["delivery"]["last"] for r in rows if r["mode"] == "poll-60s"), None)
    for r in rows:
        last = r["delivery"]["last"]
        r["last_vs_floor"] = round(last / floor_last, 2) if floor_last and last else None
        r["faster_than_poll_60s"] = round(poll_last / last, 1) if poll_last and last else None
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1000,10000")
    p.add_argument("--modes", default="tcm,long-poll,poll-60s,floor")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--work",
        default="/tmp/tcm-bench",
        help="kept between runs: agents enrolled once reconnect next time",
    )
    p.add_argument("--fresh", action="store_true", help="forget earlier identities first")
    p.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds to wait once every agent is connected (the server settles its heap "
        "within 30 s of a fleet connecting: 40 measures the steady state)",
    )
    args = p.parse_args()
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    modes = args.modes.split(",")
    rows: list[dict] = []
    for n in [int(x) for x in args.counts.split(",")]:
        rows.extend(bench_count(n, modes, args.rounds, args.work, args.settle))
    emit(
        "push",
        rows,
        [
            ("mode", "mode"),
            ("agents", "N"),
            ("succeeded", "ok"),
            ("delivery.p50", "deliver p50 s"),
            ("delivery.p99", "p99 s"),
            ("delivery.last", "last s"),
            ("all_stored_s", "all stored s"),
            ("server_cpu_per_result_ms", "srv CPU ms/result"),
            ("gateway_cpu_per_result_ms", "gw CPU ms/result"),
            ("last_vs_floor", "x floor"),
            ("faster_than_poll_60s", "x faster than poll"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
