"""Job history: filtered pages of past jobs, a job's results as CSV, and retention.

Jobs, their targets' results and their output are kept for the retention (the `job_retention`
setting, from `--job-retention`, default 30 days) and then purged by the server, a batch at a
time, every PURGE_INTERVAL seconds. A job is purged only once it is over: created before the
cutoff, past its expiry, with no target pending, delivered or running.

Retention by size as well (issue 18): a job whose results and output take more than
`--result-bytes-per-job` loses its oldest output, then its oldest results; past
`--result-bytes-total` in all, the oldest finished jobs are purged first. Each purge is logged
and audited (`retention.purge`), then the database gives the space back (SQLite's incremental
vacuum). The figures of the last purge, with the store's size, are in `GET /status`.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import IJobHistory
from tcm.server.errors import Invalid
from tcm.server.jobs import ACTIVE, TargetState

DEFAULT_RETENTION = 30 * 86400.0  # seconds
PURGE_INTERVAL = 3600.0  # seconds between purges
MAX_PAGE = 1000
# `state` in a job listing: a target state (some target in it), or one of these
JOB_STATES = {"active": "some target not finished", "finished": "every target finished"}
CSV_COLUMNS = (
    "agent",
    "name",
    "state",
    "delivered_at",
    "started_at",
    "finished_at",
    "exit_code",
    "error",
)


def _iso(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds")


def exit_code(result: Any) -> Any:
    """The exit code a result reports (`exit_code`, or `returncode`), else ''."""
    if isinstance(result, dict):
        for key in ("exit_code", "returncode"):
            if isinstance(result.get(key), int) and not isinstance(result.get(key), bool):
                return result[key]
    return ""


def results_csv(job: dict[str, Any], names: dict[str, str]) -> str:
    """A job's targets as CSV: agent, name (host name), state, times (UTC ISO 8601), exit
    code, error; one row per target, by agent id."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in job["results"]:
        w.writerow(
            [
                r["agent"],
                names.get(r["agent"], ""),
                r["state"],
                _iso(r.get("delivered_at")),
                _iso(r.get("started_at")),
                _iso(r.get("finished_at")),
                exit_code(r.get("result")),
                r.get("error") or "",
            ]
        )
    return out.getvalue()


@attrs.frozen
class SizeLimits:
    """Retention by size: bytes of results and output kept per job and in all (0: no cap),
    and earlier inventory versions kept per agent and class."""

    per_job: int = 256 * 1024**2
    total: int = 8 * 1024**3
    inventory_history: int = 5


@implementer(IJobHistory)
class JobHistory:
    """Reads past jobs from the store's jobs area, and purges those past the retention."""

    _log = Logger()

    def __init__(
        self,
        job_store: Any,
        agent_store: Any,
        jobs: Any,  # IJobs: a job's status with its results
        retention: Callable[[], float],  # seconds, read at each purge (a run-time setting)
        clock: Any,
        interval: float = PURGE_INTERVAL,
        limits: SizeLimits | None = None,
        database: Any = None,  # size() and reclaim(): the store as a whole
        inventory_store: Any = None,  # sizes() of the inventory tables
        audit: Any = None,  # IAudit: purges are recorded
    ):
        self._store = job_store
        self._agents = agent_store
        self._jobs = jobs
        self._retention = retention
        self._clock = clock
        self.limits = limits or SizeLimits()
        self._database = database
        self._inventory = inventory_store
        self._audit = audit
        self.store_figures: dict[str, Any] = {}  # what GET /status shows of the store
        self._loop = LoopingCall(self.purge)
        self._loop.clock = clock
        self._interval = interval

    # -- listing -------------------------------------------------------------------------
    @inlineCallbacks
    def page(
        self,
        state: str | None = None,
        action: str | None = None,
        since: float | None = None,
        limit: int = 100,
        before: str | None = None,
    ):
        """{"jobs": [...], "next": cursor or None}: newest first; `next` is the `before` of
        the following page."""
        if not 1 <= limit <= MAX_PAGE:
            raise Invalid("limit", f"'limit' must be 1..{MAX_PAGE}")
        with_states = without_states = None
        active = sorted(s.value for s in ACTIVE)
        if state == "active":
            with_states = active
        elif state == "finished":
            without_states = active
        elif state is not None:
            known = [s.value for s in TargetState]
            if state not in known:
                raise Invalid("state", f"'state' must be one of {', '.join([*known, *JOB_STATES])}")
            with_states = [state]
        rows = yield self._store.list_jobs_page(
            limit + 1, action, since, before, with_states, without_states
        )
        if rows is None:
            raise Invalid("before", f"no such job: {before}")
        more = len(rows) > limit
        rows = rows[:limit]
        return {"jobs": rows, "next": rows[-1]["id"] if more else None}

    @inlineCallbacks
    def results_csv(self, job_id: str):
        """A job's results as CSV text (NotFound without the job)."""
        job = yield self._jobs.status(job_id, results=True)
        names = {r["id"]: r["hostname"] for r in (yield self._agents.list_agents())}
        return results_csv(job, names)

    # -- retention -----------------------------------------------------------------------
    @inlineCallbacks
    def purge(self):
        """Delete the jobs over and older than the retention, then what is over the size
        caps; fires with how many jobs were deleted."""
        now = self._clock.seconds()
        retention = float(self._retention())
        try:
            n = yield self._store.purge_jobs(now - retention, now, [s.value for s in ACTIVE])
        except Exception:
            self._log.failure("could not purge old jobs")
            return 0
        if n:
            self._log.info(
                "purged {n} jobs older than {days:g} days (job_retention)",
                n=n,
                days=retention / 86400,
            )
        try:
            by_size = yield self.purge_by_size()
        except Exception:
            self._log.failure("could not purge jobs by size")
            return n
        if n and not by_size["jobs"]:
            yield self._reclaim()
        yield self.measure()
        return n + by_size["jobs"]

    @inlineCallbacks
    def purge_by_size(self):
        """Trim the jobs over `result_bytes_per_job` (oldest output first, then oldest
        results), then purge the oldest finished jobs while results and output together
        exceed `result_bytes_total`. Logged and audited; fires with what was done."""
        limits = self.limits
        done = {"jobs": 0, "trimmed_jobs": 0, "bytes": 0}
        if not (limits.per_job or limits.total):
            return done
        sizes = yield self._store.sizes()
        total = sizes["results"] + sizes["output"]
        if limits.per_job:
            for job_id, (results, output) in sorted(sizes["jobs"].items()):
                over = results + output - limits.per_job
                if over > 0:
                    freed = yield self._store.trim_job(job_id, over, self._clock.seconds())
                    done["trimmed_jobs"] += 1
                    done["bytes"] += freed["bytes"]
                    total -= freed["bytes"]
                    self._log.info(
                        "job {job}: {chunks} output chunks and {results} results purged, "
                        "{bytes} bytes over --result-bytes-per-job",
                        job=job_id,
                        chunks=freed["output_chunks"],
                        results=freed["results"],
                        bytes=freed["bytes"],
                    )
        if limits.total and total > limits.total:
            purged = yield self._store.purge_oldest(total - limits.total, [s.value for s in ACTIVE])
            done["jobs"] = purged["jobs"]
            done["bytes"] += purged["bytes"]
            self._log.info(
                "purged the {n} oldest jobs ({bytes} bytes): results and output took "
                "{total} bytes, over --result-bytes-total {cap}",
                n=purged["jobs"],
                bytes=purged["bytes"],
                total=total,
                cap=limits.total,
            )
        if done["bytes"]:
            if self._audit is not None:
                yield self._audit.record(
                    "server",
                    "retention.purge",
                    "",
                    {**done, "per_job": limits.per_job, "total": limits.total},
                )
            yield self._reclaim()
        self.store_figures["last_purge"] = {"at": self._clock.seconds(), **done}
        return done

    @inlineCallbacks
    def _reclaim(self):
        if self._database is None:
            return
        freed = yield self._database.reclaim()
        if freed:
            self._log.info("the database gave {mb:.1f} MB back", mb=freed / 2**20)

    @inlineCallbacks
    def measure(self):
        """The store's size and what retention keeps, for GET /status."""
        figures: dict[str, Any] = {"measured_at": self._clock.seconds()}
        sizes = yield self._store.sizes()
        figures["results_bytes"] = sizes["results"]
        figures["output_bytes"] = sizes["output"]
        figures["jobs"] = len(sizes["jobs"])
        if self._inventory is not None:
            figures.update((yield self._inventory.sizes()))
        if self._database is not None:
            figures["database_bytes"] = yield self._database.size()
        if "last_purge" in self.store_figures:
            figures["last_purge"] = self.store_figures["last_purge"]
        self.store_figures = figures
        return figures

    def retention(self) -> dict[str, Any]:
        """What retention keeps (GET /status)."""
        return {
            "job_retention": float(self._retention()),
            "result_bytes_per_job": self.limits.per_job,
            "result_bytes_total": self.limits.total,
            "inventory_history": self.limits.inventory_history,
        }

    def start(self) -> None:
        """Purge now and every `interval` seconds."""
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
