#!/usr/bin/env python3
"""The server's side of a fleet's inventory collection, without sockets: N agents'
`inventory.collect` results (a ~2,000-entry package list each, varied per agent) handed to
the real JobService and Database (SQLite, group commit), the way the agent API hands them
over, a batch per reactor turn; the process's RSS before, at its peak and after (10 s after
the last result was stored: what the server keeps).

What it leaves out is the transport (TLS, WebSocket, the agents): bench/inventory.py measures
everything end to end. This one runs 10,000 agents' results in one process in under a minute
of CPU, and runs the same on the code before issue 18 (PYTHONPATH=a checkout of it).

Usage: .venv/bin/python bench/inventory_ingest.py [--count 10000] [--batch 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time

import psutil
from twisted.internet import defer, reactor, task

from tcm.server.dispatcher import Dispatcher
from tcm.server.jobservice import JobService
from tcm.server.sessions import SessionRegistry
from tcm.store import Database

PACKAGES = [
    {"name": f"pkg-{i:05d}", "version": f"{1 + i % 9}.{i % 13}.0", "arch": "amd64"}
    for i in range(2000)
]


def result_body(member: int) -> bytes:
    """One agent's result as it arrives (JSON bytes): its own package versions and host."""
    packages = list(PACKAGES)
    for i in range(member % 50, 2000, 50):
        packages[i] = {**packages[i], "version": f"{member % 17}.{i % 13}.1"}
    classes = {
        "hostname": {"hostname": f"host-{member:06d}", "fqdn": f"host-{member:06d}.example"},
        "os": {"system": "Linux", "family": "debian", "version": "12"},
        "software": {"manager": "dpkg", "count": len(packages), "packages": packages},
    }
    return json.dumps({"classes": classes, "digests": {}, "unchanged": []}).encode()


class Peak(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


@defer.inlineCallbacks
def main(args):
    work = tempfile.mkdtemp(prefix="tcm-inventory-ingest-")
    db = Database(f"sqlite:///{os.path.join(work, 'tcm.sqlite')}", reactor=reactor)
    db.open()
    agents = [f"a-{i:06d}" for i in range(args.count)]
    jobs = JobService(
        db.jobs,
        Dispatcher(SessionRegistry()),
        reactor,
        capabilities_of=lambda a: None,
        known_agents=lambda: agents,
        inventory_store=db.inventory,
    )
    yield jobs.load()
    job_id = yield jobs.create("inventory.collect", {}, agents, 3600, None)
    for agent in agents:
        jobs.work_for(agent)  # delivered, as a poll would take it
    bodies_bytes = 0
    proc = psutil.Process()
    idle = proc.memory_info().rss
    peak = Peak()
    peak.start()
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter()
    waits = []
    for start in range(0, args.count, args.batch):
        for i in range(start, min(start + args.batch, args.count)):
            raw = result_body(i)
            bodies_bytes += len(raw)
            result = json.loads(raw)  # what the agent API parses
            del raw
            now = time.time()
            waits.append(jobs.result(agents[i], job_id, "succeeded", result, None, now, now, now))
            del result
        yield task.deferLater(reactor, 0, lambda: None)  # the reactor's next turn
    yield defer.gatherResults(waits)
    elapsed = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    del waits
    yield task.deferLater(reactor, 10, lambda: None)
    peak.done.set()
    after = proc.memory_info().rss
    size = os.path.getsize(os.path.join(work, "tcm.sqlite"))
    wal = os.path.join(work, "tcm.sqlite-wal")
    size += os.path.getsize(wal) if os.path.exists(wal) else 0
    row = {
        "agents": args.count,
        "received_mb": round(bodies_bytes / 2**20),
        "all_stored_s": round(elapsed, 1),
        "cpu_s": round((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 1),
        "rss_idle_mb": round(idle / 2**20),
        "rss_peak_mb": round(peak.peak / 2**20),
        "rss_after_mb": round(after / 2**20),
        "db_mb": round(size / 2**20),
    }
    print(json.dumps(row))
    db.close()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--batch", type=int, default=200)
    args = p.parse_args()

    def run():
        d = main(args)
        d.addErrback(lambda f: (f.printTraceback(), None))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
