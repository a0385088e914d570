"""The Alembic revisions build exactly the schema that tcm/store/schema.py declares."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tcm.store import make_engine, upgrade
from tcm.store.schema import metadata


def test_migrations_match_the_schema(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'tcm.sqlite'}")
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_upgrade_is_idempotent(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'tcm.sqlite'}")
    upgrade(engine)
    upgrade(engine)  # a restart runs it again: nothing to do, nothing breaks
    with engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from tcm.store.database import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    heads = ScriptDirectory.from_config(cfg).get_heads()
    assert len(heads) == 1  # one line of revisions
    assert version == heads[0]
