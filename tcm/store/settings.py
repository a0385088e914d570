"""Runtime settings an admin changed (`tcm settings set`): key -> JSON value."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database


class SettingsStore:
    """The `settings` table."""

    def __init__(self, db: Database):
        self._db = db

    def get_settings(self) -> Deferred[dict[str, Any]]:
        """Every stored setting."""
        return self._db.read(lambda c: {r.key: r.value for r in c.execute(sa.select(t.settings))})

    def set_setting(self, key: str, value: Any) -> Deferred[None]:
        """Store one setting (replacing its value)."""

        def op(c: Connection) -> None:
            updated = c.execute(
                t.settings.update().where(t.settings.c.key == key).values(value=value)
            )
            if updated.rowcount == 0:
                c.execute(t.settings.insert().values(key=key, value=value))

        return self._db.transaction(op)
