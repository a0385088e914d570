#!/usr/bin/env python3
"""Reconnect storm: N connected agents, the server restarted (stopped, started again at
once); how long until 50 / 99 / 100 % of the agents have a session again, how many attempts
failed meanwhile, the server's peak CPU and RSS, and that a job created right after the
restart reaches every agent exactly once.

Cost per unit: `server_cpu_per_reconnect_ms`, the restarted server process's CPU until every
agent is back, less what the same server's start took without a storm, per session opened;
in the same run `floor_cpu_per_connect_ms`, bench/floor.py's bare Twisted + Autobahn server
for the same kind of clients (mutual TLS, WebSocket upgrade, one message each way).

With --via-gateway the agents connect through a `twistd tcm-gateway` (one upstream: the
server), and the *gateway* is restarted: its agents come back through the new gateway
process while the server runs on. Cost per unit there: `gw_cpu_per_reconnect_ms` (the
restarted gateway's CPU until every agent is back, less what its start took without a
storm) and `server_cpu_per_reconnect_ms` (the server's CPU over the same window: the
sessions it opens again on the gateway's link), each per session opened; the handshakes'
kinds from the gateway's /metrics (`gw_handshakes`); peak CPU and RSS are the gateway's.

Usage: .venv/bin/python bench/storm.py [--counts 10000] [--kill] [--work DIR] [--no-floor]
       [--via-gateway]
       --kill restarts with SIGKILL instead of SIGTERM (a crash, not a shutdown).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import signal
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402
from common import (  # noqa: E402
    BenchServer,
    KeptApi,
    SwarmProcs,
    cpu_seconds,
    emit,
    free_port,
    run_job,
)
from floor import measure_connect  # noqa: E402


def swarm_attempts(state_dir: str) -> int:
    total = 0
    for path in glob.glob(os.path.join(state_dir, "swarm-*.json")):
        try:
            with open(path) as f:
                total += json.load(f)["reconnect_attempts"]
        except (OSError, ValueError, KeyError):
            pass
    return total


class Sampler(threading.Thread):
    """Peak CPU (% of one core) and RSS of the server process (anything with `ps()`: the
    gateway's, with --via-gateway), sampled every 0.5 s."""

    def __init__(self, server: Any):
        super().__init__(daemon=True)
        self.server = server
        self.peak_cpu = 0.0
        self.peak_rss = 0
        self.stop_at = time.monotonic() + 600
        self.running = True

    def run(self) -> None:
        while self.running and time.monotonic() < self.stop_at:
            try:
                proc = self.server.ps()
                proc.cpu_percent(None)
                time.sleep(0.5)
                self.peak_cpu = max(self.peak_cpu, proc.cpu_percent(None))
                self.peak_rss = max(self.peak_rss, proc.memory_info().rss)
            except Exception:
                time.sleep(0.1)


def sessions_opened(log_path: str, offset: int) -> list[float]:
    """Epoch times of the sessions the server opened, from its log after byte `offset`.

    The server's own record, second resolution: during a storm an admin API call waits in
    the same accept queue as ten thousand agents (up to 47 s here), so /status sees the
    sessions late."""
    times = []
    with open(log_path, "rb") as f:
        f.seek(offset)
        for line in f:
            if b"] agent " in line and b" session open via " in line:
                stamp = line[:24].decode()  # 2026-11-27T08:08:26+0000
                times.append(datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp())
    return times


def watch_back(kept: KeptApi, n: int, t0: float, seconds: float = 300) -> tuple[dict, int]:
    """Polls the server's /status every 0.25 s until all `n` agents have a session again (or
    `seconds` passed): when /status first showed 50, 99 and 100 % (seconds since `t0`), and
    the sessions counted at that last poll (0 if not all came back)."""
    marks: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = kept.call("GET", "/status")["sessions"]
        for name, frac in (("50", 0.5), ("99", 0.99), ("100", 1.0)):
            if name not in marks and s >= frac * n:
                marks[name] = time.monotonic() - t0
        if "100" in marks:
            return marks, s
        time.sleep(0.25)
    return marks, 0


def back_marks(log_path: str, offset: int, n: int, t0_epoch: float) -> dict[str, float]:
    """Seconds from `t0_epoch` until 50, 99 and 100 % of `n` sessions had opened, per the
    server's log after byte `offset` (its stamps are whole seconds: a mark is late by up to
    1 s, never early)."""
    opened = sorted(sessions_opened(log_path, offset))
    return {
        name: round(opened[int(frac * n) - 1] + 1 - t0_epoch, 1)
        for name, frac in (("50", 0.5), ("99", 0.99), ("100", 1.0))
        if len(opened) >= int(frac * n)
    }


def measure(n: int, kill: bool, work: str, server_args: list[str] | None = None) -> dict:
    base = os.path.join(work, f"n{n}")
    os.makedirs(base, exist_ok=True)
    server = BenchServer(base, extra=server_args or [])
    server.start()
    # what a start costs this server with no agent connecting (its database as it will be)
    startup_cpu = cpu_seconds(server.ps())
    swarm = SwarmProcs(base, server, n, server.token(uses=n + 10))
    try:
        swarm.start()
        server.wait_sessions(n, timeout=max(600, n / 10))
        time.sleep(3)
        attempts_before = swarm_attempts(swarm.state_dir)
        log_offset = os.path.getsize(server.log_path)
        t0 = time.monotonic()
        t0_epoch = time.time()
        if kill:
            server.kill()
        else:
            server.signal(signal.SIGTERM)
            server.proc.wait(60)  # type: ignore[union-attr]
        down_s = time.monotonic() - t0
        server.start()  # same port, same state
        sampler = Sampler(server)
        sampler.start()
        kept = KeptApi(server.api())  # one connection: the polls cost no handshakes
        marks, sessions_back = watch_back(kept, n, t0)
        cpu_back = cpu_seconds(server.ps()) if sessions_back else None
        kept.close()
        sampler.running = False
        logged = back_marks(server.log_path, log_offset, n, t0_epoch)
        job = run_job(server.api(), {"action": "ping", "targets": "all"}, n, 120)
        attempts = swarm_attempts(swarm.state_dir) - attempts_before
    finally:
        swarm.stop()
        server.stop()
    return {
        "agents": n,
        "restart": "SIGKILL" if kill else "SIGTERM",
        "server_down_s": round(down_s, 2),
        "back_50pct_s": logged.get("50"),
        "back_99pct_s": logged.get("99"),
        "back_100pct_s": logged.get("100"),
        "api_saw_50pct_s": marks.get("50"),
        "api_saw_99pct_s": marks.get("99"),
        "api_saw_100pct_s": marks.get("100"),
        "failed_attempts": attempts,
        "peak_cpu_pct": sampler.peak_cpu,
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "job_after": job["counts"],
        "server_cpu_reconnects_s": (
            round(cpu_back - startup_cpu, 2) if cpu_back is not None else None
        ),
        "server_cpu_per_reconnect_ms": (
            round(1000 * (cpu_back - startup_cpu) / sessions_back, 3)
            if cpu_back is not None and sessions_back
            else None
        ),
    }


def gateway_handshakes(port: int) -> dict[str, float]:
    """The gateway's TLS handshakes by kind, from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tcm_gateway_tls_handshakes_total"
    }


def measure_gateway(n: int, kill: bool, work: str, server_args: list[str] | None = None) -> dict:
    """The storm through a gateway: N agents' sessions on its link, the gateway restarted."""
    from tests.harness import GatewayProc

    base = os.path.join(work, f"gw-n{n}")
    os.makedirs(base, exist_ok=True)
    server = BenchServer(base, extra=["--name", "bench", *(server_args or [])])
    server.start()
    mport = free_port()
    gw = GatewayProc(
        base,
        "gw",
        {"s": server},
        extra=["--max-clients", "19500", "--drain-grace", "1", "--metrics-port", str(mport)],
    )
    gw.start()
    gw_startup_cpu = cpu_seconds(psutil.Process(gw.proc.pid))  # type: ignore[union-attr]
    # enrolled through the gateway (/upstream/s), their sessions through it as well
    swarm = SwarmProcs(base, server, n, server.token(uses=n + 10), url=f"{gw.url}/upstream/s")
    try:
        swarm.start()
        server.wait_sessions(n, timeout=max(600, n / 10))
        time.sleep(3)
        before = gateway_handshakes(mport)
        attempts_before = swarm_attempts(swarm.state_dir)
        log_offset = os.path.getsize(server.log_path)
        server_cpu0 = cpu_seconds(server.ps())
        t0 = time.monotonic()
        t0_epoch = time.time()
        if kill:
            gw.kill()
        else:
            gw.stop(60)  # SIGTERM: every agent told 4006, the grace, then gone
        down_s = time.monotonic() - t0
        gw.start(wait=False)  # same port, same state directory
        gw_ps = psutil.Process(gw.proc.pid)  # type: ignore[union-attr]
        sampler = Sampler(type("Gateway", (), {"ps": lambda self: gw_ps})())
        sampler.start()
        kept = KeptApi(server.api())
        marks, sessions_back = watch_back(kept, n, t0)
        cpu_back = server_cpu_back = None
        if sessions_back:
            cpu_back, server_cpu_back = cpu_seconds(gw_ps), cpu_seconds(server.ps())
        kept.close()
        sampler.running = False
        after = gateway_handshakes(mport)
        logged = back_marks(server.log_path, log_offset, n, t0_epoch)
        job = run_job(server.api(), {"action": "ping", "targets": "all"}, n, 120)
        attempts = swarm_attempts(swarm.state_dir) - attempts_before
    finally:
        swarm.stop()
        gw.stop()
        server.stop()

    def per(cpu: float) -> float | None:
        return round(1000 * cpu / sessions_back, 3) if sessions_back else None

    return {
        "agents": n,
        "restart": ("SIGKILL" if kill else "SIGTERM") + " gateway",
        "server_down_s": round(down_s, 2),
        "back_50pct_s": logged.get("50"),
        "back_99pct_s": logged.get("99"),
        "back_100pct_s": logged.get("100"),
        "api_saw_99pct_s": marks.get("99"),
        "failed_attempts": attempts,
        "peak_cpu_pct": sampler.peak_cpu,  # the gateway's, here
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "gw_handshakes_before": before,
        "gw_handshakes": after,
        "job_after": job["counts"],
        "gw_cpu_per_reconnect_ms": (
            per(cpu_back - gw_startup_cpu) if cpu_back is not None else None
        ),
        "server_cpu_per_reconnect_ms": (
            per(server_cpu_back - server_cpu0) if server_cpu_back is not None else None
        ),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="10000")
    p.add_argument("--kill", action="store_true")
    p.add_argument("--work", default="/tmp/tcm-bench")
    p.add_argument("--no-floor", action="store_true", help="skip the floor's connections")
    p.add_argument(
        "--server-args",
        default="",
        help="more tcm-server options, e.g. '--max-handshakes 0' (admission control off)",
    )
    p.add_argument(
        "--via-gateway",
        action="store_true",
        help="agents through a tcm-gateway, and the gateway is restarted (not the server)",
    )
    args = p.parse_args()
    extra = args.server_args.split()
    run = measure_gateway if args.via_gateway else measure
    rows = [run(int(n), args.kill, args.work, extra) for n in args.counts.split(",")]
    for row in rows:
        row["server_args"] = args.server_args
        if not args.no_floor:
            groups = None
            if "--tls-groups" in extra:
                groups = extra[extra.index("--tls-groups") + 1]
            print(json.dumps({"storm": row}), flush=True)  # kept if the floor fails below
            try:
                floor = measure_connect(row["agents"], tls_groups=groups)
            except Exception as e:  # the floor's own clients failed: say so, keep the row
                row["floor_error"] = f"{type(e).__name__}: {e}"
                print(f"floor failed: {row['floor_error']}", file=sys.stderr)
                continue
            row["floor_cpu_per_connect_ms"] = floor["floor_cpu_per_connect_ms"]
            row["floor_connect_all_s"] = floor["connect_all_s"]
            mine = row["server_cpu_per_reconnect_ms"]
            if args.via_gateway and mine is not None and row["gw_cpu_per_reconnect_ms"]:
                mine += row["gw_cpu_per_reconnect_ms"]  # the TLS is the gateway's there
            row["reconnect_vs_floor"] = (
                round(mine / floor["floor_cpu_per_connect_ms"], 2) if mine else None
            )
    emit(
        "storm",
        rows,
        [
            ("agents", "agents"),
            ("restart", "restart"),
            ("back_50pct_s", "50% s"),
            ("back_99pct_s", "99% s"),
            ("back_100pct_s", "100% s"),
            ("api_saw_99pct_s", "99% via API s"),
            ("failed_attempts", "failed attempts"),
            ("peak_cpu_pct", "peak CPU %"),
            ("server_cpu_per_reconnect_ms", "srv CPU ms/reconnect"),
            ("gw_cpu_per_reconnect_ms", "gw CPU ms/reconnect"),
            ("gw_handshakes.full", "gw full hs"),
            ("gw_handshakes.token", "gw token hs"),
            ("floor_cpu_per_connect_ms", "floor CPU ms/connect"),
            ("reconnect_vs_floor", "x floor"),
            ("peak_rss_mb", "peak RSS MB"),
            ("job_after.succeeded", "job ok after"),
        ],
        notes=[
            "times from the stop signal; the server starts again at once on the same port;",
            "back: sessions opened per the server's log; via API: when /status showed them",
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
