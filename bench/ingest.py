#!/usr/bin/env python3
"""Results stored per second: the server's Database with its group commit, on the real database.

Creates one job with N targets (as the server does), then hands the Database N results as fast
as the reactor lets it (the way N agents' result requests reach it) and measures until the
last one is committed. SQLite in a temporary directory, and PostgreSQL when --postgres gives a
URL (default: the local server's `test` database, a fresh schema per run).

Baseline in the same run: the same N rows written one transaction per result (what a store
without group commit does).

Usage: .venv/bin/python bench/ingest.py [--count 10000] [--postgres URL | --no-postgres]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402
from twisted.internet import defer, task  # noqa: E402

from tcm.store import Database  # noqa: E402
from tcm.store import schema as t  # noqa: E402


def prepare(db: Database, job_id: str, n: int):
    now = time.time()
    job = dict(
        id=job_id,
        action="ping",
        args={},
        created_at=now,
        expires_at=now + 3600,
        timeout=None,
        created_by="bench",
    )
    return db.jobs.create_job(job, [f"a-{i:06d}" for i in range(n)], now)


@defer.inlineCallbacks
def grouped(db: Database, n: int):
    job_id = uuid.uuid4().hex[:16]
    yield prepare(db, job_id, n)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    now = time.time()
    waits = [
        db.jobs.store_result(
            job_id, f"a-{i:06d}", "succeeded", {"pong": True, "i": i}, None, now, now, now, now
        )
        for i in range(n)
    ]
    yield defer.gatherResults(waits)
    return time.perf_counter() - t0, time.process_time() - cpu0


@defer.inlineCallbacks
def one_by_one(db: Database, n: int):
    job_id = uuid.uuid4().hex[:16]
    yield prepare(db, job_id, n)
    jt = t.job_targets
    t0 = time.perf_counter()
    now = time.time()
    for i in range(n):
        agent = f"a-{i:06d}"
        yield db.transaction(
            lambda c, a=agent, i=i: c.execute(
                jt.update()
                .where(jt.c.job_id == job_id)
                .where(jt.c.agent_id == a)
                .values(
                    state="succeeded",
                    result={"pong": True, "i": i},
                    finished_at=now,
                    updated_at=now,
                )
            )
        )
    return time.perf_counter() - t0


@defer.inlineCallbacks
def run(reactor, args):
    rows = []
    urls = []
    tmp = tempfile.mkdtemp(prefix="tcm-ingest-")
    urls.append(("sqlite", f"sqlite:///{os.path.join(tmp, 'tcm.sqlite')}"))
    if args.postgres:
        urls.append(("postgresql", args.postgres))
    for name, url in urls:
        if name == "postgresql":
            import sqlalchemy as sa

            schema = "bench_" + uuid.uuid4().hex[:8]
            eng = sa.create_engine(url)
            with eng.begin() as c:
                c.execute(sa.text(f"CREATE SCHEMA {schema}"))
            url_used = url + (("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}")
        else:
            url_used = url
        db = Database(url_used, reactor=reactor)
        db.open()
        try:
            g, cpu = yield grouped(db, args.count)
            baseline_n = min(args.count, args.baseline_count)
            b = yield one_by_one(db, baseline_n)
            rows.append(
                {
                    "database": name,
                    "results": args.count,
                    "group_commit_per_s": round(args.count / g),
                    "group_commit_s": round(g, 3),
                    "transactions": db.writes.flushes,
                    # the process's CPU (both threads) from the first result to the last
                    # commit, per result: what the store costs the server
                    "cpu_per_result_ms": round(1000 * cpu / args.count, 4),
                    "one_tx_per_result_per_s": round(baseline_n / b),
                    "speedup": round((args.count / g) / (baseline_n / b), 1),
                }
            )
        finally:
            db.close()
            if name == "postgresql":
                with eng.begin() as c:
                    c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    emit(
        "ingest",
        rows,
        [
            ("database", "database"),
            ("results", "results"),
            ("group_commit_per_s", "results/s (group commit)"),
            ("transactions", "transactions"),
            ("cpu_per_result_ms", "CPU ms/result"),
            ("one_tx_per_result_per_s", "results/s (one tx each)"),
            ("speedup", "x"),
        ],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10000)
    p.add_argument("--baseline-count", type=int, default=2000)
    p.add_argument("--postgres", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    p.add_argument("--no-postgres", dest="postgres", action="store_const", const=None)
    args = p.parse_args()
    task.react(lambda reactor: run(reactor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
