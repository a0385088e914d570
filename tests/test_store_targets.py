"""TargetStore (db.targets) on SQLite and PostgreSQL: named targets and agent groups; a
taken name is a Conflict."""

from __future__ import annotations

import pytest
import pytest_twisted

from tcm.store import Conflict
from tests.storedb import StoreTest

NOW = 1_700_000_000.0


def target(name: str, **kw) -> dict:
    row = dict(
        name=name,
        filter=None,
        agents=None,
        description="",
        created_at=NOW,
        created_by="admin",
    )
    row.update(kw)
    return row


class TestTargets(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_created_read_listed_by_name_and_deleted(self, db):
        await db.targets.create_target(target("web", filter='hostname ~ "web-*"'))
        await db.targets.create_target(target("db", agents=["a-1", "a-2"], description="dbs"))
        assert await db.targets.get_target("db") == target(
            "db", agents=["a-1", "a-2"], description="dbs"
        )
        assert await db.targets.get_target("nope") is None
        assert [r["name"] for r in await db.targets.list_targets()] == ["db", "web"]
        assert await db.targets.delete_target("web") is True
        assert await db.targets.delete_target("web") is False
        assert [r["name"] for r in await db.targets.list_targets()] == ["db"]

    @pytest_twisted.ensureDeferred
    async def test_a_taken_name_is_a_conflict(self, db):
        await db.targets.create_target(target("web", agents=["a-1"]))
        with pytest.raises(Conflict, match="target 'web' exists"):
            await db.targets.create_target(target("web", agents=["a-2"]))
        assert (await db.targets.get_target("web"))["agents"] == ["a-1"]


class TestGroups(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_created_with_members_and_read(self, db):
        await db.targets.create_group("web", "web servers", NOW, ["a-2", "a-1"])
        await db.targets.create_group("empty", "", NOW + 1, [])
        assert await db.targets.get_group("web") == {
            "name": "web",
            "description": "web servers",
            "created_at": NOW,
            "agents": ["a-1", "a-2"],
        }
        assert await db.targets.get_group("nope") is None
        assert await db.targets.list_groups() == [
            {"name": "empty", "description": "", "created_at": NOW + 1, "members": 0},
            {"name": "web", "description": "web servers", "created_at": NOW, "members": 2},
        ]

    @pytest_twisted.ensureDeferred
    async def test_a_taken_name_is_a_conflict(self, db):
        await db.targets.create_group("web", "", NOW, ["a-1"])
        with pytest.raises(Conflict, match="group 'web' exists"):
            await db.targets.create_group("web", "again", NOW, ["a-2"])
        assert (await db.targets.get_group("web"))["agents"] == ["a-1"]

    @pytest_twisted.ensureDeferred
    async def test_members_added_once_and_removed(self, db):
        await db.targets.create_group("web", "", NOW, ["a-1", "a-2"])
        assert await db.targets.change_group("web", ["a-3", "a-1", "a-3"], ["a-2", "a-9"])
        assert (await db.targets.get_group("web"))["agents"] == ["a-1", "a-3"]
        assert await db.targets.change_group("web", [], [])
        assert await db.targets.change_group("nope", ["a-1"], []) is False
        assert await db.targets.get_group("nope") is None

    @pytest_twisted.ensureDeferred
    async def test_memberships_per_agent_and_deletion(self, db):
        await db.targets.create_group("web", "", NOW, ["a-1", "a-2"])
        await db.targets.create_group("all", "", NOW, ["a-1"])
        assert await db.targets.group_memberships() == {"a-1": ["all", "web"], "a-2": ["web"]}
        assert await db.targets.delete_group("web") is True
        assert await db.targets.delete_group("web") is False
        assert await db.targets.group_memberships() == {"a-1": ["all"]}
        await db.targets.create_group("web", "", NOW, [])  # the name is free again
