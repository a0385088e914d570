"""ConfigStore (db.config) on SQLite and PostgreSQL: policies and connection profiles with
their assignments."""

from __future__ import annotations

import pytest_twisted

from tcm.store import schema as t
from tests.storedb import StoreTest

NOW = 1_700_000_000.0


def policy(name: str, version: int = 1) -> dict:
    return dict(
        name=name,
        type="inventory",
        document={"classes": ["os"], "every": 3600},
        version=version,
        created_at=NOW,
        updated_at=NOW + version,
    )


def profile(name: str, version: int = 1) -> dict:
    return dict(
        name=name,
        settings={"gateways": ["wss://g.example"]},
        version=version,
        created_at=NOW,
        updated_at=NOW + version,
    )


class TestPolicies(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_saved_with_its_targets_and_replaced_whole(self, db):
        assert await db.config.load_policies() == []
        await db.config.save_policy(policy("inv"), ["web", "db"])
        await db.config.save_policy(policy("bare"), [])
        loaded = {p["name"]: p for p in await db.config.load_policies()}
        assert loaded["inv"] == {**policy("inv"), "targets": ["db", "web"]}
        assert loaded["bare"] == {**policy("bare"), "targets": []}
        await db.config.save_policy(policy("inv", 2), ["all"])
        loaded = {p["name"]: p for p in await db.config.load_policies()}
        assert loaded["inv"] == {**policy("inv", 2), "targets": ["all"]}
        assert len(self.rows(db, t.policies)) == 2

    @pytest_twisted.ensureDeferred
    async def test_deleted_with_its_assignments(self, db):
        await db.config.save_policy(policy("inv"), ["web"])
        await db.config.save_policy(policy("other"), ["web"])
        await db.config.delete_policy("inv")
        await db.config.delete_policy("never-was")
        assert [p["name"] for p in await db.config.load_policies()] == ["other"]
        assert self.rows(db, t.policy_assignments) == [{"policy": "other", "target": "web"}]


class TestProfiles(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_saved_with_prioritised_assignments_and_replaced_whole(self, db):
        assert await db.config.load_profiles() == []
        await db.config.save_profile(
            profile("edge"),
            [{"target": "web", "priority": 5}, {"target": "all", "priority": 0}],
        )
        (loaded,) = await db.config.load_profiles()
        assert loaded == {
            **profile("edge"),
            "assignments": [{"target": "all", "priority": 0}, {"target": "web", "priority": 5}],
        }
        await db.config.save_profile(profile("edge", 2), [])
        assert await db.config.load_profiles() == [{**profile("edge", 2), "assignments": []}]

    @pytest_twisted.ensureDeferred
    async def test_deleted_with_its_assignments(self, db):
        await db.config.save_profile(profile("edge"), [{"target": "web", "priority": 1}])
        await db.config.save_profile(profile("core"), [{"target": "db", "priority": 1}])
        await db.config.delete_profile("edge")
        assert [p["name"] for p in await db.config.load_profiles()] == ["core"]
        assert [r["profile"] for r in self.rows(db, t.profile_assignments)] == ["core"]
