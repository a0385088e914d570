"""Database on SQLite and PostgreSQL: migration at open, run/transaction/read on the thread
pool, and the write queue's group commit (callers' Deferreds fire only after their rows are
committed; a failed commit fails each of its callers and writes none of their rows)."""

from __future__ import annotations

import threading

import pytest
import pytest_twisted
import sqlalchemy as sa
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tcm.store import schema as t
from tcm.store.access import AccessStore
from tcm.store.agents import AgentStore
from tcm.store.audit import AuditStore
from tcm.store.config import ConfigStore
from tcm.store.inventory import InventoryStore
from tcm.store.jobs import JobStore
from tcm.store.settings import SettingsStore
from tcm.store.targets import TargetStore
from tests.inproc import within
from tests.storedb import StoreTest

NOW = 1_700_000_000.0


def next_turn():
    return deferLater(reactor, 0, lambda: None)


class TestDatabase(StoreTest):
    def test_open_migrates_to_the_declared_schema(self, db):
        with db.engine.connect() as c:
            names = set(sa.inspect(c).get_table_names())
        assert set(t.metadata.tables) | {"alembic_version"} <= names

    def test_one_component_per_area(self, db):
        assert isinstance(db.settings, SettingsStore)
        assert isinstance(db.access, AccessStore)
        assert isinstance(db.agents, AgentStore)
        assert isinstance(db.jobs, JobStore)
        assert isinstance(db.config, ConfigStore)
        assert isinstance(db.targets, TargetStore)
        assert isinstance(db.inventory, InventoryStore)
        assert isinstance(db.audit, AuditStore)

    @pytest_twisted.ensureDeferred
    async def test_run_transaction_and_read_off_the_reactor_thread(self, db):
        here = threading.get_ident()
        assert await db.run(threading.get_ident) != here
        insert = t.settings.insert().values(key="k", value=1)
        assert await db.transaction(lambda c: c.execute(insert).rowcount) == 1
        assert await db.read(lambda c: c.execute(sa.select(t.settings.c.value)).scalar()) == 1

    @pytest_twisted.ensureDeferred
    async def test_a_transaction_that_raises_writes_nothing(self, db):
        def op(c):
            c.execute(t.settings.insert().values(key="k", value=1))
            raise RuntimeError("half way")

        with pytest.raises(RuntimeError, match="half way"):
            await db.transaction(op)
        assert self.rows(db, t.settings) == []


class TestWriteQueue(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_writes_of_one_turn_share_one_commit(self, db):
        await db.jobs.create_job(
            dict(id="j", action="ping", args={}, created_at=NOW, expires_at=NOW + 60),
            ["a-1", "a-2"],
            NOW,
        )
        flushes = db.writes.flushes
        await gatherResults(
            [
                db.jobs.store_result("j", "a-1", "succeeded", {}, None, None, NOW),
                db.jobs.store_result("j", "a-2", "succeeded", {}, None, None, NOW),
                db.jobs.add_output("j", "a-1", 0, "stdout", "x", NOW),
                db.audit.audit("admin", "job.create", "j", {}, NOW),
                db.agents.agent_seen("a-1", NOW),
            ]
        )
        assert db.writes.flushes == flushes + 1
        await next_turn()  # the callers heard from inside the flush's end
        assert db.writes.idle()

    @pytest_twisted.ensureDeferred
    async def test_a_caller_hears_only_after_its_rows_are_committed(self, db):
        inside, release = threading.Event(), threading.Event()

        def slow(c):  # in the same transaction as the audit row, after it
            inside.set()
            release.wait(10)

        written = db.audit.audit("admin", "token.create", "x", {}, NOW)
        db.writes.submit(slow)
        try:
            await within(deferToThread(inside.wait, 10))
            # the row is written but not committed: the caller has not heard, and another
            # connection does not see it
            assert not written.called
            assert self.rows(db, t.audit_log) == []
        finally:
            release.set()
        await written
        assert [r["object"] for r in self.rows(db, t.audit_log)] == ["x"]

    @pytest_twisted.ensureDeferred
    async def test_rows_are_visible_to_another_connection_when_the_caller_hears(self, db):
        seen = []
        d = db.audit.audit("admin", "a", "o", {}, NOW)
        d.addCallback(lambda _: seen.append(len(self.rows(db, t.audit_log))))
        await d
        assert seen == [1]

    @pytest_twisted.ensureDeferred
    async def test_writes_queued_while_a_commit_runs_go_in_the_next_one(self, db):
        flushes = db.writes.flushes
        first = db.audit.audit("admin", "a", "1", {}, NOW)
        later = []
        first.addCallback(lambda _: later.append(db.audit.audit("admin", "a", "3", {}, NOW)))
        second = db.audit.audit("admin", "a", "2", {}, NOW)
        await gatherResults([first, second])
        await later[0]
        assert db.writes.flushes == flushes + 2
        assert [r["object"] for r in self.rows(db, t.audit_log)] == ["1", "2", "3"]
        await next_turn()
        assert db.writes.idle()

    @pytest_twisted.ensureDeferred
    async def test_a_failed_commit_fails_each_of_its_callers_and_writes_none_of_their_rows(
        self, db
    ):
        def broken(c):
            raise RuntimeError("disk full")

        audited = db.audit.audit("admin", "a", "lost", {}, NOW)
        failed = db.writes.submit(broken)
        seen = db.agents.agents_seen(["a-1"], NOW)
        for d in (audited, failed, seen):
            with pytest.raises(RuntimeError, match="disk full"):
                await d
        assert self.rows(db, t.audit_log) == []
        await db.audit.audit("admin", "a", "kept", {}, NOW)  # the queue goes on
        assert [r["object"] for r in self.rows(db, t.audit_log)] == ["kept"]

    @pytest_twisted.ensureDeferred
    async def test_a_flush_takes_a_bounded_share_in_order_and_the_rest_follows(self, db):
        """What piles up behind a long commit is written in bounded transactions, oldest
        first: no flush holds more than its byte budget (one entry at least)."""
        await db.jobs.create_job(
            dict(id="j", action="ping", args={}, created_at=NOW, expires_at=NOW + 60),
            [f"a-{i}" for i in range(6)],
            NOW,
        )
        db.writes.max_flush_bytes = 2500
        flushes = db.writes.flushes
        big = {"blob": "x" * 1000}  # ~1 KB each: two fit in a flush, a third does not
        stored = [
            db.jobs.store_result("j", f"a-{i}", "succeeded", big, None, None, NOW) for i in range(5)
        ]
        assert db.writes.queued_bytes > 5000
        huge = db.jobs.store_result("j", "a-5", "succeeded", {"b": "y" * 9000}, None, None, NOW)
        await gatherResults([*stored, huge])
        # 2 + 2 + 1 (the next, 9 KB, does not fit beside it) + 1 (alone, over the budget)
        assert db.writes.flushes == flushes + 4
        assert db.writes.queued_bytes == 0
        rows = self.rows(db, t.job_targets)
        assert sorted(r["agent_id"] for r in rows if r["state"] == "succeeded") == [
            f"a-{i}" for i in range(6)
        ]
        await next_turn()
        assert db.writes.idle()

    def test_batched_kinds_are_declared_once(self, db):
        with pytest.raises(ValueError, match="registered twice"):
            db.writes.register("result", t.settings.update())
        with pytest.raises(KeyError, match="no batched kind"):
            db.writes.add("unknown", [{}])


class TestPreparedBatches(StoreTest):
    """The write queue's batched kinds run as SQL compiled once per dialect, with each row
    turned into the driver's parameters: what SQLAlchemy's execute would have written."""

    def test_each_kind_is_compiled_once_per_dialect(self, db):
        first = db.writes.prepared(db.engine.dialect)
        assert set(first) == {"delivered", "running", "expired", "result", "seen"}
        assert db.writes.prepared(db.engine.dialect) is first

    @pytest_twisted.ensureDeferred
    async def test_literal_values_and_bind_processors_are_applied_to_every_row(self, db):
        # a kind of this test's own: a literal value in the statement (key "fixed") beside
        # a bind whose type processes its value (JSON), and a second kind with the literal
        # in a row-bound statement: each written as SQLAlchemy would
        for key in ("a", "b", "fixed"):
            await db.transaction(
                lambda c, k=key: c.execute(t.settings.insert().values(key=k, value=0))
            )
        db.writes.register(
            "test-json",
            t.settings.update()
            .where(t.settings.c.key == sa.bindparam("k"))
            .values(value=sa.bindparam("v", type_=sa.JSON)),
        )
        db.writes.register(
            "test-literal",
            t.settings.update().where(t.settings.c.key == "fixed").values(value=sa.bindparam("v")),
        )
        values = {"a": {"nested": [1, 2.5, None, "é"]}, "b": None}
        await gatherResults(
            [
                db.writes.add("test-json", [{"k": k, "v": v} for k, v in values.items()]),
                db.writes.add("test-literal", [{"v": [3]}]),
            ]
        )
        stored = {r["key"]: r["value"] for r in self.rows(db, t.settings)}
        assert stored == {"a": {"nested": [1, 2.5, None, "é"]}, "b": None, "fixed": [3]}

    @pytest_twisted.ensureDeferred
    async def test_a_result_is_stored_as_its_json_once_and_counted_by_that(self, db):
        await db.jobs.create_job(
            dict(id="j", action="ping", args={}, created_at=NOW, expires_at=NOW + 60),
            ["a-1", "a-2"],
            NOW,
        )
        await gatherResults(
            [
                db.jobs.store_result("j", "a-1", "succeeded", {"x": "é", "n": 1.5}, None, 1.0, 2.0),
                db.jobs.store_result("j", "a-2", "failed", None, "no route", None, 2.0),
            ]
        )
        rows = {r["agent_id"]: r for r in self.rows(db, t.job_targets)}
        assert rows["a-1"]["result"] == {"x": "é", "n": 1.5}
        assert rows["a-1"]["result_bytes"] == len('{"x":"\\u00e9","n":1.5}')
        assert rows["a-1"]["started_at"] == 1.0 and rows["a-1"]["finished_at"] == 2.0
        assert rows["a-2"]["result"] is None and rows["a-2"]["error"] == "no route"
        assert rows["a-2"]["result_bytes"] == len("no route")
