"""InventoryStore (db.inventory) on SQLite and PostgreSQL: a class sent in full replaces the
stored one; an unchanged class keeps its data (or takes another agent's of equal digest)."""

from __future__ import annotations

import pytest_twisted

from tcm.server.inventory import Collected
from tests.storedb import StoreTest

NOW = 1_700_000_000.0


class TestInventoryStore(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_classes_sent_in_full_are_stored_and_replaced(self, db):
        await db.inventory.store_inventory(
            "a-1", Collected({"os": ({"name": "debian"}, "d1"), "cpu": ([4], "c1")}, {}, NOW), NOW
        )
        assert await db.inventory.get_inventory("a-1") == {
            "os": {
                "data": {"name": "debian"},
                "digest": "d1",
                "version": 1,
                "collected_at": NOW,
                "changed_at": NOW,
            },
            "cpu": {
                "data": [4],
                "digest": "c1",
                "version": 1,
                "collected_at": NOW,
                "changed_at": NOW,
            },
        }
        await db.inventory.store_inventory(
            "a-1", Collected({"os": ({"name": "alpine"}, "d2")}, {}, NOW + 10), NOW + 11
        )
        inv = await db.inventory.get_inventory("a-1")
        assert inv["os"] == {
            "data": {"name": "alpine"},
            "digest": "d2",
            "version": 2,
            "collected_at": NOW + 10,
            "changed_at": NOW + 11,
        }
        assert inv["cpu"]["collected_at"] == NOW
        assert await db.inventory.get_inventory("a-2") == {}

    @pytest_twisted.ensureDeferred
    async def test_an_unchanged_class_keeps_its_data_with_the_newer_time(self, db):
        await db.inventory.store_inventory("a-1", Collected({"os": ("x", "d1")}, {}, NOW), NOW)
        await db.inventory.store_inventory("a-1", Collected({}, {"os": "d1"}, NOW + 10), NOW + 11)
        assert (await db.inventory.get_inventory("a-1"))["os"] == {
            "data": "x",
            "digest": "d1",
            "version": 1,
            "collected_at": NOW + 10,
            "changed_at": NOW,
        }
        # an older collection arriving late does not move the time back
        await db.inventory.store_inventory("a-1", Collected({}, {"os": "d1"}, NOW + 5), NOW + 12)
        assert (await db.inventory.get_inventory("a-1"))["os"]["collected_at"] == NOW + 10

    @pytest_twisted.ensureDeferred
    async def test_an_unchanged_class_takes_the_data_of_another_agent_with_its_digest(self, db):
        d1, d2 = "1" * 64, "2" * 64
        await db.inventory.store_inventory("a-1", Collected({"os": ("x", d1)}, {}, NOW), NOW)
        await db.inventory.store_inventory("a-2", Collected({"os": ("y", d2)}, {}, NOW), NOW)
        missing = await db.inventory.store_inventory(
            "a-2", Collected({}, {"os": d1, "cpu": "3" * 64}, NOW + 1), NOW + 2
        )
        assert await db.inventory.get_inventory("a-2") == {
            "os": {
                "data": "x",
                "digest": d1,
                "version": 2,
                "collected_at": NOW + 1,
                "changed_at": NOW + 2,
            }
        }  # and no row for a digest held by no one: the class is asked again in full
        assert missing == ["cpu"]

    @pytest_twisted.ensureDeferred
    async def test_an_unchanged_class_named_by_a_digest_prefix(self, db):
        full = "ab" * 32
        await db.inventory.store_inventory("a-1", Collected({"os": ("x", full)}, {}, NOW), NOW)
        missing = await db.inventory.store_inventory(
            "a-1", Collected({}, {"os": full[:16]}, NOW + 5), NOW + 6
        )
        assert missing == []
        row = (await db.inventory.get_inventory("a-1"))["os"]
        assert (row["collected_at"], row["version"], row["data"]) == (NOW + 5, 1, "x")
        # a prefix of some other version: not held, nothing touched
        missing = await db.inventory.store_inventory(
            "a-1", Collected({}, {"os": "cd" * 8}, NOW + 9), NOW + 9
        )
        assert missing == ["os"]
        assert (await db.inventory.get_inventory("a-1"))["os"]["collected_at"] == NOW + 5

    @pytest_twisted.ensureDeferred
    async def test_history_keeps_the_last_versions_only(self, db):
        db.inventory.history = 2
        for i in range(5):
            await db.inventory.store_inventory(
                "a-1", Collected({"os": ({"v": i}, f"{i}" * 64)}, {}, NOW + i), NOW + i
            )
        await db.inventory.store_inventory(
            "a-2", Collected({"os": ({"v": 9}, "9" * 64)}, {}, NOW), NOW
        )
        history = await db.inventory.class_history("a-1", "os")
        assert [(h["version"], h["current"], h["digest"][0]) for h in history] == [
            (5, True, "4"),
            (4, False, "3"),
            (3, False, "2"),
        ]  # the current one and the two before it
        assert history[1]["replaced_at"] == NOW + 4
        assert history[0]["replaced_at"] is None
        assert (await db.inventory.class_version("a-1", "os", 4))["data"] == {"v": 3}
        assert (await db.inventory.class_version("a-1", "os", None))["data"] == {"v": 4}
        assert await db.inventory.class_version("a-1", "os", 2) is None  # no longer kept
        assert await db.inventory.class_version("a-1", "cpu", None) is None
        # the data of versions named by digest prefix: current or kept, else left out
        assert await db.inventory.versions_data(
            {"a-1": {"os": "3" * 16}, "a-2": {"os": "9" * 16, "cpu": "1" * 16}}
        ) == ({"a-1": {"os": {"v": 3}}, "a-2": {"os": {"v": 9}}}, set())
        assert await db.inventory.versions_data({"a-1": {"os": "1" * 16}}) == ({}, set())
        # past the budget: left out, and said so
        assert await db.inventory.versions_data(
            {"a-1": {"os": "3" * 16}, "a-2": {"os": "9" * 16}}, budget=8
        ) == ({"a-1": {"os": {"v": 3}}}, {("a-2", "os")})
        sizes = await db.inventory.sizes()
        assert sizes["inventory_rows"] == 2 and sizes["inventory_history_rows"] == 2
        assert sizes["inventory_bytes"] == len('{"v":4}') + len('{"v":9}')
        db.inventory.history = 0  # none kept: the next change drops what is there
        await db.inventory.store_inventory(
            "a-1", Collected({"os": ({"v": 5}, "5" * 64)}, {}, NOW + 9), NOW + 9
        )
        assert [h["version"] for h in await db.inventory.class_history("a-1")] == [6]

    @pytest_twisted.ensureDeferred
    async def test_data_for_filters_and_times_for_freshness(self, db):
        await db.inventory.store_inventory(
            "a-1", Collected({"os": ("x", "d1"), "cpu": (4, "c1")}, {}, NOW), NOW
        )
        await db.inventory.store_inventory("a-2", Collected({"os": ("y", "d2")}, {}, NOW + 1), NOW)
        assert await db.inventory.inventory_data(["os", "os"]) == {
            "a-1": {"os": "x"},
            "a-2": {"os": "y"},
        }
        assert await db.inventory.inventory_data(iter(["cpu", "disk"])) == {"a-1": {"cpu": 4}}
        assert await db.inventory.inventory_data([]) == {}
        assert await db.inventory.inventory_times() == {
            ("a-1", "os"): (NOW, "d1"),
            ("a-1", "cpu"): (NOW, "c1"),
            ("a-2", "os"): (NOW + 1, "d2"),
        }
