"""The store's parts for nodes sharing it (tcm/store/cluster.py and the jobs area's
compare-and-set), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest_twisted

from tcm.server.jobs import Change, TargetState
from tcm.store.cluster import claim_secret, read_secret
from tests.storedb import StoreTest
from tests.test_store_jobs import NOW, job, target


class TestClusterStore(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_accept_is_one_compare_and_set(self, db):
        await db.jobs.create_job(job("j"), ["a-1", "a-2", "a-3"], NOW)
        assert await db.jobs.claim_target("j", "a-1", NOW + 1) == "running"
        assert (await target(db, "j", "a-1"))["started_at"] == NOW + 1
        assert await db.jobs.claim_target("j", "a-1", NOW + 2) == "running"  # asked again
        assert (await target(db, "j", "a-1"))["started_at"] == NOW + 1
        await db.jobs.store_result("j", "a-2", "succeeded", {"ok": 1}, None, NOW, NOW + 1)
        assert await db.jobs.claim_target("j", "a-2", NOW + 2) == "succeeded"
        assert await db.jobs.claim_target("j", "nobody", NOW + 2) == "unknown"
        # past the TTL (created NOW, 60 s): not started targets expire, never run
        assert await db.jobs.claim_target("j", "a-3", NOW + 61) == "expired"
        assert (await target(db, "j", "a-3"))["state"] == "expired"

    @pytest_twisted.ensureDeferred
    async def test_a_checked_result_says_whether_it_was_stored(self, db):
        await db.jobs.create_job(job("j"), ["a-1"], NOW)
        first = await db.jobs.store_result(
            "j", "a-1", "succeeded", 1, None, None, NOW, checked=True
        )
        again = await db.jobs.store_result("j", "a-1", "failed", 2, "x", None, NOW, checked=True)
        assert (first, again) == (True, False)
        assert (await target(db, "j", "a-1"))["result"] == 1

    @pytest_twisted.ensureDeferred
    async def test_a_stale_view_never_undoes_running(self, db):
        """Delivered and expired apply to targets not started only: another node's view
        of a target as pending does not take back its running."""
        await db.jobs.create_job(job("j"), ["a-1"], NOW)
        assert await db.jobs.claim_target("j", "a-1", NOW + 1) == "running"
        await db.jobs.set_states([Change("j", "a-1", TargetState.DELIVERED, NOW + 2)])
        await db.jobs.set_states([Change("j", "a-1", TargetState.EXPIRED, NOW + 3)])
        assert (await target(db, "j", "a-1"))["state"] == "running"

    @pytest_twisted.ensureDeferred
    async def test_load_job_and_the_unfinished_jobs_of_agents(self, db):
        await db.jobs.create_job(job("j1"), ["a-1", "a-2"], NOW)
        await db.jobs.create_job(job("j2"), ["a-2"], NOW)
        await db.jobs.store_result("j1", "a-1", "succeeded", 1, None, None, NOW)
        row, states = await db.jobs.load_job("j1")
        assert row["action"] == "ping" and states == {"a-2": "pending"}
        assert await db.jobs.load_job("nope") is None
        assert await db.jobs.unfinished_jobs_of(["a-1"]) == set()
        assert await db.jobs.unfinished_jobs_of(["a-1", "a-2", "x"]) == {"j1", "j2"}

    @pytest_twisted.ensureDeferred
    async def test_heartbeats_and_nodes(self, db):
        row = dict(address="https://n1", started_at=NOW, heartbeat_at=NOW, core=1, task=0)
        await db.cluster.heartbeat("n1", {**row, "polls": 0, "bus": "up", "stopped": False})
        await db.cluster.heartbeat("n1", {**row, "heartbeat_at": NOW + 2, "polls": 3})
        await db.cluster.heartbeat("n0", {**row, "polls": 0})
        nodes = await db.cluster.list_nodes()
        assert [(n["name"], n["heartbeat_at"], n["polls"]) for n in nodes] == [
            ("n0", NOW, 0),
            ("n1", NOW + 2, 3),
        ]
        assert nodes[1]["bus"] == "up" and nodes[0]["bus"] == "down"
        assert await db.cluster.forget_node("n0") == 1

    def test_a_secret_is_claimed_once(self, db):
        assert read_secret(db.engine, "ca") is None
        assert claim_secret(db.engine, "ca", "first", NOW, "n1") == "first"
        assert claim_secret(db.engine, "ca", "second", NOW, "n2") == "first"
        assert read_secret(db.engine, "ca") == "first"
