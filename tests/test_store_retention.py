"""Retention by size (issue 18) on SQLite and PostgreSQL: a job over its cap loses its oldest
output, then its oldest results; past the total the oldest finished jobs go first; the
space is given back (SQLite's incremental vacuum)."""

from __future__ import annotations

import pytest_twisted

from tcm.store.jobs import result_size
from tests.storedb import StoreTest

NOW = 1_700_000_000.0
DONE = ["pending", "delivered", "running"]  # the active states: such jobs are never purged


async def job(db, job_id: str, at: float, agents: list[str], result_text: str = "x" * 1000):
    await db.jobs.create_job(
        dict(
            id=job_id,
            action="command.run",
            args={},
            created_at=at,
            expires_at=at + 60,
            timeout=None,
            created_by="t",
        ),
        agents,
        at,
    )
    for i, agent in enumerate(agents):
        await db.jobs.store_result(
            job_id, agent, "succeeded", {"out": result_text}, None, at, at + i, at, at + i
        )


class TestRetentionBySize(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_sizes_count_results_and_output_per_job(self, db):
        await job(db, "j1", NOW, ["a", "b"])
        await db.jobs.add_output("j1", "a", 1, "stdout", "é" * 100, NOW)
        sizes = await db.jobs.sizes()
        one = result_size({"out": "x" * 1000}, None)
        assert sizes["jobs"] == {"j1": [2 * one, 200]}  # UTF-8 bytes of the output
        assert sizes["results"] == 2 * one and sizes["output"] == 200

    @pytest_twisted.ensureDeferred
    async def test_a_job_over_its_cap_loses_its_oldest_output_then_its_oldest_results(self, db):
        await job(db, "j1", NOW, ["a", "b", "c"])
        for seq in range(1, 6):
            await db.jobs.add_output("j1", "a", seq, "stdout", f"{seq}" * 100, NOW + seq)
        one = result_size({"out": "x" * 1000}, None)
        freed = await db.jobs.trim_job("j1", 250, NOW)
        assert freed == {"output_chunks": 3, "results": 0, "bytes": 300}
        assert [c["text"][0] for c in await db.jobs.get_output("j1")] == ["4", "5"]
        freed = await db.jobs.trim_job("j1", 200 + one + 1, NOW)
        assert freed["output_chunks"] == 2 and freed["results"] == 2
        shown = await db.jobs.get_job("j1")
        by_agent = {t["agent_id"]: t for t in shown["targets"]}
        assert by_agent["a"]["result"] is None and "result-bytes-per-job" in by_agent["a"]["error"]
        assert by_agent["b"]["result"] is None
        assert by_agent["c"]["result"] == {"out": "x" * 1000}  # the newest result is kept
        sizes = await db.jobs.sizes()
        assert sizes["output"] == 0 and sizes["results"] < 2 * one

    @pytest_twisted.ensureDeferred
    async def test_past_the_total_the_oldest_finished_jobs_go_first(self, db):
        await job(db, "old", NOW, ["a"])
        await job(db, "mid", NOW + 10, ["a"])
        await job(db, "new", NOW + 20, ["a"])
        await db.jobs.create_job(
            dict(
                id="running",
                action="ping",
                args={},
                created_at=NOW - 100,  # the oldest of all, but not over: never purged
                expires_at=NOW + 1000,
                timeout=None,
                created_by="t",
            ),
            ["a"],
            NOW,
        )
        one = result_size({"out": "x" * 1000}, None)
        purged = await db.jobs.purge_oldest(one + 1, DONE)
        assert purged == {"jobs": 2, "bytes": 2 * one}
        left = {j["id"] for j in await db.jobs.list_jobs()}
        assert left == {"new", "running"}
        assert await db.jobs.purge_oldest(10 * one, DONE) == {"jobs": 1, "bytes": one}
        assert {j["id"] for j in await db.jobs.list_jobs()} == {"running"}

    @pytest_twisted.ensureDeferred
    async def test_deleted_space_is_given_back(self, db):
        await job(db, "big", NOW, [f"a-{i}" for i in range(50)], "y" * 20_000)
        before = await db.size()
        assert before > 50 * 20_000
        await db.jobs.purge_oldest(1, DONE)
        freed = await db.reclaim()
        after = await db.size()
        if db.engine.dialect.name == "sqlite":
            assert freed > 50 * 10_000 and after < before - 50 * 10_000
        else:  # PostgreSQL: autovacuum makes the space reusable; nothing to do here
            assert freed == 0


def test_a_database_made_without_incremental_vacuum_is_converted_once(tmp_path):
    import sqlite3

    from tcm.store import Database

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)  # as earlier versions made it: auto_vacuum NONE
    conn.execute("CREATE TABLE kept (x TEXT)")
    conn.execute("INSERT INTO kept VALUES ('still here')")
    conn.commit()
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    db = Database(f"sqlite:///{path}")
    db.open()
    db.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
        assert conn.execute("SELECT x FROM kept").fetchall() == [("still here",)]
    finally:
        conn.close()
    fresh = Database(f"sqlite:///{tmp_path / 'new.sqlite'}")
    fresh.open()
    fresh.close()
    conn = sqlite3.connect(tmp_path / "new.sqlite")
    try:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    finally:
        conn.close()


class TestPurgeBySize(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_the_purge_trims_then_purges_oldest_and_reports_it(self, db):
        from twisted.internet.task import Clock

        from tcm.server.audit import AuditLog
        from tcm.server.history import JobHistory, SizeLimits

        one = result_size({"out": "x" * 1000}, None)
        await job(db, "old", NOW, ["a", "b"])
        await job(db, "new", NOW + 10, ["a", "b", "c", "d"])
        clock = Clock()
        clock.advance(NOW + 100)
        audit = AuditLog(db.audit, clock)
        history = JobHistory(
            db.jobs,
            db.agents,
            None,
            lambda: 3650 * 86400.0,  # age retention: nothing this young goes by age
            clock,
            limits=SizeLimits(per_job=3 * one, total=3 * one, inventory_history=5),
            database=db,
            inventory_store=db.inventory,
            audit=audit,
        )
        assert await history.purge() == 1  # "old", by size
        jobs = {j["id"] for j in await db.jobs.list_jobs()}
        assert jobs == {"new"}
        kept = await db.jobs.get_job("new")
        assert sum(t["result"] is not None for t in kept["targets"]) == 2  # trimmed to the cap
        entries = await db.audit.list_audit(action="retention.purge")
        purge = next(e for e in entries if e["action"] == "retention.purge")
        assert purge["actor"] == "server"
        assert purge["details"]["jobs"] == 1 and purge["details"]["trimmed_jobs"] == 1
        figures = history.store_figures
        assert figures["jobs"] == 1 and figures["results_bytes"] <= 3 * one
        assert figures["database_bytes"] > 0 and "inventory_bytes" in figures
        assert figures["last_purge"]["jobs"] == 1
        assert history.retention()["result_bytes_total"] == 3 * one
