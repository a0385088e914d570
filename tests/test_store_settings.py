"""SettingsStore (db.settings) on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest_twisted

from tcm.store import schema as t
from tests.storedb import StoreTest


class TestSettingsStore(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_none_stored_at_first(self, db):
        assert await db.settings.get_settings() == {}

    @pytest_twisted.ensureDeferred
    async def test_a_setting_is_stored_and_replaced(self, db):
        await db.settings.set_setting("require_approval", True)
        await db.settings.set_setting("job_ttl", {"seconds": 60, "why": ["a", 1]})
        assert await db.settings.get_settings() == {
            "require_approval": True,
            "job_ttl": {"seconds": 60, "why": ["a", 1]},
        }
        await db.settings.set_setting("require_approval", False)
        assert (await db.settings.get_settings())["require_approval"] is False
        assert len(self.rows(db, t.settings)) == 2
