"""JobStore (db.jobs) on SQLite and PostgreSQL: jobs and their targets, state changes and
results written once (the UNFINISHED rule), output kept once per sequence number."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.defer import gatherResults

from tcm.server.jobs import Change, TargetState
from tests.storedb import StoreTest

NOW = 1_700_000_000.0


def job(job_id: str, created: float = NOW) -> dict:
    return dict(
        id=job_id,
        action="ping",
        args={"n": 1},
        created_at=created,
        expires_at=created + 60,
        timeout=None,
        created_by="admin",
    )


async def target(db, job_id: str, agent_id: str) -> dict:
    (row,) = [r for r in (await db.jobs.get_job(job_id))["targets"] if r["agent_id"] == agent_id]
    return row


class TestJobs(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_a_job_is_created_with_one_pending_target_per_agent(self, db):
        await db.jobs.create_job(job("j1"), ["a-2", "a-1"], NOW)
        got = await db.jobs.get_job("j1")
        assert {k: got[k] for k in job("j1")} == job("j1")
        assert [(r["agent_id"], r["state"], r["updated_at"]) for r in got["targets"]] == [
            ("a-1", "pending", NOW),
            ("a-2", "pending", NOW),
        ]
        assert got["targets"][0]["result"] is None
        assert await db.jobs.get_job("nope") is None

    @pytest_twisted.ensureDeferred
    async def test_a_job_without_targets(self, db):
        await db.jobs.create_job(job("j0"), [], NOW)
        assert (await db.jobs.get_job("j0"))["targets"] == []
        assert (await db.jobs.get_job_counts("j0"))["states"] == {}
        assert await db.jobs.job_agents("j0") == []

    @pytest_twisted.ensureDeferred
    async def test_counts_list_and_agents_by_state(self, db):
        await db.jobs.create_job(job("old", NOW), ["a-1"], NOW)
        await db.jobs.create_job(job("new", NOW + 1), ["a-1", "a-2", "a-3"], NOW + 1)
        await db.jobs.set_states(
            [
                Change("new", "a-1", TargetState.DELIVERED, NOW + 2),
                Change("new", "a-2", TargetState.RUNNING, NOW + 2),
            ]
        )
        counts = await db.jobs.get_job_counts("new")
        assert "targets" not in counts
        assert counts["states"] == {"delivered": 1, "running": 1, "pending": 1}
        assert await db.jobs.get_job_counts("nope") is None
        listed = await db.jobs.list_jobs()
        assert [(j["id"], j["states"]) for j in listed] == [
            ("new", {"delivered": 1, "running": 1, "pending": 1}),
            ("old", {"pending": 1}),
        ]
        assert [j["id"] for j in await db.jobs.list_jobs(limit=1)] == ["new"]
        assert await db.jobs.job_agents("new") == ["a-1", "a-2", "a-3"]
        assert await db.jobs.job_agents("new", ["pending", "running"]) == ["a-2", "a-3"]
        assert await db.jobs.job_agents("new", []) == []
        assert await db.jobs.job_agents("nope") is None

    @pytest_twisted.ensureDeferred
    async def test_state_changes_record_their_times(self, db):
        await db.jobs.create_job(job("j"), ["a-1", "a-2"], NOW)
        await db.jobs.set_states([Change("j", "a-1", TargetState.DELIVERED, NOW + 1)])
        await db.jobs.set_states(
            [
                Change("j", "a-1", TargetState.RUNNING, NOW + 2),
                Change("j", "a-2", TargetState.EXPIRED, NOW + 3),
            ]
        )
        a1, a2 = await target(db, "j", "a-1"), await target(db, "j", "a-2")
        assert (a1["state"], a1["delivered_at"], a1["started_at"], a1["updated_at"]) == (
            "running",
            NOW + 1,
            NOW + 2,
            NOW + 2,
        )
        assert (a2["state"], a2["finished_at"], a2["updated_at"]) == ("expired", NOW + 3, NOW + 3)
        await db.jobs.set_states([])  # nothing to write: fires at once

    @pytest_twisted.ensureDeferred
    async def test_a_result_is_stored_with_its_times(self, db):
        await db.jobs.create_job(job("j"), ["a-1", "a-2"], NOW)
        await db.jobs.set_states([Change("j", "a-2", TargetState.RUNNING, NOW + 1)])
        await db.jobs.store_result(
            "j", "a-1", "succeeded", {"pong": True}, None, NOW + 2, NOW + 3, NOW + 4, NOW + 5
        )
        await db.jobs.store_result("j", "a-2", "failed", None, "boom", None, NOW + 6)
        a1, a2 = await target(db, "j", "a-1"), await target(db, "j", "a-2")
        assert (a1["state"], a1["result"], a1["error"]) == ("succeeded", {"pong": True}, None)
        assert (a1["started_at"], a1["finished_at"], a1["received_at"], a1["updated_at"]) == (
            NOW + 2,
            NOW + 3,
            NOW + 4,
            NOW + 5,
        )
        # no start time given: the one recorded by the running state stays; stored = finished
        assert (a2["state"], a2["result"], a2["error"]) == ("failed", None, "boom")
        assert (a2["started_at"], a2["finished_at"], a2["received_at"], a2["updated_at"]) == (
            NOW + 1,
            NOW + 6,
            None,
            NOW + 6,
        )

    @pytest_twisted.ensureDeferred
    async def test_a_finished_target_keeps_its_first_result(self, db):
        await db.jobs.create_job(job("j"), ["a-1", "a-2"], NOW)
        await db.jobs.store_result("j", "a-1", "succeeded", {"n": 1}, None, None, NOW + 1)
        await db.jobs.store_result("j", "a-1", "failed", {"n": 2}, "late", None, NOW + 2)
        await db.jobs.set_states([Change("j", "a-1", TargetState.EXPIRED, NOW + 3)])
        await db.jobs.set_states([Change("j", "a-2", TargetState.EXPIRED, NOW + 3)])
        await db.jobs.store_result("j", "a-2", "succeeded", {"n": 3}, None, None, NOW + 4)
        a1, a2 = await target(db, "j", "a-1"), await target(db, "j", "a-2")
        assert (a1["state"], a1["result"], a1["error"], a1["finished_at"]) == (
            "succeeded",
            {"n": 1},
            None,
            NOW + 1,
        )
        assert (a2["state"], a2["result"], a2["finished_at"]) == ("expired", None, NOW + 3)

    @pytest_twisted.ensureDeferred
    async def test_in_one_commit_state_changes_are_written_before_results(self, db):
        await db.jobs.create_job(job("j"), ["a-1", "a-2"], NOW)
        # queued in the same reactor turn, results first: one flush, states written first
        flushes = db.writes.flushes
        await gatherResults(
            [
                db.jobs.store_result("j", "a-1", "succeeded", {"n": 1}, None, None, NOW + 2),
                db.jobs.store_result("j", "a-2", "succeeded", {"n": 2}, None, None, NOW + 2),
                db.jobs.set_states(
                    [
                        Change("j", "a-1", TargetState.RUNNING, NOW + 1),
                        Change("j", "a-2", TargetState.EXPIRED, NOW + 1),
                    ]
                ),
            ]
        )
        assert db.writes.flushes == flushes + 1
        a1, a2 = await target(db, "j", "a-1"), await target(db, "j", "a-2")
        assert (a1["state"], a1["started_at"], a1["result"]) == ("succeeded", NOW + 1, {"n": 1})
        assert (a2["state"], a2["result"]) == ("expired", None)  # expiry came first

    @pytest_twisted.ensureDeferred
    async def test_active_jobs_are_those_with_unfinished_targets(self, db):
        await db.jobs.create_job(job("done"), ["a-1"], NOW)
        await db.jobs.create_job(job("half"), ["a-1", "a-2", "a-3"], NOW)
        await db.jobs.store_result("done", "a-1", "succeeded", {}, None, None, NOW)
        await db.jobs.store_result("half", "a-1", "failed", None, "x", None, NOW)
        await db.jobs.set_states([Change("half", "a-2", TargetState.DELIVERED, NOW)])
        active = await db.jobs.load_active()
        assert [(row["id"], states) for row, states in active] == [
            ("half", {"a-2": "delivered", "a-3": "pending"})
        ]
        assert active[0][0]["args"] == {"n": 1}

    @pytest_twisted.ensureDeferred
    async def test_output_is_kept_once_per_sequence_number_and_read_after_an_id(self, db):
        await db.jobs.create_job(job("j"), ["a-1", "a-2"], NOW)
        await db.jobs.add_output("j", "a-1", 0, "stdout", "one\n", NOW)
        await db.jobs.add_output("j", "a-2", 0, "stderr", "two\n", NOW + 1)
        await db.jobs.add_output("j", "a-1", 0, "stdout", "one\n", NOW + 2)  # redelivered
        await db.jobs.add_output("j", "a-1", 1, "stdout", "three\n", NOW + 3)
        out = await db.jobs.get_output("j")
        assert [(o["agent_id"], o["seq"], o["stream"], o["text"], o["at"]) for o in out] == [
            ("a-1", 0, "stdout", "one\n", NOW),
            ("a-2", 0, "stderr", "two\n", NOW + 1),
            ("a-1", 1, "stdout", "three\n", NOW + 3),
        ]
        assert [o["text"] for o in await db.jobs.get_output("j", out[0]["id"])] == [
            "two\n",
            "three\n",
        ]
        assert await db.jobs.get_output("j", out[-1]["id"]) == []
        assert await db.jobs.get_output("other") == []

    @pytest_twisted.ensureDeferred
    async def test_output_bytes_counts_utf8_per_target(self, db):
        await db.jobs.create_job(job("j"), ["a-1", "a-2"], NOW)
        assert await db.jobs.output_bytes("j", "a-1") == 0
        await db.jobs.add_output("j", "a-1", 1, "stdout", "é\n", NOW)
        await db.jobs.add_output("j", "a-1", 2, "stderr", "abc", NOW)
        await db.jobs.add_output("j", "a-2", 1, "stdout", "x", NOW)
        assert await db.jobs.output_bytes("j", "a-1") == 6
