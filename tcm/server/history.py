"""Job history: filtered pages of past jobs, a job's results as CSV, and retention.

Jobs, their targets' results and their output are kept for the retention (the `job_retention`
setting, from `--job-retention`, default 30 days) and then purged by the server, a batch at a
time, every PURGE_INTERVAL seconds. A job is purged only once it is over: created before the
cutoff, past its expiry, with no target pending, delivered or running.
"""

from __future__ import annotations

import csv
import datetime
import io
from collections.abc import Callable
from typing import Any

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
    ):
        self._store = job_store
        self._agents = agent_store
        self._jobs = jobs
        self._retention = retention
        self._clock = clock
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
        """Delete the jobs over and older than the retention; fires with how many."""
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
        return n

    def start(self) -> None:
        """Purge now and every `interval` seconds."""
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
