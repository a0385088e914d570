"""The backends every store component's interface tests run on: SQLite in a temporary file
and the local PostgreSQL (a fresh database per test run, a fresh schema per test, both
dropped after). Set TCM_TEST_POSTGRES to another server's URL (its maintenance database);
the PostgreSQL cases are skipped, saying why, only when that server cannot be reached."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from tcm.store import Database

POSTGRES = os.environ.get(
    "TCM_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)

_run_database: dict[str, Any] = {}  # the PostgreSQL database of this test run, made once


def _postgres_database(config: pytest.Config) -> str:
    """The URL of this run's PostgreSQL database (made on first use, dropped at the end)."""
    if "url" in _run_database:
        return _run_database["url"]
    if "refused" in _run_database:
        pytest.skip(_run_database["refused"])
    admin = sa.create_engine(
        POSTGRES, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    name = "tcm_store_test_" + uuid.uuid4().hex[:10]
    try:
        with admin.connect() as c:
            c.execute(sa.text(f"CREATE DATABASE {name}"))
    except sa.exc.OperationalError as e:
        admin.dispose()
        _run_database["refused"] = f"PostgreSQL at {POSTGRES} unreachable: {e.orig}"
        pytest.skip(_run_database["refused"])

    def drop() -> None:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    config.add_cleanup(drop)
    _run_database["url"] = admin.url.set(database=name).render_as_string(hide_password=False)
    return _run_database["url"]


class StoreTest:
    """Base of the interface tests of one store component: `db` is an opened Database, once
    on SQLite and once on PostgreSQL."""

    @pytest.fixture(params=["sqlite", "postgresql"])
    def db(self, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Database]:
        if request.param == "sqlite":
            db = Database(f"sqlite:///{tmp_path / 'tcm.sqlite'}")
            db.open()
            try:
                yield db
            finally:
                db.close()
            return
        url = _postgres_database(request.config)
        schema = "t_" + uuid.uuid4().hex[:12]
        owner = sa.create_engine(url)
        with owner.begin() as c:
            c.execute(sa.text(f"CREATE SCHEMA {schema}"))
        db = Database(f"{url}?options=-csearch_path%3D{schema}")
        try:
            db.open()
            yield db
        finally:
            db.close()
            with owner.begin() as c:
                c.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
            owner.dispose()

    @staticmethod
    def rows(db: Database, table: sa.Table) -> list[dict[str, Any]]:
        """The committed rows of a table, read on a connection of its own (blocking: what
        another server process would see)."""
        with db.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(table))]
