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
                "collected_at": NOW,
                "changed_at": NOW,
            },
            "cpu": {"data": [4], "digest": "c1", "collected_at": NOW, "changed_at": NOW},
        }
        await db.inventory.store_inventory(
            "a-1", Collected({"os": ({"name": "alpine"}, "d2")}, {}, NOW + 10), NOW + 11
        )
        inv = await db.inventory.get_inventory("a-1")
        assert inv["os"] == {
            "data": {"name": "alpine"},
            "digest": "d2",
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
            "collected_at": NOW + 10,
            "changed_at": NOW,
        }
        # an older collection arriving late does not move the time back
        await db.inventory.store_inventory("a-1", Collected({}, {"os": "d1"}, NOW + 5), NOW + 12)
        assert (await db.inventory.get_inventory("a-1"))["os"]["collected_at"] == NOW + 10

    @pytest_twisted.ensureDeferred
    async def test_an_unchanged_class_takes_the_data_of_another_agent_with_its_digest(self, db):
        await db.inventory.store_inventory("a-1", Collected({"os": ("x", "d1")}, {}, NOW), NOW)
        await db.inventory.store_inventory("a-2", Collected({"os": ("y", "d2")}, {}, NOW), NOW)
        await db.inventory.store_inventory(
            "a-2", Collected({}, {"os": "d1", "cpu": "unknown"}, NOW + 1), NOW + 2
        )
        assert await db.inventory.get_inventory("a-2") == {
            "os": {"data": "x", "digest": "d1", "collected_at": NOW + 1, "changed_at": NOW + 2}
        }  # and no row for a digest held by no one: the class is asked again in full

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
