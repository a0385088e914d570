"""The Database: engine, thread pool and write queue under one component per area.

SQLite (the embedded default) and PostgreSQL run the same SQLAlchemy Core statements. All
statements run on the database's own thread pool (one thread for SQLite, whose writers
serialise anyway). Target state changes, output chunks and results go through a write queue
with *group commit*: everything queued while one transaction runs is written by the next one,
and each caller's Deferred fires when its rows are committed. An agent's result is
acknowledged only after that, so the agent's spool holds it until it is durable here.

The statements of each area live in their component (`db.jobs`, `db.agents`, `db.access`,
...); every method that records a time takes it as `now` (or `at`) from its caller, whose
clock is injected.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from operator import itemgetter
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.sql.base import Executable
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from tcm.store.access import AccessStore
from tcm.store.agents import AgentStore
from tcm.store.audit import AuditStore
from tcm.store.cluster import ClusterStore
from tcm.store.config import ConfigStore
from tcm.store.errors import StoreUnavailable
from tcm.store.inventory import InventoryStore
from tcm.store.jobs import JobStore
from tcm.store.settings import SettingsStore
from tcm.store.targets import TargetStore

T = TypeVar("T")

MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")


def make_engine(url: str) -> Engine:
    """An engine for a database URL (sqlite:///path or postgresql://...)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:  # WAL: readers never block the writer
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: a result is acknowledged to its agent after its commit, so the commit must
            # survive a power loss too; group commit pays the fsync once per batch.
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.close()

        return engine
    options: dict[str, Any] = {"pool_size": 8, "pool_pre_ping": True}
    if url.startswith("postgresql+psycopg2") or url.startswith("postgresql://"):
        # psycopg2 runs an executemany UPDATE row by row unless asked to batch it: the
        # write queue's batches are executemany UPDATEs
        options["executemany_mode"] = "values_plus_batch"
    return sa.create_engine(url, **options)


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision."""
    # Alembic is needed only to migrate: imported here, not by whoever imports the store.
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # nodes of a cluster starting at once: one migrates, the others wait for it
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(7413001)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _reachable(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except sa.exc.DBAPIError as e:
        why = _first_line(e.orig if e.orig is not None else e)
        unreachable = isinstance(e, sa.exc.OperationalError | sa.exc.InterfaceError)
        if unreachable and "locked" not in why:  # (SQLite's busy writer: an error of its own)
            raise StoreUnavailable(f"the database is unavailable: {why}") from e
        if e.connection_invalidated:
            raise StoreUnavailable(f"the database connection was lost: {why}") from e
        raise


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _nothing(conn: Connection) -> None:
    return None


class PreparedBatch:
    """A batched kind's statement compiled once for a dialect: its SQL in the driver's
    paramstyle and how a row (a dict by bind name) becomes the driver's parameters.

    SQLAlchemy's `execute(statement, rows)` looks its compiled form up in a cache and then,
    per row, builds the parameters dict and runs each bind's type processor: in a push that
    was most of the store thread's Python (py-spy, docs/performance.md, issue 17). Here it is
    compiled once and each row is one `itemgetter` call (positional paramstyles, SQLite's
    qmark) or the row itself (named ones, psycopg2's pyformat); the executemany is the
    dialect's (`exec_driver_sql`: psycopg2's batched pages included). Literal values of the
    statement (`.values(state="delivered")`) are merged into each row; a bind whose type
    processes its value (none of the batched kinds has one: their rows hold what the driver
    takes, JSON already as text) is processed per row as SQLAlchemy would."""

    __slots__ = ("sql", "params")

    def __init__(self, statement: Executable, dialect: Dialect):
        compiled: Any = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        if compiled.escaped_bind_names:
            raise ValueError(f"bind names the driver cannot take as they are: {compiled.string}")
        self.sql: str = compiled.string
        binds = dict(compiled.binds)  # by the name it has in the SQL
        statics = {k: b.value for k, b in binds.items() if not b.required}
        processors = {
            k: p for k, p in ((k, b.type.bind_processor(dialect)) for k, b in binds.items()) if p
        }
        order = list(compiled.positiontup) if compiled.positional else None

        def fill(row: dict[str, Any]) -> dict[str, Any]:
            full = {**statics, **row} if statics else dict(row)
            for k, process in processors.items():
                full[k] = process(full[k])
            return full

        if order is None:
            if statics or processors:
                self.params: Callable[[list[dict[str, Any]]], list[Any]] = lambda rows: [
                    fill(r) for r in rows
                ]
            else:
                self.params = lambda rows: rows
            return
        if len(order) == 1:  # itemgetter of one name gives the value, not a tuple
            one = order[0]
            get: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda r: (r[one],)  # noqa: E731
        else:
            get = itemgetter(*order)
        if statics or processors:
            self.params = lambda rows: [get(fill(r)) for r in rows]
        else:
            self.params = lambda rows: [get(r) for r in rows]

    def executemany(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        conn.exec_driver_sql(self.sql, self.params(rows))


# a queued write: its kind (None: an operation of its own), its rows or the operation, its
# weight (bytes, about), and the Deferred of its caller
_Entry = tuple[str | None, Any, int, Deferred[Any]]


class WriteQueue:
    """Group commit. Rows and operations queued while a transaction runs are written by the
    next one, in one transaction; rows of the same kind go in one executemany. Each caller's
    Deferred fires once its rows are committed (and fails if that transaction failed).

    A component registers each batched kind with its prebuilt statement; in a flush the kinds
    are written in the order they were registered (so a component that registers its state
    changes before its results has them written first), then the queued operations.

    A flush takes what was queued in the order it came, up to `max_flush_bytes` of the
    weights callers give (the bytes of the rows' text, about) and `max_flush_items` entries;
    the rest waits for the next flush. Without the bound, what piles up behind a long flush
    (10,000 inventories behind the first thousand) became one transaction of a gigabyte that
    committed nothing for minutes while the process held all of it (issue 18)."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        transaction: Callable[[Callable[[Connection], Any]], Deferred],
        max_flush_bytes: int = 32 * 1024 * 1024,
        max_flush_items: int = 5000,
    ):
        self._reactor = reactor
        self._transaction = transaction
        self.max_flush_bytes = max_flush_bytes
        self.max_flush_items = max_flush_items
        self._batched: dict[str, Executable] = {}
        self._prepared: dict[str, dict[str, PreparedBatch]] = {}  # dialect -> kind -> batch
        # (kind or None for an operation, rows or the operation, its weight, its waiter)
        self._queue: deque[_Entry] = deque()
        self._running = False
        self.flushes = 0
        self.queued_bytes = 0  # the weight of what waits for a flush

    def register(self, kind: str, statement: Executable) -> None:
        """Declare a batched kind: its rows are the parameters of one executemany."""
        if kind in self._batched:
            raise ValueError(f"batched kind {kind!r} registered twice")
        self._batched[kind] = statement

    def prepared(self, dialect: Dialect) -> dict[str, PreparedBatch]:
        """The batched kinds' statements compiled for `dialect` (once)."""
        batches = self._prepared.get(dialect.name)
        if batches is None or len(batches) != len(self._batched):
            batches = {k: PreparedBatch(s, dialect) for k, s in self._batched.items()}
            self._prepared[dialect.name] = batches
        return batches

    def submit(self, op: Callable[[Connection], T], weight: int = 0) -> Deferred[T]:
        """Queue an operation of its own (run after the batched rows of its flush); fires
        with what it returned, once committed. `weight`: the bytes it writes, about."""
        return self._enqueue(None, op, weight)

    def add(self, kind: str, rows: list[dict[str, Any]], weight: int = 0) -> Deferred[None]:
        """Queue rows of a registered batched kind (`weight`: their bytes, about)."""
        if kind not in self._batched:
            raise KeyError(f"no batched kind {kind!r}")
        return self._enqueue(kind, rows, weight)

    def flushed(self) -> Deferred[None]:
        """Fires once everything queued so far is committed (queued after it, in order)."""
        return self._enqueue(None, _nothing, 0)

    def _enqueue(self, kind: str | None, item: Any, weight: int) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.append((kind, item, weight, d))
        self.queued_bytes += weight
        if not self._running:
            self._running = True
            self._reactor.callLater(0, self._flush)
        return d

    def _take(self) -> list[_Entry]:
        """The next flush's entries: from the front, within the bounds (one at least)."""
        queue, size = self._queue, 0
        taken: list[_Entry] = []
        while queue and len(taken) < self.max_flush_items:
            weight = queue[0][2]
            if taken and size + weight > self.max_flush_bytes:
                break
            taken.append(queue.popleft())
            size += weight
        self.queued_bytes -= size
        return taken

    def _flush(self) -> None:
        taken = self._take()
        rows: dict[str, list[dict[str, Any]]] = {}
        ops: list[tuple[Callable[[Connection], Any], Deferred[Any]]] = []
        for kind, item, _weight, waiter in taken:
            if kind is None:
                ops.append((item, waiter))
            else:
                rows.setdefault(kind, []).extend(item)
        count = sum(len(r) for r in rows.values()) + len(ops)
        returned: dict[int, Any] = {}  # id(waiter) -> what its operation returned

        def write(conn: Connection) -> None:
            prepared = self.prepared(conn.dialect)
            for kind in self._batched:
                batch = rows.get(kind)
                if batch:
                    prepared[kind].executemany(conn, batch)
            for op, waiter in ops:
                returned[id(waiter)] = op(conn)

        d = self._transaction(write)

        def done(result: Any) -> None:
            self.flushes += 1
            rows.clear()
            ops.clear()
            for _kind, _item, _weight, waiter in taken:
                if isinstance(result, Exception):
                    waiter.errback(result)
                else:
                    waiter.callback(returned.get(id(waiter)))
            taken.clear()
            returned.clear()
            if self._queue:
                self._reactor.callLater(0, self._flush)
            else:
                self._running = False

        def failed(f: Failure) -> None:
            self._log.failure("store write of {n} rows and operations failed", f, n=count)
            done(f.value)

        d.addCallbacks(done, failed)

    def idle(self) -> bool:
        return not self._running and not self._queue


class Database:
    """The server's persistent state: one engine and thread pool, one component per area.

    `open()` migrates the schema and starts the threads; every component method returns a
    Deferred that fires on the reactor thread."""

    _log = Logger()

    def __init__(self, url: str, reactor: Any = None, threads: int | None = None):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.url = url
        self.engine = make_engine(url)
        if threads is None:
            threads = 1 if url.startswith("sqlite") else 4
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="tcm-store")
        self.writes = WriteQueue(reactor, self.transaction)
        self.settings = SettingsStore(self)
        self.access = AccessStore(self)
        # jobs first: its batched kinds (states, then results) are flushed before `seen`
        self.jobs = JobStore(self, self.writes)
        self.agents = AgentStore(self, self.writes)
        self.config = ConfigStore(self)
        self.targets = TargetStore(self)
        self.inventory = InventoryStore(self, self.writes)
        self.audit = AuditStore(self, self.writes)
        self.cluster = ClusterStore(self)

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Migrate the schema (blocking, at startup) and start the database's threads."""
        self._incremental_vacuum()
        upgrade(self.engine)
        self._pool.start()

    def _incremental_vacuum(self) -> None:
        """SQLite: free pages go back to the file system on `reclaim()` (auto_vacuum =
        INCREMENTAL). The mode must be set before the first table is made; a database made
        without it is converted once, with a VACUUM (blocking, at startup: it rewrites the
        file, and needs as much free disk as the file takes)."""
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            mode = c.exec_driver_sql("PRAGMA auto_vacuum").scalar()
            if mode == 2:  # INCREMENTAL already
                return
            pages = c.exec_driver_sql("PRAGMA page_count").scalar()
            c.exec_driver_sql("PRAGMA auto_vacuum=INCREMENTAL")
            if pages:
                self._log.info(
                    "converting the database to incremental vacuum, once ({mb:.0f} MB)",
                    mb=pages * (c.exec_driver_sql("PRAGMA page_size").scalar() or 4096) / 2**20,
                )
                c.exec_driver_sql("VACUUM")

    def reclaim(self) -> Deferred[int]:
        """Give the space of deleted rows back: SQLite frees its free pages (incremental
        vacuum) and fires with the bytes the file shrank by; PostgreSQL's autovacuum makes
        the space reusable by itself (docs/operating.md says how to shrink the files)."""

        def run() -> int:
            if self.engine.dialect.name != "sqlite":
                return 0
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                size = c.exec_driver_sql("PRAGMA page_size").scalar() or 4096
                free = c.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
                if free:
                    c.exec_driver_sql("PRAGMA incremental_vacuum")
                    c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                return int(free * size)

        return self.run(run)

    def size(self) -> Deferred[int]:
        """Bytes the database takes: SQLite's pages (and its write-ahead log), or what
        PostgreSQL reports for the database."""

        def run() -> int:
            with self.engine.connect() as c:
                if self.engine.dialect.name == "postgresql":
                    return int(
                        c.exec_driver_sql("SELECT pg_database_size(current_database())").scalar()
                        or 0
                    )
                pages = c.exec_driver_sql("PRAGMA page_count").scalar() or 0
                size = c.exec_driver_sql("PRAGMA page_size").scalar() or 4096
                path = self.engine.url.database or ""
                wal = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
                return int(pages * size + wal)

        return self.run(run)

    def close(self) -> None:
        self._pool.stop()
        self.engine.dispose()

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run fn(*args) on the database's thread pool. A database that cannot be reached
        (PostgreSQL down or restarting) fails it with StoreUnavailable, saying why."""
        return deferToThreadPool(self._reactor, self._pool, _reachable, fn, *args)

    def transaction(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        """Run fn(connection) in one transaction on the database's thread pool."""

        def in_tx() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        return self.run(in_tx)

    def read(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        """Run fn(connection) outside a transaction of its own (reads only)."""

        def in_conn() -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        return self.run(in_conn)
