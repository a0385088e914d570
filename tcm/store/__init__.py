"""The server's store: SQLAlchemy Core tables, Alembic migrations, and one `Database` with a
component per area (`db.jobs`, `db.agents`, `db.access`, ...) on one thread pool."""

from tcm.store.access import hash_secret
from tcm.store.database import Database, WriteQueue, make_engine, upgrade
from tcm.store.errors import Conflict, TokenRefused

__all__ = [
    "Conflict",
    "Database",
    "TokenRefused",
    "WriteQueue",
    "hash_secret",
    "make_engine",
    "upgrade",
]
