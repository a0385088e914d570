"""AuditStore (db.audit) on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest_twisted

from tests.storedb import StoreTest

NOW = 1_700_000_000.0


class TestAuditStore(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_entries_are_listed_oldest_first(self, db):
        assert await db.audit.list_audit() == []
        await db.audit.audit("admin", "job.create", "j1", {"action": "ping"}, NOW)
        await db.audit.audit("ci", "target.delete", "web", {}, NOW + 1)
        entries = await db.audit.list_audit()
        assert [{k: e[k] for k in e if k != "id"} for e in entries] == [
            {
                "at": NOW,
                "actor": "admin",
                "action": "job.create",
                "object": "j1",
                "details": {"action": "ping"},
            },
            {
                "at": NOW + 1,
                "actor": "ci",
                "action": "target.delete",
                "object": "web",
                "details": {},
            },
        ]

    @pytest_twisted.ensureDeferred
    async def test_the_newest_entries_since_a_time(self, db):
        for i in range(5):
            await db.audit.audit("admin", "a", str(i), {}, NOW + i)
        assert [e["object"] for e in await db.audit.list_audit(limit=2)] == ["3", "4"]
        assert [e["object"] for e in await db.audit.list_audit(since=NOW + 2)] == ["2", "3", "4"]
        assert [e["object"] for e in await db.audit.list_audit(NOW + 1, 2)] == ["3", "4"]
        assert await db.audit.list_audit(since=NOW + 5) == []

    @pytest_twisted.ensureDeferred
    async def test_a_long_object_name_is_cut(self, db):
        await db.audit.audit("admin", "a", "x" * 300, {}, NOW)
        (entry,) = await db.audit.list_audit()
        assert entry["object"] == "x" * 255
