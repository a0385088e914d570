"""JobService against a real Database (SQLite): results are acknowledged only once committed,
and a result whose commit failed can be sent again and is then stored."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from tcm.server.dispatcher import Dispatcher
from tcm.server.errors import Invalid, NotFound
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


# -- what agents advertise: actions and argument schemas (issue 15.2) ---------------------------

RUN_SCHEMA = {
    "type": "object",
    "required": ["argv"],
    "properties": {"argv": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
    "additionalProperties": False,
}
ADVERTISED = {
    "a-1": {"ping": {"name": "ping"}, "command.run": {"name": "command.run", "task": True,
                                                      "schema": RUN_SCHEMA}},
    "a-2": {"ping": {"name": "ping"}},  # an agent without command.run
    "a-3": {"command.run": {"name": "command.run", "task": True}},  # an older agent: no schema
    "a-4": None,  # enrolled, never said what it has
}  # fmt: skip


class RecordingDispatcher(Dispatcher):
    """The real dispatcher, remembering which agents each push was for."""

    def __init__(self) -> None:
        super().__init__(SessionRegistry())
        self.asked: list[list[str]] = []

    def push(self, frame, agent_ids, task=False):
        agent_ids = list(agent_ids)
        self.asked.append(agent_ids)
        return super().push(frame, agent_ids, task)


def make_advertised(tmp_path, advertised=ADVERTISED):
    db = Database(f"sqlite:///{tmp_path / 'tcm.sqlite'}", reactor=reactor)
    db.open()
    dispatcher = RecordingDispatcher()
    jobs = JobService(
        db.jobs,
        dispatcher,
        reactor,
        capabilities_of=lambda a: None,
        known_agents=lambda: sorted(advertised),
        inventory_store=db.inventory,
        advertised=advertised.get,
    )
    return db, jobs, dispatcher


async def refused(d) -> Invalid:
    try:
        await d
    except Invalid as e:
        return e
    raise AssertionError("not refused")


@pytest_twisted.ensureDeferred
async def test_a_job_no_agent_can_run_is_refused_listing_the_known_actions(tmp_path):
    db, jobs, _ = make_advertised(tmp_path)
    try:
        e = await refused(jobs.create("pign", {}, "all", 60, None))
        assert e.field == "action"
        assert "no enrolled agent has action 'pign'" in e.message
        assert e.details["known"] == ["command.run", "ping"]
        assert await jobs.list_jobs() == []  # nothing stored
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_arguments_failing_an_advertised_schema_are_refused_naming_the_field(tmp_path):
    db, jobs, _ = make_advertised(tmp_path)
    try:
        e = await refused(jobs.create("command.run", {"argv": "uname"}, "all", 60, None))
        assert e.field == "args"
        assert 'argv: "uname" is not of type "array"' in e.message
        e = await refused(jobs.create("command.run", {"argv": ["a", 5]}, ["a-1"], 60, None))
        assert 'argv[1]: 5 is not of type "string"' in e.message
        e = await refused(jobs.create("command.run", {}, ["a-1"], 60, None))
        assert '"argv" is a required property' in e.message
        # an older agent's handler advertises no schema: the agent checks for itself
        assert await jobs.create("command.run", {"argv": "uname"}, ["a-3"], 60, None)
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_a_hostile_advertised_schema_is_interpreted_never_compiled_or_stalling(tmp_path):
    """Argument schemas come from agents: one crafted to inject code into a generated
    validator, or to backtrack for ever on its pattern, neither runs code nor stalls."""
    injected = {
        "type": "object",
        "properties": {"x'] or __import__('os').system('touch PWNED') or d['": {"type": "string"}},
        "required": ["x'] or __import__('os').system('touch PWNED') or d['"],
    }
    catastrophic = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}},
    }
    bad = {"type": "objectx"}  # not a schema: the agent checks for itself
    hostile = {
        "a-1": {"act.x": {"name": "act.x", "schema": injected}},
        "a-2": {"act.y": {"name": "act.y", "schema": catastrophic}},
        "a-3": {"act.z": {"name": "act.z", "schema": bad}},
    }
    db, jobs, _ = make_advertised(tmp_path, hostile)  # what these agents said in their hello
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        e = await refused(jobs.create("act.x", {}, ["a-1"], 60, None))
        assert "is a required property" in e.message
        assert not (tmp_path / "PWNED").exists()
        e = await refused(jobs.create("act.y", {"s": "a" * 5000 + "b"}, ["a-2"], 60, None))
        assert "does not match" in e.message  # answered, not backtracking for ever
        assert await jobs.create("act.z", {"anything": 1}, ["a-3"], 60, None)
    finally:
        os.chdir(cwd)
        db.close()


@pytest_twisted.ensureDeferred
async def test_targets_without_the_handler_end_unsupported_at_once_never_sent(tmp_path):
    db, jobs, dispatcher = make_advertised(tmp_path)
    try:
        job_id = await jobs.create("command.run", {"argv": ["uname"]}, "all", 60, None)
        status = await jobs.status(job_id)
        assert status["counts"]["unsupported"] == 1
        assert status["counts"]["total"] == 4
        by_agent = {r["agent"]: r for r in status["results"]}
        assert by_agent["a-2"]["state"] == "unsupported"
        assert by_agent["a-2"]["error"] == "agent has no handler for action 'command.run'"
        assert all("a-2" not in asked for asked in dispatcher.asked)  # never sent
        jobs.session_opened("a-2")
        assert all("a-2" not in asked for asked in dispatcher.asked)  # nor when it comes
        assert by_agent["a-4"]["state"] == "pending"  # not known to lack it: queued
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_actions_counts_the_agents_advertising_each(tmp_path):
    db, jobs, _ = make_advertised(tmp_path)
    try:
        actions = {a["name"]: a for a in jobs.actions()}
        assert actions["ping"]["agents"] == 2
        assert actions["command.run"]["agents"] == 2
        assert actions["command.run"]["task"] is True
        assert actions["command.run"]["schema"] == RUN_SCHEMA
    finally:
        db.close()


# -- cancel (issue 15.3) ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cancel_ends_not_started_targets_and_asks_running_ones_to_stop(tmp_path):
    db, jobs, dispatcher = make_advertised(tmp_path)
    try:
        job_id = await jobs.create("ping", {}, ["a-1", "a-2", "a-4"], 60, None)
        assert jobs.accept("a-1", job_id).value == "run"
        out = await jobs.cancel(job_id, None, by="admin")
        assert out == {"canceled": ["a-2", "a-4"], "stopping": ["a-1"]}
        status = await jobs.status(job_id)
        assert status["counts"]["canceled"] == 2 and status["counts"]["running"] == 1
        assert {r["error"] for r in status["results"] if r["state"] == "canceled"} == {
            "canceled by admin"
        }
        assert jobs.work_for("a-2") == []  # a polling agent never gets it
        assert jobs.accept("a-4", job_id).value == "unknown"  # nor runs a delivered copy
        # the running one's agent reports its handler ended
        assert await jobs.result("a-1", job_id, "canceled", None, "canceled by admin", 1, 2)
        assert (await jobs.status(job_id))["counts"]["canceled"] == 3
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_cancel_checks_the_job_and_its_agents(tmp_path):
    db, jobs, _ = make_advertised(tmp_path)
    try:
        with pytest.raises(NotFound):
            await jobs.cancel("nosuch", None)
        job_id = await jobs.create("ping", {}, ["a-1"], 60, None)
        e = await refused(jobs.cancel(job_id, ["a-2"]))
        assert "a-2" in e.message
        assert await jobs.cancel(job_id, ["a-1"]) == {"canceled": ["a-1"], "stopping": []}
        assert await jobs.cancel(job_id, None) == {"canceled": [], "stopping": []}
    finally:
        db.close()
