"""The Store: every SQL statement of the server, run off the reactor thread.

SQLite (the embedded default) and PostgreSQL run the same SQLAlchemy Core statements. All
statements run on the store's own thread pool (one thread for SQLite, whose writers serialise
anyway). Target state changes, output chunks and results go through a write queue with
*group commit*: everything queued while one transaction runs is written by the next one, and
each caller's Deferred fires when its rows are committed. An agent's result is acknowledged
only after that, so the agent's spool holds it until it is durable here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Engine
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from tcm.store import schema as t

T = TypeVar("T")

MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")

# A fixed condition (no expanding IN parameter), so it works in executemany batches too.
UNFINISHED = sa.text("job_targets.state NOT IN ('succeeded', 'failed', 'expired')")


class TokenRefused(Exception):
    """An enrollment token that is unknown, expired or used up."""


class Conflict(Exception):
    """A name already taken (a target, a group, an active API token)."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def make_engine(url: str) -> Engine:
    """An engine for a database URL (sqlite:///path or postgresql://...)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # WAL: readers never block the writer
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
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _target_update(**values: Any):
    """UPDATE of one unfinished job target per row, for executemany."""
    jt = t.job_targets
    return (
        jt.update()
        .where(jt.c.job_id == sa.bindparam("j"))
        .where(jt.c.agent_id == sa.bindparam("a"))
        .where(UNFINISHED)
        .values(**values)
    )


# Row kinds the write queue batches: one prebuilt statement each, one executemany per flush.
BATCHED: dict[str, Any] = {
    "delivered": _target_update(
        state="delivered", updated_at=sa.bindparam("at"), delivered_at=sa.bindparam("at")
    ),
    "running": _target_update(
        state="running", updated_at=sa.bindparam("at"), started_at=sa.bindparam("at")
    ),
    "expired": _target_update(
        state="expired", updated_at=sa.bindparam("at"), finished_at=sa.bindparam("at")
    ),
    "result": _target_update(
        state=sa.bindparam("state"),
        result=sa.bindparam("result", type_=sa.JSON),
        error=sa.bindparam("error"),
        finished_at=sa.bindparam("finished"),
        updated_at=sa.bindparam("stored"),
        started_at=sa.func.coalesce(
            sa.bindparam("started", type_=sa.Float), t.job_targets.c.started_at
        ),
        received_at=sa.bindparam("received", type_=sa.Float),
    ),
    "seen": t.agents.update()
    .where(t.agents.c.id == sa.bindparam("agent"))
    .values(last_seen=sa.bindparam("at")),
}
# A state change and a result for the same target in one flush: states first.
BATCH_ORDER = ["delivered", "running", "expired", "result", "seen"]


class WriteQueue:
    """Group commit. Rows and operations queued while a transaction runs are written by the
    next one, in one transaction; rows of the same kind go in one executemany. Each caller's
    Deferred fires once its rows are committed."""

    _log = Logger()

    def __init__(self, store: Store):
        self._store = store
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._ops: list[Callable[[Connection], None]] = []
        self._waiters: list[Deferred[None]] = []
        self._running = False
        self.flushes = 0

    def submit(self, op: Callable[[Connection], None]) -> Deferred[None]:
        """Queue an operation of its own (run after the batched rows)."""
        self._ops.append(op)
        return self._wait()

    def add(self, kind: str, rows: list[dict[str, Any]]) -> Deferred[None]:
        """Queue rows of a batched kind (see BATCHED)."""
        self._rows.setdefault(kind, []).extend(rows)
        return self._wait()

    def _wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        if not self._running:
            self._running = True
            self._store._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        rows, self._rows = self._rows, {}
        ops, self._ops = self._ops, []
        waiters, self._waiters = self._waiters, []
        count = sum(len(r) for r in rows.values()) + len(ops)

        def write(conn: Connection) -> None:
            for kind in BATCH_ORDER:
                batch = rows.get(kind)
                if batch:
                    conn.execute(BATCHED[kind], batch)
            for op in ops:
                op(conn)

        d = self._store.transaction(write)

        def done(result: Any) -> None:
            self.flushes += 1
            for waiter in waiters:
                if isinstance(result, Exception):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if self._waiters:
                self._store._reactor.callLater(0, self._flush)
            else:
                self._running = False

        def failed(f):
            self._log.failure("store write of {n} rows and operations failed", f, n=count)
            done(f.value)

        d.addCallbacks(done, failed)

    def idle(self) -> bool:
        return not self._running and not self._waiters


class Store:
    """The server's persistent state, with Deferred-returning methods."""

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
        self.writes = WriteQueue(self)

    # -- lifecycle ---------------------------------------------------------------------
    def open(self) -> None:
        """Migrate the schema (blocking, at startup) and start the store's threads."""
        upgrade(self.engine)
        self._pool.start()

    def close(self) -> None:
        self._pool.stop()
        self.engine.dispose()

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run fn(*args) on the store's thread pool."""
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def transaction(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        """Run fn(connection) in one transaction on the store's thread pool."""

        def in_tx() -> T:
            with self.engine.begin() as conn:
                return fn(conn)

        return self.run(in_tx)

    def read(self, fn: Callable[[Connection], T]) -> Deferred[T]:
        def in_conn() -> T:
            with self.engine.connect() as conn:
                return fn(conn)

        return self.run(in_conn)

    # -- settings ------------------------------------------------------------------------
    def get_settings(self) -> Deferred[dict[str, Any]]:
        return self.read(lambda c: {r.key: r.value for r in c.execute(sa.select(t.settings))})

    def set_setting(self, key: str, value: Any) -> Deferred[None]:
        def op(c: Connection) -> None:
            updated = c.execute(
                t.settings.update().where(t.settings.c.key == key).values(value=value)
            )
            if updated.rowcount == 0:
                c.execute(t.settings.insert().values(key=key, value=value))

        return self.transaction(op)

    # -- enrollment tokens -----------------------------------------------------------
    def create_token(
        self,
        ttl: float | None,
        uses: int | None,
        description: str = "",
        profile: str | None = None,
    ) -> Deferred[str]:
        """A new enrollment token: returns the full token `<id>.<secret>` (shown once).
        An agent enrolling with a token that names a `profile` gets that profile."""
        token_id = os.urandom(6).hex()
        secret = os.urandom(24).hex()
        now = time.time()
        row = dict(
            id=token_id,
            secret_hash=hash_secret(secret),
            created_at=now,
            expires_at=(now + ttl) if ttl else None,
            uses_left=uses,
            description=description,
            profile=profile,
        )
        return self.transaction(
            lambda c: c.execute(t.enrollment_tokens.insert().values(**row))
        ).addCallback(lambda _: f"{token_id}.{secret}")

    def list_tokens(self) -> Deferred[list[dict[str, Any]]]:
        cols = [c for c in t.enrollment_tokens.c if c.name != "secret_hash"]
        return self.read(lambda c: [dict(r._mapping) for r in c.execute(sa.select(*cols))])

    def consume_token(self, token: str, now: float) -> Deferred[str]:
        """Use an enrollment token once; returns its id. Fails with TokenRefused saying why."""
        return self.consume_token_row(token, now).addCallback(lambda row: row["id"])

    def consume_token_row(self, token: str, now: float) -> Deferred[dict[str, Any]]:
        """Use an enrollment token once; returns its row (id, profile, ...) without the
        secret. Fails with TokenRefused saying why."""

        def op(c: Connection) -> dict[str, Any]:
            token_id, _, secret = token.partition(".")
            row = c.execute(
                sa.select(t.enrollment_tokens).where(t.enrollment_tokens.c.id == token_id)
            ).first()
            if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
                raise TokenRefused("unknown enrollment token")
            if row.expires_at is not None and now >= row.expires_at:
                raise TokenRefused("enrollment token expired")
            if row.uses_left is not None and row.uses_left <= 0:
                raise TokenRefused("enrollment token used up")
            values: dict[str, Any] = {"used": row.used + 1}
            if row.uses_left is not None:
                values["uses_left"] = row.uses_left - 1
            c.execute(
                t.enrollment_tokens.update()
                .where(t.enrollment_tokens.c.id == token_id)
                .values(**values)
            )
            out = dict(row._mapping)
            out.pop("secret_hash", None)
            return out

        return self.transaction(op)

    # -- relay nodes (task servers, gateways) ---------------------------------------
    def register_node(
        self, name: str, role: str, max_clients: int | None, ttl: float, now: float
    ) -> Deferred[str]:
        """Register a node (or issue a new enrollment secret for it); returns the secret."""
        secret = os.urandom(24).hex()
        n = t.nodes

        def op(c: Connection) -> str:
            row = c.execute(sa.select(n).where(n.c.name == name)).first()
            values = dict(
                role=role,
                max_clients=max_clients,
                token_hash=hash_secret(secret),
                token_expires=now + ttl,
                revoked=False,
            )
            if row is None:
                c.execute(n.insert().values(name=name, registered_at=now, **values))
            elif row.role != role:
                raise TokenRefused(f"{name!r} is already registered as a {row.role}")
            else:
                c.execute(n.update().where(n.c.name == name).values(**values))
            return secret

        return self.transaction(op)

    def enroll_node(self, name: str, secret: str, fingerprint: str, now: float) -> Deferred[str]:
        """Use a node's one-time enrollment secret; records its certificate. Its role."""
        n = t.nodes

        def op(c: Connection) -> str:
            row = c.execute(sa.select(n).where(n.c.name == name)).first()
            if (
                row is None
                or row.token_hash is None
                or not hmac.compare_digest(row.token_hash, hash_secret(secret))
            ):
                raise TokenRefused(f"no enrollment pending for node {name!r} with this token")
            if row.token_expires is not None and now >= row.token_expires:
                raise TokenRefused(f"the enrollment token of node {name!r} expired")
            c.execute(
                n.update()
                .where(n.c.name == name)
                .values(fingerprint=fingerprint, enrolled_at=now, token_hash=None)
            )
            return str(row.role)

        return self.transaction(op)

    def node_reported(self, name: str, url: str) -> Deferred[None]:
        n = t.nodes

        def op(c: Connection) -> None:
            c.execute(n.update().where(n.c.name == name).values(url=url))

        return self.transaction(op)

    def list_nodes(self) -> Deferred[list[dict[str, Any]]]:
        cols = [c for c in t.nodes.c if c.name != "token_hash"]
        return self.read(
            lambda c: [
                dict(r._mapping) for r in c.execute(sa.select(*cols).order_by(t.nodes.c.name))
            ]
        )

    # -- agents ----------------------------------------------------------------------
    def add_agent(
        self, agent_id: str, hostname: str, fingerprint: str, now: float, approved: bool = True
    ):
        row = dict(
            id=agent_id,
            hostname=hostname,
            fingerprint=fingerprint,
            enrolled_at=now,
            capabilities=[],
            approved=approved,
        )
        return self.transaction(lambda c: c.execute(t.agents.insert().values(**row)))

    def approve_agent(self, agent_id: str) -> Deferred[None]:
        def op(c: Connection) -> None:
            c.execute(t.agents.update().where(t.agents.c.id == agent_id).values(approved=True))

        return self.transaction(op)

    def revoke_agent(self, agent_id: str) -> Deferred[None]:
        def op(c: Connection) -> None:
            c.execute(t.agents.update().where(t.agents.c.id == agent_id).values(revoked=True))

        return self.transaction(op)

    def agent_seen(
        self,
        agent_id: str,
        now: float,
        hostname: str | None = None,
        platform: str | None = None,
        capabilities: list | None = None,
    ) -> Deferred[None]:
        if hostname is None and platform is None and capabilities is None:
            return self.writes.add("seen", [{"agent": agent_id, "at": now}])
        values: dict[str, Any] = {"last_seen": now}
        if hostname is not None:
            values["hostname"] = hostname
        if platform is not None:
            values["platform"] = platform
        if capabilities is not None:
            values["capabilities"] = capabilities

        def op(c: Connection) -> None:
            c.execute(t.agents.update().where(t.agents.c.id == agent_id).values(**values))

        return self.writes.submit(op)

    def agents_seen(self, agent_ids: list[str], now: float) -> Deferred[None]:
        """Many agents seen at `now`: one batched write (a stop closing every session)."""
        return self.writes.add("seen", [{"agent": a, "at": now} for a in agent_ids])

    def get_agent(self, agent_id: str) -> Deferred[dict[str, Any] | None]:
        def q(c: Connection):
            row = c.execute(sa.select(t.agents).where(t.agents.c.id == agent_id)).first()
            return dict(row._mapping) if row else None

        return self.read(q)

    def list_agents(self) -> Deferred[list[dict[str, Any]]]:
        return self.read(
            lambda c: [
                dict(r._mapping)
                for r in c.execute(sa.select(t.agents).order_by(t.agents.c.enrolled_at))
            ]
        )

    def agent_ids(self, include_revoked: bool = False) -> Deferred[list[str]]:
        q = sa.select(t.agents.c.id)
        if not include_revoked:
            q = q.where(t.agents.c.revoked == sa.false())
        return self.read(lambda c: [r.id for r in c.execute(q)])

    # -- jobs ------------------------------------------------------------------------
    def create_job(self, job: dict[str, Any], agent_ids: list[str], now: float):
        """Insert a job and one pending target per agent, in one transaction."""

        def op(c: Connection) -> None:
            c.execute(t.jobs.insert().values(**job))
            if agent_ids:
                c.execute(
                    t.job_targets.insert(),
                    [
                        dict(job_id=job["id"], agent_id=a, state="pending", updated_at=now)
                        for a in agent_ids
                    ],
                )

        return self.transaction(op)

    def set_states(self, changes: Iterable[Any]) -> Deferred[None]:
        """Write state changes (jobs.Change) through the write queue."""
        by_state: dict[str, list[dict[str, Any]]] = {}
        for ch in changes:
            by_state.setdefault(ch.state.value, []).append(
                {"j": ch.job_id, "a": ch.agent_id, "at": ch.at}
            )
        if not by_state:
            return succeed(None)
        waits = [self.writes.add(state, rows) for state, rows in by_state.items()]
        return waits[0] if len(waits) == 1 else gatherResults(waits).addCallback(lambda _: None)

    def store_result(
        self,
        job_id: str,
        agent_id: str,
        state: str,
        result: Any,
        error: str | None,
        started: float | None,
        finished: float,
        received: float | None = None,
        stored: float | None = None,
    ) -> Deferred[None]:
        """Store a target's result, once: a target already finished keeps its first result."""
        row = {
            "j": job_id,
            "a": agent_id,
            "state": state,
            "result": result,
            "error": error,
            "started": started,
            "finished": finished,
            "received": received,
            "stored": stored if stored is not None else finished,
        }
        return self.writes.add("result", [row])

    def add_output(
        self, job_id: str, agent_id: str, seq: int, stream: str, text: str, at: float
    ) -> Deferred[None]:
        row = dict(job_id=job_id, agent_id=agent_id, seq=seq, stream=stream, text=text, at=at)
        jo = t.job_output

        def op(c: Connection) -> None:
            exists = c.execute(
                sa.select(jo.c.id)
                .where(jo.c.job_id == job_id)
                .where(jo.c.agent_id == agent_id)
                .where(jo.c.seq == seq)
            ).first()
            if exists is None:  # output is redelivered after a reconnect: keep one copy
                c.execute(jo.insert().values(**row))

        return self.writes.submit(op)

    def get_output(self, job_id: str, after_id: int = 0) -> Deferred[list[dict[str, Any]]]:
        jo = t.job_output
        return self.read(
            lambda c: [
                dict(r._mapping)
                for r in c.execute(
                    sa.select(jo)
                    .where(jo.c.job_id == job_id)
                    .where(jo.c.id > after_id)
                    .order_by(jo.c.id)
                )
            ]
        )

    def get_job_counts(self, job_id: str) -> Deferred[dict[str, Any] | None]:
        """A job with the number of its targets in each state (no per-target rows), or None."""
        jt = t.job_targets

        def q(c: Connection):
            job = c.execute(sa.select(t.jobs).where(t.jobs.c.id == job_id)).first()
            if job is None:
                return None
            out = dict(job._mapping)
            out["states"] = {
                r[0]: r[1]
                for r in c.execute(
                    sa.select(jt.c.state, sa.func.count())
                    .where(jt.c.job_id == job_id)
                    .group_by(jt.c.state)
                )
            }
            return out

        return self.read(q)

    def get_job(self, job_id: str) -> Deferred[dict[str, Any] | None]:
        """A job with all its targets, or None."""

        def q(c: Connection):
            job = c.execute(sa.select(t.jobs).where(t.jobs.c.id == job_id)).first()
            if job is None:
                return None
            targets = c.execute(
                sa.select(t.job_targets)
                .where(t.job_targets.c.job_id == job_id)
                .order_by(t.job_targets.c.agent_id)
            )
            out = dict(job._mapping)
            out["targets"] = [dict(r._mapping) for r in targets]
            return out

        return self.read(q)

    def list_jobs(self, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        jt = t.job_targets

        def q(c: Connection):
            jobs = [
                dict(r._mapping)
                for r in c.execute(
                    sa.select(t.jobs).order_by(t.jobs.c.created_at.desc()).limit(limit)
                )
            ]
            ids = [j["id"] for j in jobs]
            counts: dict[str, dict[str, int]] = {}
            if ids:
                for r in c.execute(
                    sa.select(jt.c.job_id, jt.c.state, sa.func.count())
                    .where(jt.c.job_id.in_(ids))
                    .group_by(jt.c.job_id, jt.c.state)
                ):
                    counts.setdefault(r[0], {})[r[1]] = r[2]
            for j in jobs:
                j["states"] = counts.get(j["id"], {})
            return jobs

        return self.read(q)

    def load_active(self) -> Deferred[list[tuple[dict[str, Any], dict[str, str]]]]:
        """Jobs with unfinished targets and those targets' states (to rebuild the JobBook)."""
        jt = t.job_targets

        def q(c: Connection):
            rows = c.execute(
                sa.select(jt.c.job_id, jt.c.agent_id, jt.c.state).where(
                    jt.c.state.in_(["pending", "delivered", "running"])
                )
            ).all()
            by_job: dict[str, dict[str, str]] = {}
            for r in rows:
                by_job.setdefault(r.job_id, {})[r.agent_id] = r.state
            if not by_job:
                return []
            jobs = c.execute(sa.select(t.jobs).where(t.jobs.c.id.in_(list(by_job)))).all()
            return [(dict(j._mapping), by_job[j.id]) for j in jobs]

        return self.read(q)

    # -- policies and connection profiles --------------------------------------------
    def load_policies(self) -> Deferred[list[dict[str, Any]]]:
        """Every policy with the names of its targets."""
        return self.read(
            lambda c: _with_children(
                c, t.policies, t.policy_assignments, "policy", ["target"], "targets"
            )
        )

    def save_policy(self, policy: dict[str, Any], targets: list[str]) -> Deferred[None]:
        """Insert or replace a policy and its assignments, in one transaction."""
        pa = t.policy_assignments

        def op(c: Connection) -> None:
            _upsert(c, t.policies, "name", policy)
            c.execute(pa.delete().where(pa.c.policy == policy["name"]))
            if targets:
                c.execute(pa.insert(), [{"policy": policy["name"], "target": x} for x in targets])

        return self.transaction(op)

    def delete_policy(self, name: str) -> Deferred[None]:
        def op(c: Connection) -> None:
            c.execute(t.policy_assignments.delete().where(t.policy_assignments.c.policy == name))
            c.execute(t.policies.delete().where(t.policies.c.name == name))

        return self.transaction(op)

    def load_profiles(self) -> Deferred[list[dict[str, Any]]]:
        """Every connection profile with its assignments ({target, priority})."""
        return self.read(
            lambda c: _with_children(
                c,
                t.profiles,
                t.profile_assignments,
                "profile",
                ["target", "priority"],
                "assignments",
            )
        )

    def save_profile(
        self, profile: dict[str, Any], assignments: list[dict[str, Any]]
    ) -> Deferred[None]:
        pa = t.profile_assignments

        def op(c: Connection) -> None:
            _upsert(c, t.profiles, "name", profile)
            c.execute(pa.delete().where(pa.c.profile == profile["name"]))
            if assignments:
                c.execute(
                    pa.insert(),
                    [
                        {
                            "profile": profile["name"],
                            "target": a["target"],
                            "priority": a["priority"],
                        }
                        for a in assignments
                    ],
                )

        return self.transaction(op)

    def delete_profile(self, name: str) -> Deferred[None]:
        def op(c: Connection) -> None:
            c.execute(t.profile_assignments.delete().where(t.profile_assignments.c.profile == name))
            c.execute(t.profiles.delete().where(t.profiles.c.name == name))

        return self.transaction(op)

    def load_agent_config(self) -> Deferred[list[dict[str, Any]]]:
        return self.read(lambda c: [dict(r._mapping) for r in c.execute(sa.select(t.agent_config))])

    def set_agent_config(self, agent_id: str, **values: Any) -> Deferred[None]:
        """Set columns of an agent's agent_config row (made when missing)."""

        def op(c: Connection) -> None:
            ac = t.agent_config
            updated = c.execute(ac.update().where(ac.c.agent_id == agent_id).values(**values))
            if updated.rowcount == 0:
                c.execute(ac.insert().values(agent_id=agent_id, **{"policies": {}, **values}))

        return self.writes.submit(op)

    # -- targets -----------------------------------------------------------------------
    def create_target(self, row: dict[str, Any]) -> Deferred[None]:
        """Insert a target; Conflict when the name is taken."""
        tg = t.targets

        def op(c: Connection) -> None:
            if c.execute(sa.select(tg.c.name).where(tg.c.name == row["name"])).first():
                raise Conflict(f"target {row['name']!r} exists")
            try:
                c.execute(tg.insert().values(**row))
            except sa.exc.IntegrityError:  # created meanwhile by another server process
                raise Conflict(f"target {row['name']!r} exists") from None

        return self.transaction(op)

    def get_target(self, name: str) -> Deferred[dict[str, Any] | None]:
        def q(c: Connection):
            row = c.execute(sa.select(t.targets).where(t.targets.c.name == name)).first()
            return dict(row._mapping) if row else None

        return self.read(q)

    def list_targets(self) -> Deferred[list[dict[str, Any]]]:
        return self.read(
            lambda c: [
                dict(r._mapping) for r in c.execute(sa.select(t.targets).order_by(t.targets.c.name))
            ]
        )

    def delete_target(self, name: str) -> Deferred[bool]:
        return self.transaction(
            lambda c: c.execute(t.targets.delete().where(t.targets.c.name == name)).rowcount > 0
        )

    # -- groups ------------------------------------------------------------------------
    def create_group(
        self, name: str, description: str, now: float, agents: list[str]
    ) -> Deferred[None]:
        g, gm = t.agent_groups, t.group_members

        def op(c: Connection) -> None:
            if c.execute(sa.select(g.c.name).where(g.c.name == name)).first():
                raise Conflict(f"group {name!r} exists")
            try:
                c.execute(g.insert().values(name=name, description=description, created_at=now))
            except sa.exc.IntegrityError:  # created meanwhile by another server process
                raise Conflict(f"group {name!r} exists") from None
            if agents:
                c.execute(gm.insert(), [dict(group_name=name, agent_id=a) for a in agents])

        return self.transaction(op)

    def list_groups(self) -> Deferred[list[dict[str, Any]]]:
        g, gm = t.agent_groups, t.group_members

        def q(c: Connection):
            counts: dict[str, int] = dict(
                c.execute(sa.select(gm.c.group_name, sa.func.count()).group_by(gm.c.group_name))
                .tuples()
                .all()
            )
            return [
                {**dict(r._mapping), "members": counts.get(r.name, 0)}
                for r in c.execute(sa.select(g).order_by(g.c.name))
            ]

        return self.read(q)

    def get_group(self, name: str) -> Deferred[dict[str, Any] | None]:
        g, gm = t.agent_groups, t.group_members

        def q(c: Connection):
            row = c.execute(sa.select(g).where(g.c.name == name)).first()
            if row is None:
                return None
            members = c.execute(
                sa.select(gm.c.agent_id).where(gm.c.group_name == name).order_by(gm.c.agent_id)
            )
            return {**dict(row._mapping), "agents": [r.agent_id for r in members]}

        return self.read(q)

    def delete_group(self, name: str) -> Deferred[bool]:
        g, gm = t.agent_groups, t.group_members

        def op(c: Connection) -> bool:
            c.execute(gm.delete().where(gm.c.group_name == name))
            return c.execute(g.delete().where(g.c.name == name)).rowcount > 0

        return self.transaction(op)

    def change_group(self, name: str, add: list[str], remove: list[str]) -> Deferred[bool]:
        """Add and remove members; False when there is no such group."""
        g, gm = t.agent_groups, t.group_members

        def op(c: Connection) -> bool:
            if c.execute(sa.select(g.c.name).where(g.c.name == name)).first() is None:
                return False
            if remove:
                c.execute(
                    gm.delete().where(gm.c.group_name == name).where(gm.c.agent_id.in_(remove))
                )
            if add:
                have = {
                    r.agent_id
                    for r in c.execute(
                        sa.select(gm.c.agent_id)
                        .where(gm.c.group_name == name)
                        .where(gm.c.agent_id.in_(add))
                    )
                }
                new = [a for a in dict.fromkeys(add) if a not in have]
                if new:
                    c.execute(gm.insert(), [dict(group_name=name, agent_id=a) for a in new])
            return True

        return self.transaction(op)

    def group_memberships(self) -> Deferred[dict[str, list[str]]]:
        """agent id -> the names of its groups."""
        gm = t.group_members

        def q(c: Connection):
            out: dict[str, list[str]] = {}
            for r in c.execute(sa.select(gm).order_by(gm.c.group_name)):
                out.setdefault(r.agent_id, []).append(r.group_name)
            return out

        return self.read(q)

    # -- inventory ---------------------------------------------------------------------
    def store_inventory(self, agent_id: str, collected: Any, now: float) -> Deferred[None]:
        """Write an inventory.Collected through the write queue (with the job's result).

        A class the agent sent in full replaces the stored one; a class it found unchanged
        keeps its data and gets the new collection time. An unchanged class whose digest the
        server holds for another agent only (the refresh job listed every digest held) takes
        that agent's data: equal digests, equal data."""
        inv = t.inventory

        def upsert(c: Connection, cls: str, data: Any, digest: str) -> None:
            where = (inv.c.agent_id == agent_id) & (inv.c["class"] == cls)
            row = c.execute(sa.select(inv.c.digest, inv.c.collected_at).where(where)).first()
            at = collected.collected_at
            if row is None:
                values = {"agent_id": agent_id, "class": cls, "data": data, "digest": digest}
                c.execute(inv.insert().values(**values, collected_at=at, changed_at=now))
            elif row.digest == digest:  # unchanged: newer collection time only
                c.execute(inv.update().where(where).values(collected_at=max(row.collected_at, at)))
            else:
                c.execute(
                    inv.update()
                    .where(where)
                    .values(data=data, digest=digest, collected_at=at, changed_at=now)
                )

        def op(c: Connection) -> None:
            for cls, (data, digest) in collected.changed.items():
                upsert(c, cls, data, digest)
            for cls, digest in collected.unchanged.items():
                mine = c.execute(
                    sa.select(inv.c.digest)
                    .where(inv.c.agent_id == agent_id)
                    .where(inv.c["class"] == cls)
                ).first()
                if mine is not None and mine.digest == digest:
                    upsert(c, cls, None, digest)
                    continue
                other = c.execute(
                    sa.select(inv.c.data)
                    .where(inv.c["class"] == cls)
                    .where(inv.c.digest == digest)
                    .limit(1)
                ).first()
                if other is not None:
                    upsert(c, cls, other.data, digest)
                # else: nothing to go by; the class stays stale and is asked again in full

        return self.writes.submit(op)

    def get_inventory(self, agent_id: str) -> Deferred[dict[str, dict[str, Any]]]:
        """class -> {data, digest, collected_at, changed_at} of one agent."""
        inv = t.inventory

        def q(c: Connection):
            return {
                r._mapping["class"]: {
                    "data": r.data,
                    "digest": r.digest,
                    "collected_at": r.collected_at,
                    "changed_at": r.changed_at,
                }
                for r in c.execute(sa.select(inv).where(inv.c.agent_id == agent_id))
            }

        return self.read(q)

    def inventory_data(self, classes: Iterable[str]) -> Deferred[dict[str, dict[str, Any]]]:
        """agent id -> {class: data} for the given classes (what filters read)."""
        inv = t.inventory
        wanted = sorted(set(classes))

        def q(c: Connection):
            out: dict[str, dict[str, Any]] = {}
            if not wanted:
                return out
            rows = c.execute(
                sa.select(inv.c.agent_id, inv.c["class"], inv.c.data).where(
                    inv.c["class"].in_(wanted)
                )
            )
            for r in rows:
                out.setdefault(r.agent_id, {})[r._mapping["class"]] = r.data
            return out

        return self.read(q)

    def inventory_times(self) -> Deferred[dict[tuple[str, str], tuple[float, str]]]:
        """(agent, class) -> (collected_at, digest) of every stored class."""
        inv = t.inventory

        def q(c: Connection):
            return {
                (r.agent_id, r._mapping["class"]): (r.collected_at, r.digest)
                for r in c.execute(
                    sa.select(inv.c.agent_id, inv.c["class"], inv.c.collected_at, inv.c.digest)
                )
            }

        return self.read(q)

    # -- API tokens --------------------------------------------------------------------
    def create_api_token(
        self,
        name: str,
        role: str,
        target: str | None,
        expires_at: float | None,
        created_by: str,
        now: float,
    ) -> Deferred[tuple[str, dict[str, Any]]]:
        """A new API token: (the full token `<id>.<secret>`, shown once; its row)."""
        at = t.api_tokens
        token_id = os.urandom(6).hex()
        secret = os.urandom(24).hex()
        row = dict(
            id=token_id,
            name=name,
            secret_hash=hash_secret(secret),
            role=role,
            target=target,
            created_at=now,
            created_by=created_by,
            expires_at=expires_at,
            revoked_at=None,
        )

        def op(c: Connection):
            taken = c.execute(
                sa.select(at.c.id).where(at.c.name == name).where(at.c.revoked_at.is_(None))
            ).first()
            if taken is not None:
                raise Conflict(f"an API token named {name!r} exists; revoke it first")
            c.execute(at.insert().values(**row))
            return f"{token_id}.{secret}", row

        return self.transaction(op)

    def list_api_tokens(self, include_hashes: bool = False) -> Deferred[list[dict[str, Any]]]:
        at = t.api_tokens
        cols = [c for c in at.c if include_hashes or c.name != "secret_hash"]
        return self.read(
            lambda c: [
                dict(r._mapping) for r in c.execute(sa.select(*cols).order_by(at.c.created_at))
            ]
        )

    def revoke_api_token(self, name: str, now: float) -> Deferred[list[str]]:
        """Revoke the active token(s) of that name; the ids revoked."""
        at = t.api_tokens

        def op(c: Connection) -> list[str]:
            ids = [
                r.id
                for r in c.execute(
                    sa.select(at.c.id).where(at.c.name == name).where(at.c.revoked_at.is_(None))
                )
            ]
            if ids:
                c.execute(at.update().where(at.c.id.in_(ids)).values(revoked_at=now))
            return ids

        return self.transaction(op)

    # -- audit -------------------------------------------------------------------------
    def audit(
        self, actor: str, action: str, obj: str, details: dict[str, Any], at: float
    ) -> Deferred[None]:
        row = dict(at=at, actor=actor, action=action, object=obj[:255], details=details)

        def op(c: Connection) -> None:
            c.execute(t.audit_log.insert().values(**row))

        return self.writes.submit(op)

    def list_audit(self, since: float | None = None, limit: int = 1000):
        al = t.audit_log
        q = sa.select(al).order_by(al.c.id.desc()).limit(limit)
        if since is not None:
            q = q.where(al.c.at >= since)

        def read(c: Connection):
            return [dict(r._mapping) for r in c.execute(q)][::-1]

        return self.read(read)

    def job_agents(self, job_id: str, states: Iterable[str] | None = None):
        """The agent ids of a job's targets (in the given states), or None: no such job."""
        jt = t.job_targets
        wanted = None if states is None else list(states)

        def q(c: Connection):
            if c.execute(sa.select(t.jobs.c.id).where(t.jobs.c.id == job_id)).first() is None:
                return None
            sel = sa.select(jt.c.agent_id).where(jt.c.job_id == job_id)
            if wanted is not None:
                sel = sel.where(jt.c.state.in_(wanted))
            return sorted(r.agent_id for r in c.execute(sel))

        return self.read(q)


def _upsert(c: Connection, table: sa.Table, key: str, row: dict[str, Any]) -> None:
    updated = c.execute(table.update().where(table.c[key] == row[key]).values(**row))
    if updated.rowcount == 0:
        c.execute(table.insert().values(**row))


def _with_children(
    c: Connection,
    parent: sa.Table,
    child: sa.Table,
    fk: str,
    columns: list[str],
    field: str,
) -> list[dict[str, Any]]:
    """Rows of `parent`, each with a list of its `child` rows (only `columns`) in `field`."""
    out = {r.name: {**dict(r._mapping), field: []} for r in c.execute(sa.select(parent))}
    for r in c.execute(sa.select(child).order_by(*[child.c[n] for n in columns])):
        row = out.get(r._mapping[fk])
        if row is not None:
            values = [r._mapping[n] for n in columns]
            row[field].append(
                values[0] if len(columns) == 1 else dict(zip(columns, values, strict=True))
            )
    return list(out.values())
