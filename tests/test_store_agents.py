"""AgentStore (db.agents) on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.storedb import StoreTest

NOW = 1_700_000_000.0


class TestAgentStore(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_an_added_agent_is_read_back(self, db):
        await db.agents.add_agent("a-1", "web-1", "ab" * 32, NOW)
        await db.agents.add_agent("a-2", "web-2", "cd" * 32, NOW + 1, approved=False)
        assert await db.agents.get_agent("a-1") == {
            "id": "a-1",
            "hostname": "web-1",
            "platform": "",
            "fingerprint": "ab" * 32,
            "enrolled_at": NOW,
            "last_seen": None,
            "capabilities": [],
            "revoked": False,
            "approved": True,
            "display_name": None,
            "tags": None,
            "deleted": False,
        }
        assert (await db.agents.get_agent("a-2"))["approved"] is False
        assert await db.agents.get_agent("a-3") is None

    @pytest_twisted.ensureDeferred
    async def test_listed_in_enrollment_order(self, db):
        for i, agent in enumerate(["c", "a", "b"]):
            await db.agents.add_agent(agent, agent, "00" * 32, NOW + i)
        assert [r["id"] for r in await db.agents.list_agents()] == ["c", "a", "b"]

    @pytest_twisted.ensureDeferred
    async def test_approve_and_revoke(self, db):
        await db.agents.add_agent("a-1", "h", "00" * 32, NOW, approved=False)
        await db.agents.add_agent("a-2", "h", "00" * 32, NOW)
        await db.agents.approve_agent("a-1")
        assert (await db.agents.get_agent("a-1"))["approved"] is True
        await db.agents.revoke_agent("a-2")
        assert (await db.agents.get_agent("a-2"))["revoked"] is True
        assert await db.agents.agent_ids() == ["a-1"]
        assert sorted(await db.agents.agent_ids(include_revoked=True)) == ["a-1", "a-2"]

    @pytest_twisted.ensureDeferred
    async def test_name_tags_and_delete_keep_the_row(self, db):
        await db.agents.add_agent("a-1", "web-1", "00" * 32, NOW)
        await db.agents.set_agent_label("a-1", "front door", {"env": "prod", "rack": "r1"})
        row = await db.agents.get_agent("a-1")
        assert (row["display_name"], row["tags"]) == ("front door", {"env": "prod", "rack": "r1"})
        await db.agents.set_agent_label("a-1", None, {})
        row = await db.agents.get_agent("a-1")
        assert (row["display_name"], row["tags"]) == (None, {})
        await db.agents.delete_agent("a-1")
        row = await db.agents.get_agent("a-1")
        assert (row["revoked"], row["deleted"], row["hostname"]) == (True, True, "web-1")
        assert await db.agents.agent_ids() == []
        assert await db.agents.agent_ids(include_revoked=True) == ["a-1"]

    @pytest_twisted.ensureDeferred
    async def test_seen_alone_or_with_the_hello(self, db):
        await db.agents.add_agent("a-1", "old", "00" * 32, NOW)
        await db.agents.add_agent("a-2", "h", "00" * 32, NOW)
        await db.agents.agent_seen("a-1", NOW + 5)
        row = await db.agents.get_agent("a-1")
        assert (row["last_seen"], row["hostname"]) == (NOW + 5, "old")
        await db.agents.agent_seen(
            "a-1", NOW + 6, hostname="new", platform="linux", capabilities=["ping"]
        )
        row = await db.agents.get_agent("a-1")
        assert (row["last_seen"], row["hostname"], row["platform"], row["capabilities"]) == (
            NOW + 6,
            "new",
            "linux",
            ["ping"],
        )
        await db.agents.agent_seen("a-2", NOW + 7, platform="windows")
        row = await db.agents.get_agent("a-2")
        assert (row["hostname"], row["platform"], row["capabilities"]) == ("h", "windows", [])

    @pytest_twisted.ensureDeferred
    async def test_many_seen_in_one_write(self, db):
        for agent in ("a-1", "a-2", "a-3"):
            await db.agents.add_agent(agent, "h", "00" * 32, NOW)
        flushes = db.writes.flushes
        await db.agents.agents_seen(["a-1", "a-3"], NOW + 9)
        assert db.writes.flushes == flushes + 1
        seen = {r["id"]: r["last_seen"] for r in await db.agents.list_agents()}
        assert seen == {"a-1": NOW + 9, "a-2": None, "a-3": NOW + 9}

    @pytest_twisted.ensureDeferred
    async def test_agent_config_row_made_when_missing_then_updated(self, db):
        assert await db.agents.load_agent_config() == []
        await db.agents.set_agent_config("a-1", enrollment_profile="edge")
        assert await db.agents.load_agent_config() == [
            {
                "agent_id": "a-1",
                "enrollment_profile": "edge",
                "profile": None,
                "profile_version": None,
                "policies": {},
                "reported_at": None,
            }
        ]
        policies = {"p": {"version": 2, "state": "applied"}}
        await db.agents.set_agent_config(
            "a-1", profile="edge", profile_version=3, policies=policies, reported_at=NOW
        )
        (row,) = await db.agents.load_agent_config()
        assert row == {
            "agent_id": "a-1",
            "enrollment_profile": "edge",
            "profile": "edge",
            "profile_version": 3,
            "policies": policies,
            "reported_at": NOW,
        }

    @pytest_twisted.ensureDeferred
    async def test_agents_in_pages_by_id_with_states(self, db):
        for i, agent in enumerate(["a-5", "a-1", "a-4", "a-2", "a-3", "a-6"]):
            await db.agents.add_agent(agent, agent, "00" * 32, NOW + i, approved=agent != "a-4")
        await db.agents.revoke_agent("a-2")
        await db.agents.delete_agent("a-6")
        pages, after = [], None
        while True:
            rows, after = await db.agents.agents_page(after, 2)
            pages.append([r["id"] for r in rows])
            if after is None:
                break
            assert after == rows[-1]["id"]
        assert pages == [["a-1", "a-2"], ["a-3", "a-4"], ["a-5"]]  # a-6 deleted
        rows, after = await db.agents.agents_page(None, 10, include_deleted=True)
        assert [r["id"] for r in rows] == ["a-1", "a-2", "a-3", "a-4", "a-5", "a-6"]
        assert after is None
        for state, ids in [
            ("ok", ["a-1", "a-3", "a-5"]),
            ("revoked", ["a-2"]),
            ("awaiting approval", ["a-4"]),
        ]:
            rows, _ = await db.agents.agents_page(None, 10, include_deleted=True, state=state)
            assert [r["id"] for r in rows] == ids, state
        rows, after = await db.agents.agents_page("a-1", 1, state="ok")
        assert [r["id"] for r in rows] == ["a-3"] and after == "a-3"
        with pytest.raises(ValueError):
            db.agents.agents_page(None, 1, state="cloned")
