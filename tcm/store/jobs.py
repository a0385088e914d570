"""Jobs, their targets' states and results, and their output.

Exactly once: a target's state changes and its result are written only while it is
unfinished (the `UNFINISHED` condition in every batched UPDATE), so a target that finished
keeps its first result, and a state change that arrives after it is a no-op.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed

from tcm.store import schema as t

if TYPE_CHECKING:
    from tcm.store.database import Database, WriteQueue

# A fixed condition (no expanding IN parameter), so it works in executemany batches too.
UNFINISHED = sa.text(
    "job_targets.state NOT IN ('succeeded', 'failed', 'expired', 'canceled', 'unsupported')"
)


# Delivered and expired are only ever reached from a target not started (nodes sharing the
# store: a node's stale view must not undo another node's `running`).
NOT_STARTED = sa.text("job_targets.state IN ('pending', 'delivered')")


def _target_update(condition: Any = UNFINISHED, **values: Any) -> sa.Update:
    """UPDATE of one unfinished job target per row, for executemany."""
    jt = t.job_targets
    return (
        jt.update()
        .where(jt.c.job_id == sa.bindparam("j"))
        .where(jt.c.agent_id == sa.bindparam("a"))
        .where(condition)
        .values(**values)
    )


# Row kinds batched by the write queue, in this order: a state change and a result for the
# same target in one flush are written states first.
BATCHED: dict[str, sa.Update] = {
    "delivered": _target_update(
        NOT_STARTED,
        state="delivered",
        updated_at=sa.bindparam("at"),
        delivered_at=sa.bindparam("at"),
    ),
    "running": _target_update(
        state="running", updated_at=sa.bindparam("at"), started_at=sa.bindparam("at")
    ),
    "expired": _target_update(
        NOT_STARTED, state="expired", updated_at=sa.bindparam("at"), finished_at=sa.bindparam("at")
    ),
    "result": _target_update(
        state=sa.bindparam("state"),
        # the result's JSON as text, serialized once (`result_json`): the size counted for
        # retention is the size of what is stored, and no bind processor runs per row
        result=sa.bindparam("result", type_=sa.Text),
        error=sa.bindparam("error"),
        finished_at=sa.bindparam("finished"),
        updated_at=sa.bindparam("stored"),
        started_at=sa.func.coalesce(
            sa.bindparam("started", type_=sa.Float), t.job_targets.c.started_at
        ),
        received_at=sa.bindparam("received", type_=sa.Float),
        result_bytes=sa.bindparam("size", type_=sa.Integer),
    ),
}


# made once: json.dumps with options builds an encoder per call
_RESULT_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def result_json(result: Any) -> str:
    """A result as the text stored in its JSON column (ASCII: non-ASCII escaped). None is
    JSON's null, as SQLAlchemy's JSON type stores it."""
    return _RESULT_ENCODER.encode(result)


def result_size(result: Any, error: str | None, text: str | None = None) -> int:
    """Bytes a result takes in the store (its JSON and its error text), about: what
    retention by size counts. `text`: the result's JSON, when serialized already."""
    size = len(error.encode("utf-8")) if error else 0
    if result is not None:
        size += len(text if text is not None else result_json(result))  # ASCII: 1 byte each
    return size


def _text_bytes(c: Connection, text: Any) -> Any:
    """The UTF-8 size of a text column, in SQL."""
    if c.dialect.name == "postgresql":
        return sa.func.octet_length(text)
    return sa.func.length(sa.cast(text, sa.LargeBinary))  # SQLite: the text as a blob


class JobStore:
    """The `jobs`, `job_targets` and `job_output` tables. State changes, results and output
    go through the write queue: their Deferreds fire once committed."""

    def __init__(self, db: Database, writes: WriteQueue):
        self._db = db
        self._writes = writes
        for kind, statement in BATCHED.items():
            writes.register(kind, statement)

    def create_job(self, job: dict[str, Any], agent_ids: list[str], now: float) -> Deferred[None]:
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

        return self._db.transaction(op)

    def set_states(self, changes: Iterable[Any]) -> Deferred[None]:
        """Write state changes (jobs.Change) through the write queue."""
        by_state: dict[str, list[dict[str, Any]]] = {}
        for ch in changes:
            by_state.setdefault(ch.state.value, []).append(
                {"j": ch.job_id, "a": ch.agent_id, "at": ch.at}
            )
        if not by_state:
            return succeed(None)
        waits = [self._writes.add(state, rows) for state, rows in by_state.items()]
        if len(waits) == 1:
            return waits[0]
        return gatherResults(waits).addCallback(lambda _: None)

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
        checked: bool = False,
    ) -> Deferred[Any]:
        """Store a target's result, once: a target already finished keeps its first result.

        `checked` (nodes sharing the store, where another node may have stored it first):
        fires with whether this one was stored, at the price of a statement of its own in
        the group commit instead of a row of its batch."""
        text = result_json(result)
        size = result_size(result, error, text)
        row: dict[str, Any] = {
            "j": job_id,
            "a": agent_id,
            "state": state,
            "result": text,
            "error": error,
            "started": started,
            "finished": finished,
            "received": received,
            "stored": stored if stored is not None else finished,
            "size": size,
        }
        if not checked:
            return self._writes.add("result", [row], weight=size)
        updated: list[int] = []

        def op(c: Connection) -> None:
            updated.append(c.execute(BATCHED["result"], row).rowcount)

        d = self._writes.submit(op, weight=size)
        return d.addCallback(lambda _: bool(updated and updated[0]))

    def add_output(
        self, job_id: str, agent_id: str, seq: int, stream: str, text: str, at: float
    ) -> Deferred[None]:
        """Append an output chunk; a chunk redelivered with the same `seq` is kept once."""
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

        return self._writes.submit(op, weight=len(text))

    def output_bytes(self, job_id: str, agent_id: str) -> Deferred[int]:
        """How many bytes (UTF-8) of output one target has stored."""
        jo = t.job_output

        def q(c: Connection) -> int:
            text = jo.c.text
            if c.dialect.name == "postgresql":
                size: Any = sa.func.octet_length(text)
            else:  # SQLite: the length of the text as a blob is its UTF-8 size
                size = sa.func.length(sa.cast(text, sa.LargeBinary))
            total = c.execute(
                sa.select(sa.func.coalesce(sa.func.sum(size), 0))
                .where(jo.c.job_id == job_id)
                .where(jo.c.agent_id == agent_id)
            ).scalar()
            return int(total or 0)

        return self._db.read(q)

    def get_output(self, job_id: str, after_id: int = 0) -> Deferred[list[dict[str, Any]]]:
        """A job's output chunks with an id above `after_id`, in the order stored."""
        jo = t.job_output
        return self._db.read(
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

        def q(c: Connection) -> dict[str, Any] | None:
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

        return self._db.read(q)

    def get_job(self, job_id: str) -> Deferred[dict[str, Any] | None]:
        """A job with all its targets, or None."""

        def q(c: Connection) -> dict[str, Any] | None:
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

        return self._db.read(q)

    def list_jobs(self, limit: int = 100) -> Deferred[list[dict[str, Any]]]:
        """The newest jobs, each with the number of its targets in each state."""
        jt = t.job_targets

        def q(c: Connection) -> list[dict[str, Any]]:
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

        return self._db.read(q)

    def load_active(self) -> Deferred[list[tuple[dict[str, Any], dict[str, str]]]]:
        """Jobs with unfinished targets and those targets' states (to rebuild the JobBook)."""
        jt = t.job_targets

        def q(c: Connection) -> list[tuple[dict[str, Any], dict[str, str]]]:
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

        return self._db.read(q)

    def load_job(self, job_id: str) -> Deferred[tuple[dict[str, Any], dict[str, str]] | None]:
        """One job and its unfinished targets' states (a node adopting a job another node
        created), or None without it."""
        jt = t.job_targets

        def q(c: Connection) -> tuple[dict[str, Any], dict[str, str]] | None:
            job = c.execute(sa.select(t.jobs).where(t.jobs.c.id == job_id)).first()
            if job is None:
                return None
            rows = c.execute(
                sa.select(jt.c.agent_id, jt.c.state)
                .where(jt.c.job_id == job_id)
                .where(jt.c.state.in_(["pending", "delivered", "running"]))
            ).all()
            return dict(job._mapping), {r.agent_id: r.state for r in rows}

        return self._db.read(q)

    def unfinished_jobs_of(self, agent_ids: list[str]) -> Deferred[set[str]]:
        """The jobs with an unfinished target for any of these agents (one query per 500)."""
        jt = t.job_targets

        def q(c: Connection) -> set[str]:
            out: set[str] = set()
            for i in range(0, len(agent_ids), 500):
                out.update(
                    r[0]
                    for r in c.execute(
                        sa.select(jt.c.job_id)
                        .where(jt.c.agent_id.in_(agent_ids[i : i + 500]))
                        .where(jt.c.state.in_(["pending", "delivered", "running"]))
                        .distinct()
                    )
                )
            return out

        return self._db.read(q)

    def claim_target(self, job_id: str, agent_id: str, now: float) -> Deferred[str]:
        """Compare-and-set of an agent's wish to start a target, for nodes sharing the
        store: `running` when it was pending or delivered and the job has not expired (set
        running now) or when it runs already (the same agent asking again); otherwise the
        target's stored state (`expired`, `succeeded`, ...), or `unknown` without it. One
        statement decides, so two nodes never both say run."""
        jt = t.job_targets

        def op(c: Connection) -> str:
            live = sa.select(t.jobs.c.id).where(t.jobs.c.id == job_id, t.jobs.c.expires_at > now)
            claimed = c.execute(
                jt.update()
                .where(jt.c.job_id == job_id)
                .where(jt.c.agent_id == agent_id)
                .where(jt.c.state.in_(["pending", "delivered"]))
                .where(sa.exists(live))
                .values(state="running", updated_at=now, started_at=now)
            ).rowcount
            if claimed:
                return "running"
            row = c.execute(
                sa.select(jt.c.state).where(jt.c.job_id == job_id, jt.c.agent_id == agent_id)
            ).first()
            if row is None:
                return "unknown"
            if row.state in ("pending", "delivered"):  # not started, and past its TTL
                c.execute(
                    jt.update()
                    .where(jt.c.job_id == job_id)
                    .where(jt.c.agent_id == agent_id)
                    .where(jt.c.state.in_(["pending", "delivered"]))
                    .values(state="expired", updated_at=now, finished_at=now)
                )
                return "expired"
            return str(row.state)

        return self._db.transaction(op)

    def job_agents(
        self, job_id: str, states: Iterable[str] | None = None
    ) -> Deferred[list[str] | None]:
        """The agent ids of a job's targets (in the given states), or None: no such job."""
        jt = t.job_targets
        wanted = None if states is None else list(states)

        def q(c: Connection) -> list[str] | None:
            if c.execute(sa.select(t.jobs.c.id).where(t.jobs.c.id == job_id)).first() is None:
                return None
            sel = sa.select(jt.c.agent_id).where(jt.c.job_id == job_id)
            if wanted is not None:
                sel = sel.where(jt.c.state.in_(wanted))
            return sorted(r.agent_id for r in c.execute(sel))

        return self._db.read(q)

    # -- history: filtered pages and retention (issue 15) ---------------------------------
    def list_jobs_page(
        self,
        limit: int,
        action: str | None = None,
        since: float | None = None,
        before: str | None = None,
        with_states: Iterable[str] | None = None,
        without_states: Iterable[str] | None = None,
    ) -> Deferred[list[dict[str, Any]] | None]:
        """Up to `limit` jobs, newest first (created_at, then id, descending), each with the
        number of its targets in each state: only those of `action`, created at or after
        `since`, older than the job `before` (the paging cursor), with some target in one of
        `with_states`, with no target in any of `without_states`. None when `before` names
        no job."""
        jt = t.job_targets
        j = t.jobs

        def q(c: Connection) -> list[dict[str, Any]] | None:
            query = sa.select(j)
            if before is not None:
                cursor = c.execute(sa.select(j.c.created_at).where(j.c.id == before)).first()
                if cursor is None:
                    return None
                at = cursor[0]
                query = query.where(
                    sa.or_(j.c.created_at < at, sa.and_(j.c.created_at == at, j.c.id < before))
                )
            if action is not None:
                query = query.where(j.c.action == action)
            if since is not None:
                query = query.where(j.c.created_at >= since)
            if with_states is not None:
                query = query.where(
                    sa.exists().where(jt.c.job_id == j.c.id, jt.c.state.in_(list(with_states)))
                )
            if without_states is not None:
                query = query.where(
                    ~sa.exists().where(jt.c.job_id == j.c.id, jt.c.state.in_(list(without_states)))
                )
            query = query.order_by(j.c.created_at.desc(), j.c.id.desc()).limit(limit)
            jobs = [dict(r._mapping) for r in c.execute(query)]
            ids = [job["id"] for job in jobs]
            counts: dict[str, dict[str, int]] = {}
            if ids:
                for r in c.execute(
                    sa.select(jt.c.job_id, jt.c.state, sa.func.count())
                    .where(jt.c.job_id.in_(ids))
                    .group_by(jt.c.job_id, jt.c.state)
                ):
                    counts.setdefault(r[0], {})[r[1]] = r[2]
            for job in jobs:
                job["states"] = counts.get(job["id"], {})
            return jobs

        return self._db.read(q)

    def purge_jobs(
        self, created_before: float, now: float, active_states: Iterable[str], batch: int = 500
    ) -> Deferred[int]:
        """Delete the jobs created before `created_before` that are over (expired by `now`
        and no target in `active_states`), with their targets and output, `batch` jobs per
        transaction; fires with how many were deleted."""
        jt, j, out = t.job_targets, t.jobs, t.job_output
        active = list(active_states)

        def op(c: Connection) -> int:
            ids = [
                r[0]
                for r in c.execute(
                    sa.select(j.c.id)
                    .where(
                        j.c.created_at < created_before,
                        j.c.expires_at <= now,
                        ~sa.exists().where(jt.c.job_id == j.c.id, jt.c.state.in_(active)),
                    )
                    .limit(batch)
                )
            ]
            if ids:
                c.execute(out.delete().where(out.c.job_id.in_(ids)))
                c.execute(jt.delete().where(jt.c.job_id.in_(ids)))
                c.execute(j.delete().where(j.c.id.in_(ids)))
            return len(ids)

        @inlineCallbacks
        def purge_all():
            total = 0
            while True:
                n = yield self._db.transaction(op)
                total += n
                if n < batch:
                    return total

        return purge_all()

    # -- retention by size (issue 18) ------------------------------------------------------
    def sizes(self) -> Deferred[dict[str, Any]]:
        """Bytes of results and of output per job: {"jobs": {job: [results, output]},
        "results": total, "output": total}."""
        jt, out = t.job_targets, t.job_output

        def q(c: Connection) -> dict[str, Any]:
            per_job: dict[str, list[int]] = {}
            for job_id, size in c.execute(
                sa.select(jt.c.job_id, sa.func.sum(jt.c.result_bytes)).group_by(jt.c.job_id)
            ):
                per_job.setdefault(job_id, [0, 0])[0] = int(size or 0)
            for job_id, size in c.execute(
                sa.select(out.c.job_id, sa.func.sum(_text_bytes(c, out.c.text))).group_by(
                    out.c.job_id
                )
            ):
                per_job.setdefault(job_id, [0, 0])[1] = int(size or 0)
            return {
                "jobs": per_job,
                "results": sum(r for r, _ in per_job.values()),
                "output": sum(o for _, o in per_job.values()),
            }

        return self._db.read(q)

    def trim_job(self, job_id: str, over: int, now: float) -> Deferred[dict[str, int]]:
        """Free at least `over` bytes of one job: its oldest output chunks first, then the
        results of its oldest finished targets (their result and error replaced by a note
        saying so). Fires with {"output_chunks", "results", "bytes"} deleted."""
        jt, out = t.job_targets, t.job_output
        note = "result purged: over the bytes kept per job (--result-bytes-per-job)"

        def op(c: Connection) -> dict[str, int]:
            freed = chunks = results = 0
            size = _text_bytes(c, out.c.text)
            doomed: list[int] = []
            for chunk_id, n in c.execute(
                sa.select(out.c.id, size).where(out.c.job_id == job_id).order_by(out.c.id)
            ):
                if freed >= over:
                    break
                doomed.append(chunk_id)
                freed += int(n or 0)
            for i in range(0, len(doomed), 500):
                c.execute(out.delete().where(out.c.id.in_(doomed[i : i + 500])))
            chunks = len(doomed)
            if freed < over:
                rows = c.execute(
                    sa.select(jt.c.agent_id, jt.c.result_bytes)
                    .where(jt.c.job_id == job_id, jt.c.result_bytes > len(note))
                    .order_by(jt.c.updated_at, jt.c.agent_id)
                )
                agents: list[str] = []
                for agent_id, n in rows:
                    if freed >= over:
                        break
                    agents.append(agent_id)
                    freed += int(n) - len(note)
                for i in range(0, len(agents), 500):
                    c.execute(
                        jt.update()
                        .where(jt.c.job_id == job_id, jt.c.agent_id.in_(agents[i : i + 500]))
                        .values(result=None, error=note, result_bytes=len(note))
                    )
                results = len(agents)
            return {"output_chunks": chunks, "results": results, "bytes": freed}

        return self._db.transaction(op)

    def purge_oldest(
        self, over: int, active_states: Iterable[str], batch: int = 100
    ) -> Deferred[dict[str, int]]:
        """Delete the oldest jobs that are over (no target in `active_states`), with their
        targets and output, until at least `over` bytes of results and output are gone.
        Fires with {"jobs", "bytes"} deleted."""
        jt, j, out = t.job_targets, t.jobs, t.job_output
        active = list(active_states)

        def op(c: Connection) -> tuple[int, int]:
            ids = [
                r[0]
                for r in c.execute(
                    sa.select(j.c.id)
                    .where(~sa.exists().where(jt.c.job_id == j.c.id, jt.c.state.in_(active)))
                    .order_by(j.c.created_at, j.c.id)
                    .limit(batch)
                )
            ]
            gone = 0
            chosen: list[str] = []
            for job_id in ids:
                results = c.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(jt.c.result_bytes), 0)).where(
                        jt.c.job_id == job_id
                    )
                ).scalar()
                output = c.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(_text_bytes(c, out.c.text)), 0)).where(
                        out.c.job_id == job_id
                    )
                ).scalar()
                chosen.append(job_id)
                gone += int(results or 0) + int(output or 0)
                if gone >= over:
                    break
            if chosen:
                c.execute(out.delete().where(out.c.job_id.in_(chosen)))
                c.execute(jt.delete().where(jt.c.job_id.in_(chosen)))
                c.execute(j.delete().where(j.c.id.in_(chosen)))
            return len(chosen), gone

        @inlineCallbacks
        def purge_all():
            jobs = freed = 0
            while freed < over:
                n, gone = yield self._db.transaction(op)
                jobs += n
                freed += gone
                if n == 0:
                    break
            return {"jobs": jobs, "bytes": freed}

        return purge_all()
