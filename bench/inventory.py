#!/usr/bin/env python3
"""Inventory at fleet scale: N swarm agents, each with an inventory of its own (a package list
of --packages entries, varied per agent so that digests differ), collected three times:

  full        the first collection: everything is sent and stored
  unchanged   a re-collection where nothing changed
  changed10   a re-collection where one class (the package list) changed on 10 % of agents

For each: bytes on the wire (TLS records, both ways, summed over the agents' sessions), bytes
stored (the job's target results plus what the inventory tables grew by; and the database
files' growth), time from the job's creation to all results stored, the server's peak and
after RSS (10 s after the last result) and its CPU seconds.

`--server-code DIR` runs the server from another checkout (e.g. `git archive main | tar -x -C
DIR`): the before figures of the same agents against the code before issue 18.

Usage: .venv/bin/python bench/inventory.py [--counts 1000] [--packages 2000]
       [--server-code DIR] [--label after] [--work DIR]
(10,000 agents: under `flock /work/wt/_notes/bench.lock ...`, and with `--server-option
--keepalive=300`: on two shared cores the swarm processes, busy making and sending thousands
of package lists, would not send their pings within the default 120 s of silence allowed,
which real agents on their own machines do.) Everything it starts, it stops; every wait is
bounded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sqlite3
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BenchServer, SwarmProcs, emit  # noqa: E402

from tcm.agent.swarm import CHANGES_FILE  # noqa: E402
from tcm.cli.api import CliError  # noqa: E402


def swarm_bytes(state_dir: str, after: float, timeout: float = 30.0) -> int:
    """Bytes sent + received by every swarm member's session, from status files written
    after `after` (each swarm process writes its own every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        files = glob.glob(os.path.join(state_dir, "swarm-*.json"))
        if files and all(os.path.getmtime(f) > after for f in files):
            total = 0
            for path in files:
                with open(path) as f:
                    counts = json.load(f)
                total += counts.get("bytes_sent", 0) + counts.get("bytes_received", 0)
            return total
        if time.monotonic() > deadline:
            raise AssertionError("swarm status files not refreshed")
        time.sleep(0.2)


def stored_bytes(db_path: str) -> dict[str, int]:
    """What the store holds: bytes of job target results and of inventory data (logical,
    read with SQLite's length()), and the database files' sizes."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        out = {
            "results": conn.execute(
                "SELECT coalesce(sum(length(result)), 0) FROM job_targets"
            ).fetchone()[0],
            "inventory": sum(
                conn.execute(f"SELECT coalesce(sum(length(data)), 0) FROM {t}").fetchone()[0]
                for t in ("inventory", "inventory_history")
                if t in tables
            ),
        }
    finally:
        conn.close()
    out["files"] = sum(os.path.getsize(p) for p in (db_path, db_path + "-wal") if os.path.exists(p))
    return out


class RssSampler(threading.Thread):
    """The server's peak RSS while a phase runs (sampled every 50 ms)."""

    def __init__(self, ps: Any, limit: int):
        super().__init__(daemon=True)
        self.ps = ps
        self.limit = limit
        self.peak = 0
        self.over = False
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                rss = self.ps.memory_info().rss
            except Exception:
                return
            self.peak = max(self.peak, rss)
            if rss > self.limit:  # the machine is shared: never let one run eat it
                self.over = True
                self.ps.kill()
                return
            time.sleep(0.05)

    def stop(self) -> int:
        self._done.set()
        self.join(5)
        return self.peak


def phase(
    name: str, server: BenchServer, swarm: SwarmProcs, n: int, timeout: float, limit: int
) -> dict[str, Any]:
    api = server.api()
    ps = server.ps()
    db = os.path.join(server.state_dir, "tcm.sqlite")
    wire0 = swarm_bytes(swarm.state_dir, time.time())
    stored0 = stored_bytes(db)
    cpu0 = ps.cpu_times()
    rss0 = ps.memory_info().rss
    sampler = RssSampler(ps, limit)
    sampler.start()
    t0 = time.monotonic()
    job = api.call(
        "POST", "/jobs", {"action": "inventory.collect", "targets": "all", "ttl": timeout + 60}
    )["job"]
    counts: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout and not sampler.over:
        try:
            counts = api.call("GET", f"/jobs/{job}?results=false")["counts"]
        except CliError as e:  # a server too busy to answer now: ask again
            print(f"{name}: {e}", file=sys.stderr)
            time.sleep(1)
            continue
        if counts["completed"] >= n:
            break
        time.sleep(0.2)
    all_stored = time.monotonic() - t0
    cpu1 = ps.cpu_times()
    time.sleep(10)  # what the server keeps once the collection is over
    peak = sampler.stop()
    if sampler.over:
        raise AssertionError(f"{name}: server RSS over {limit} bytes: killed")
    after = ps.memory_info().rss
    wire1 = swarm_bytes(swarm.state_dir, time.time())
    stored1 = stored_bytes(db)
    return {
        "phase": name,
        "agents": n,
        "succeeded": counts.get("succeeded"),
        "wire_per_agent": round((wire1 - wire0) / n),
        "stored_per_agent": round(
            (
                (stored1["results"] - stored0["results"])
                + (stored1["inventory"] - stored0["inventory"])
            )
            / n
        ),
        "db_files_growth_mb": round((stored1["files"] - stored0["files"]) / 2**20, 1),
        "all_stored_s": round(all_stored, 2),
        "rss_idle_mb": round(rss0 / 2**20),
        "rss_peak_mb": round(peak / 2**20),
        "rss_after_mb": round(after / 2**20),
        "server_cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
    }


def wait_sessions(server: BenchServer, n: int, timeout: float) -> None:
    """Until n agents have a session; a status request lost in the agents' reconnect storm
    (the admin API shares their port and handshake gate) is asked again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if server.status()["sessions"] >= n:
                return
        except CliError as e:
            print(f"waiting for sessions: {e}", file=sys.stderr)
        time.sleep(1)
    raise AssertionError(f"fewer than {n} sessions after {timeout} s")


def forget_inventory(db_path: str) -> None:
    """Start from an empty inventory and no jobs (the agents' identities are kept: a second
    run reconnects without enrolling)."""
    if not os.path.exists(db_path):
        return
    conn = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table in ("inventory", "inventory_history", "job_output", "job_targets", "jobs"):
            if table in tables:
                conn.execute(f"DELETE FROM {table}")
        conn.commit()
    finally:
        conn.close()


def bench_count(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    base = os.path.join(args.work, f"{args.label}-n{n}")
    forget_inventory(os.path.join(base, "server", "tcm.sqlite"))
    server = BenchServer(base, port=None, extra=list(args.server_option or []))
    if args.server_code:
        server.env = {"PYTHONPATH": os.path.abspath(args.server_code)}
    server.start()
    swarm = SwarmProcs(
        base,
        server,
        n,
        server.token(uses=n + 10),
        extra=["--backoff-max", "5", "--inventory-packages", str(args.packages)],
    )
    changes = os.path.join(swarm.state_dir, CHANGES_FILE)
    if os.path.exists(changes):
        os.unlink(changes)
    rows = []
    try:
        swarm.start()
        wait_sessions(server, n, timeout=max(300, n / 20))
        time.sleep(3)
        limit = int(args.rss_limit_gb * 2**30)
        timeout = max(300.0, n / 10)
        rows.append(phase("full", server, swarm, n, timeout, limit))
        rows.append(phase("unchanged", server, swarm, n, timeout, limit))
        with open(changes + ".tmp", "w") as f:
            json.dump({"software": {str(i): 1 for i in range(0, n, 10)}}, f)
        os.replace(changes + ".tmp", changes)
        rows.append(phase("changed10", server, swarm, n, timeout, limit))
    finally:
        swarm.stop()
        server.stop(timeout=30)
    for r in rows:
        r["code"] = args.label
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1000")
    p.add_argument("--packages", type=int, default=2000)
    p.add_argument("--label", default="after", help="names this run's rows (before/after)")
    p.add_argument("--server-code", help="run the server from this checkout (PYTHONPATH)")
    p.add_argument("--server-option", action="append", help="an extra tcm-server option")
    p.add_argument("--rss-limit-gb", type=float, default=12.0)
    p.add_argument("--work", default="/tmp/tcm-bench-inventory")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    for n in [int(x) for x in args.counts.split(",")]:
        rows.extend(bench_count(n, args))
    emit(
        "inventory",
        rows,
        [
            ("code", "code"),
            ("phase", "phase"),
            ("agents", "N"),
            ("succeeded", "ok"),
            ("wire_per_agent", "wire B/agent"),
            ("stored_per_agent", "stored B/agent"),
            ("db_files_growth_mb", "db files +MB"),
            ("all_stored_s", "all stored s"),
            ("rss_idle_mb", "RSS idle MB"),
            ("rss_peak_mb", "peak MB"),
            ("rss_after_mb", "after MB"),
            ("server_cpu_s", "server CPU s"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
