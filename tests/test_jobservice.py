"""JobService against a real Database (SQLite): results are acknowledged only once committed,
and a result whose commit failed can be sent again and is then stored."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, reactor

from tcm.server.dispatcher import Dispatcher
from tcm.server.jobservice import JobService
from tcm.server.sessions import SessionRegistry
from tcm.store import Database


def make(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'tcm.sqlite'}", reactor=reactor)
    db.open()
    jobs = JobService(
        db.jobs,
        Dispatcher(SessionRegistry()),
        reactor,
        capabilities_of=lambda a: None,
        known_agents=lambda: ["a-1", "a-2"],
        inventory_store=db.inventory,
    )
    return db, jobs


@pytest_twisted.ensureDeferred
async def test_a_result_whose_commit_failed_is_stored_when_sent_again(tmp_path):
    db, jobs = make(tmp_path)
    try:
        job_id = await jobs.create("ping", {}, ["a-1"], 60, None)
        assert jobs.accept("a-1", job_id).value == "run"
        real = db.jobs.store_result
        calls = []

        def failing_once(*args, **kw):
            calls.append(args)
            if len(calls) == 1:
                return defer.fail(RuntimeError("disk full"))
            return real(*args, **kw)

        db.jobs.store_result = failing_once  # type: ignore[method-assign]
        try:
            await jobs.result("a-1", job_id, "succeeded", {"pong": True}, None, None, None)
        except RuntimeError:
            pass
        else:
            raise AssertionError("a failed commit must not be acknowledged")
        # the agent keeps its result and sends it again: stored now
        assert await jobs.result("a-1", job_id, "succeeded", {"pong": True}, None, None, None)
        status = await jobs.status(job_id)
        assert status["counts"]["succeeded"] == 1
        assert status["results"][0]["result"] == {"pong": True}
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_a_duplicate_during_the_commit_is_acknowledged_after_it(tmp_path):
    db, jobs = make(tmp_path)
    try:
        job_id = await jobs.create("ping", {}, ["a-1", "a-2"], 60, None)
        first = jobs.result("a-1", job_id, "succeeded", {"n": 1}, None, None, None)
        again = jobs.result("a-1", job_id, "succeeded", {"n": 1}, None, None, None)
        assert not again.called  # not before the first one is committed
        assert await first is True
        assert await again is False  # a duplicate: stored once
        status = await jobs.status(job_id)
        assert status["counts"]["succeeded"] == 1
        # a-2 has no session and no waiting poll: not connected, not merely pending
        assert status["counts"]["not_connected"] == 1 and status["counts"]["pending"] == 0
    finally:
        db.close()
