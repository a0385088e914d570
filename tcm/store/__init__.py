"""The server's store: SQLAlchemy Core tables, Alembic migrations, and one `Database` with a
component per area (`db.jobs`, `db.agents`, `db.access`, ...) on one thread pool."""

from tcm.store.access import AccessStore, hash_secret
from tcm.store.agents import AgentStore
from tcm.store.audit import AuditStore
from tcm.store.config import ConfigStore
from tcm.store.database import Database, WriteQueue, make_engine, upgrade
from tcm.store.errors import Conflict, StoreUnavailable, TokenRefused
from tcm.store.inventory import InventoryStore
from tcm.store.jobs import JobStore
from tcm.store.settings import SettingsStore
from tcm.store.targets import TargetStore

__all__ = [
    "AccessStore",
    "AgentStore",
    "AuditStore",
    "ConfigStore",
    "Conflict",
    "Database",
    "InventoryStore",
    "JobStore",
    "SettingsStore",
    "StoreUnavailable",
    "TargetStore",
    "TokenRefused",
    "WriteQueue",
    "hash_secret",
    "make_engine",
    "upgrade",
]
