"""Job history (issue 15.7): filtered pages with a cursor, retention and its purge (on SQLite
and PostgreSQL, the clock injected), a job's results as CSV, and the audit log's filters."""

from __future__ import annotations

import csv
import io

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from tcm.server.errors import Invalid
from tcm.server.history import JobHistory, exit_code, results_csv
from tcm.server.jobs import Change, TargetState
from tests.storedb import StoreTest

NOW = 1_700_000_000.0
DAY = 86400.0


def job(job_id: str, created: float, action: str = "ping", ttl: float = 60) -> dict:
    return dict(
        id=job_id,
        action=action,
        args={},
        created_at=created,
        expires_at=created + ttl,
        timeout=None,
        created_by="admin",
    )


class TestJobHistory(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_pages_filters_and_cursor(self, db):
        for i in range(7):
            action = "ping" if i % 2 == 0 else "command.run"
            await db.jobs.create_job(job(f"j{i}", NOW + i, action), ["a-1", "a-2"], NOW + i)
        await db.jobs.store_result("j6", "a-1", "failed", None, "boom", None, NOW + 10)
        await db.jobs.store_result("j6", "a-2", "succeeded", {}, None, None, NOW + 10)
        await db.jobs.store_result("j4", "a-1", "succeeded", {}, None, None, NOW + 10)
        await db.jobs.store_result("j4", "a-2", "succeeded", {}, None, None, NOW + 10)
        history = JobHistory(db.jobs, db.agents, None, lambda: 30 * DAY, Clock())

        first = await history.page(limit=3)
        assert [j["id"] for j in first["jobs"]] == ["j6", "j5", "j4"] and first["next"] == "j4"
        assert first["jobs"][0]["states"] == {"failed": 1, "succeeded": 1}
        second = await history.page(limit=3, before=first["next"])
        assert [j["id"] for j in second["jobs"]] == ["j3", "j2", "j1"]
        last = await history.page(limit=3, before=second["next"])
        assert [j["id"] for j in last["jobs"]] == ["j0"] and last["next"] is None

        pings = await history.page(action="ping")
        assert [j["id"] for j in pings["jobs"]] == ["j6", "j4", "j2", "j0"]
        assert [j["id"] for j in (await history.page(since=NOW + 5))["jobs"]] == ["j6", "j5"]
        failed = await history.page(state="failed")
        assert [j["id"] for j in failed["jobs"]] == ["j6"]
        finished = await history.page(state="finished")
        assert [j["id"] for j in finished["jobs"]] == ["j6", "j4"]
        active = await history.page(state="active", action="ping", limit=1)
        assert [j["id"] for j in active["jobs"]] == ["j2"] and active["next"] == "j2"

        with pytest.raises(Invalid) as e:
            await history.page(before="nope")
        assert e.value.field == "before"
        with pytest.raises(Invalid) as e:
            await history.page(state="bogus")
        assert e.value.field == "state" and "finished" in e.value.message
        with pytest.raises(Invalid):
            await history.page(limit=0)

    @pytest_twisted.ensureDeferred
    async def test_the_server_purges_jobs_past_the_retention(self, db):
        clock = Clock()
        clock.advance(NOW + 40 * DAY)
        retention = {"seconds": 30 * DAY}
        # over and old: purged with targets and output
        await db.jobs.create_job(job("old", NOW), ["a-1"], NOW)
        await db.jobs.store_result("old", "a-1", "succeeded", {}, None, None, NOW + 1)
        await db.jobs.add_output("old", "a-1", 1, "stdout", "hi", NOW + 1)
        # old but a target still pending (a long TTL not yet over): kept
        await db.jobs.create_job(job("waiting", NOW, ttl=60 * DAY), ["a-1"], NOW)
        # old, expired by time, its target never finished in the store: kept until it is
        await db.jobs.create_job(job("unswept", NOW), ["a-1"], NOW)
        await db.jobs.set_states([Change("unswept", "a-1", TargetState.RUNNING, NOW + 1)])
        # recent: kept
        recent = NOW + 20 * DAY
        await db.jobs.create_job(job("recent", recent), ["a-1"], recent)
        await db.jobs.store_result("recent", "a-1", "failed", None, "x", None, recent + 1)

        history = JobHistory(db.jobs, db.agents, None, lambda: retention["seconds"], clock)
        assert await history.purge() == 1
        assert await db.jobs.get_job("old") is None
        assert await db.jobs.get_output("old") == []
        assert {j["id"] for j in (await history.page())["jobs"]} == {"waiting", "unswept", "recent"}
        assert await history.purge() == 0

        # a shorter retention (the run-time setting) takes effect at the next purge, which
        # the server runs every interval on its clock
        retention["seconds"] = 10 * DAY
        history.start()
        try:
            from tests.inproc import wait_for

            await wait_for(lambda: _gone(db, "recent"), what="the purge")
        finally:
            history.stop()
        await db.jobs.store_result("unswept", "a-1", "expired", None, None, None, NOW + 2)
        clock.advance(3600)  # stopped: no purge runs
        assert (await db.jobs.get_job("unswept")) is not None
        assert await history.purge() == 1


def _gone(db, job_id: str) -> bool:
    import sqlalchemy as sa

    from tcm.store import schema as t

    with db.engine.connect() as c:
        return c.execute(sa.select(t.jobs.c.id).where(t.jobs.c.id == job_id)).first() is None


def test_results_csv_columns_and_rows():
    status = {
        "results": [
            {
                "agent": "a-1",
                "state": "succeeded",
                "result": {"exit_code": 0, "stdout": "x"},
                "error": None,
                "delivered_at": NOW,
                "started_at": NOW + 1,
                "finished_at": NOW + 2,
            },
            {
                "agent": "a-2",
                "state": "failed",
                "result": None,
                "error": 'no handler, "quoted"',
                "delivered_at": None,
                "started_at": None,
                "finished_at": NOW + 3,
            },
        ]
    }
    rows = list(csv.reader(io.StringIO(results_csv(status, {"a-1": "web-01"}))))
    assert rows[0] == [
        "agent", "name", "state", "delivered_at", "started_at", "finished_at", "exit_code",
        "error",
    ]  # fmt: skip
    assert rows[1] == [
        "a-1", "web-01", "succeeded", "2023-11-14T22:13:20+00:00", "2023-11-14T22:13:21+00:00",
        "2023-11-14T22:13:22+00:00", "0", "",
    ]  # fmt: skip
    assert rows[2][:3] == ["a-2", "", "failed"] and rows[2][6:] == ["", 'no handler, "quoted"']
    assert exit_code({"returncode": 3}) == 3 and exit_code({"exit_code": True}) == ""


class TestAuditFilters(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_by_who_action_and_prefix(self, db):
        from tcm.server.audit import REFUSED, AuditLog

        clock = Clock()
        clock.advance(NOW)
        log = AuditLog(db.audit, clock)
        await log.record("admin", "job.create", "j1")
        await log.record("ops", "job.create", "j2")
        await log.record("ops", "target.create", "t")
        await log.refused("ops", "DELETE", "/api/v1/targets/t", 403, "role operator may not")
        await log.refused(None, "GET", "/api/v1/jobs", 401, "unknown token")
        by_ops = await log.entries(None, 100, who="ops")
        assert [e["action"] for e in by_ops] == ["job.create", "target.create", REFUSED]
        jobs = await log.entries(None, 100, action="job.create")
        assert [e["actor"] for e in jobs] == ["admin", "ops"]
        assert len(await log.entries(None, 100, action="job.")) == 2
        assert len(await log.entries(None, 100, action="job")) == 0  # a name, not a prefix
        refused = await log.entries(None, 100, action=REFUSED)
        assert [(e["actor"], e["object"], e["details"]["status"]) for e in refused] == [
            ("ops", "DELETE /api/v1/targets/t", 403),
            ("-", "GET /api/v1/jobs", 401),
        ]
        assert await log.entries(None, 100, who="ops", action="target.create") == [by_ops[1]]
        assert len(await log.entries(NOW + 1, 100)) == 0


class TestRefusalFlood(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_refusals_past_the_limit_are_counted_in_one_entry(self, db):
        from tcm.server.audit import REFUSED, AuditLog

        clock = Clock()
        clock.advance(NOW)
        log = AuditLog(db.audit, clock, refusals_per_minute=5)
        for i in range(1000):  # a flood of bad tokens within one minute
            await log.refused(None, "GET", "/api/v1/jobs", 401 if i % 2 else 403, "no")
        written = await log.entries(None, 10000, action=REFUSED)
        assert len(written) == 5  # one by one up to the limit, the rest held
        clock.advance(60)  # the minute ends: one entry counts the rest, by status
        await log.flush_refusals()  # nothing held any more: nothing written twice
        for _ in range(200):  # the timer's write, committed by the store's thread
            written = await log.entries(None, 10000, action=REFUSED)
            if len(written) > 5:
                break
            await deferLater(reactor, 0.01, lambda: None)
        assert len(written) == 6
        summary = written[-1]
        assert summary["object"] == "*" and summary["actor"] == "-"
        assert summary["details"]["suppressed"] == {"401": 498, "403": 497}
        assert summary["details"]["since"] == NOW
        await log.refused("ops", "DELETE", "/api/v1/targets/t", 403, "role")  # a new minute
        assert len(await log.entries(None, 10000, action=REFUSED)) == 7
        assert not clock.getDelayedCalls()


@pytest.mark.parametrize(
    "text, seconds", [("30d", 30 * DAY), ("12h", 43200.0), ("86400", DAY), ("90m", 5400.0)]
)
def test_job_retention_option(text, seconds):
    from tcm.server.tap import Options, config_from

    options = Options()
    options.parseOptions(["--state-dir", "/tmp/x", "--job-retention", text])
    assert config_from(options).job_retention == seconds


@pytest.mark.parametrize("text", ["soon", "10s", "20y", "-1d"])
def test_a_bad_job_retention_is_a_usage_error(text):
    from twisted.python import usage

    from tcm.server.tap import Options

    with pytest.raises(usage.UsageError, match="--job-retention"):
        Options().parseOptions(["--state-dir", "/tmp/x", "--job-retention", text])


def test_the_default_retention_is_30_days():
    from tcm.server.config import ServerConfig
    from tcm.server.tap import Options, config_from

    options = Options()
    options.parseOptions(["--state-dir", "/tmp/x"])
    assert config_from(options).job_retention == 30 * DAY == ServerConfig("/tmp/x").job_retention
