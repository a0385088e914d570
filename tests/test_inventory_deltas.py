"""Inventory at fleet scale (issue 18), the server's part against a real Database (SQLite)
and the agent's real collection code: each request carries its agent's known digests, an
unchanged class comes back as its digest only and is stored once, bad classes are refused
one by one with the rest kept, and an agent that ignores digests still works."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import reactor

from tcm.plugins import builtin_inventory as agent_inventory
from tcm.protocol.envelope import encode
from tcm.server.dispatcher import Dispatcher
from tcm.server.jobservice import JobService
from tcm.server.sessions import SessionRegistry
from tcm.store import Database

AGENTS = ["a-1", "a-2"]


def make(tmp_path, history=5, max_class_bytes=1024 * 1024):
    db = Database(f"sqlite:///{tmp_path / 'tcm.sqlite'}", reactor=reactor)
    db.open()
    db.inventory.history = history
    jobs = JobService(
        db.jobs,
        Dispatcher(SessionRegistry()),
        reactor,
        capabilities_of=lambda a: None,
        known_agents=lambda: AGENTS,
        inventory_store=db.inventory,
        max_class_bytes=max_class_bytes,
    )
    return db, jobs


def machine(agent: str, packages: int = 2000, release: int = 0):
    """Collectors of one agent's own (varied) inventory, run by the agent's real `collect`."""
    return {
        "os": lambda: {"family": "debian", "version": "12", "release": release},
        "hostname": lambda: {"hostname": agent, "fqdn": f"{agent}.example"},
        "software": lambda: {
            "manager": "dpkg",
            "count": packages,
            "packages": [
                {"name": f"pkg-{i:05d}", "version": f"1.{i % 7}.{len(agent)}", "arch": "amd64"}
                for i in range(packages)
            ],
        },
    }


async def collect_via_poll(jobs: JobService, agent: str, collectors) -> tuple[dict, int, int]:
    """The agent polls, runs the request with its real collection code, and reports: the
    request's and the result's sizes as they go over the wire."""
    (job,) = jobs.work_for(agent)
    request = encode(job.request())
    args = job.request().data["args"]
    result = agent_inventory.collect(
        args.get("classes") or list(collectors), args.get("known"), collectors
    )
    result["collected_at"] = reactor.seconds()
    body = {"state": "succeeded", "result": result}
    wire = len(json.dumps(body, separators=(",", ":")))
    assert await jobs.result(agent, job.id, "succeeded", result, None, None, None)
    return {"job": job.id, "args": args, "result": result}, len(request), wire


@pytest_twisted.ensureDeferred
async def test_a_recollection_where_nothing_changed_moves_and_stores_well_under_a_kilobyte(
    tmp_path,
):
    db, jobs = make(tmp_path)
    try:
        await jobs.load()
        first = await jobs.create("inventory.collect", {}, AGENTS, 60, None)
        sent = {}
        for agent in AGENTS:
            got, _, wire = await collect_via_poll(jobs, agent, machine(agent))
            assert got["args"] == {}  # nothing known yet: everything sent
            sent[agent] = wire
        assert all(n > 50_000 for n in sent.values())  # 2,000 packages each
        shown = await jobs.status(first)
        for r in shown["results"]:  # the data, read back from the inventory store
            assert r["result"]["classes"]["hostname"]["hostname"] == r["agent"]
            assert len(r["result"]["classes"]["software"]["packages"]) == 2000
        before = await db.inventory.sizes()

        second = await jobs.create("inventory.collect", {}, AGENTS, 60, None)
        for agent in AGENTS:
            got, request, wire = await collect_via_poll(jobs, agent, machine(agent))
            known = got["args"]["known"]
            assert set(known) == {"os", "hostname", "software"}
            assert all(len(d) == 16 for d in known.values())  # each agent its own digests
            assert got["result"]["classes"] == {}
            assert sorted(got["result"]["unchanged"]) == ["hostname", "os", "software"]
            assert request < 600 and wire < 600, (request, wire)
        assert (await db.inventory.sizes()) == before  # nothing stored again
        status = await jobs.status(second)
        for r in status["results"]:
            stored = await db.jobs.get_job(second)
            row = next(t for t in stored["targets"] if t["agent_id"] == r["agent"])
            assert len(json.dumps(row["result"])) < 400  # the summary, not the data
            assert r["result"]["classes"] == {} and len(r["result"]["unchanged"]) == 3
        inv = await db.inventory.get_inventory("a-1")
        assert inv["software"]["version"] == 1
        assert inv["software"]["collected_at"] >= shown["results"][0]["result"]["collected_at"]
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_one_changed_class_is_sent_alone_and_becomes_a_new_version(tmp_path):
    db, jobs = make(tmp_path, history=2)
    try:
        for release in range(5):
            job = await jobs.create("inventory.collect", {}, ["a-1"], 60, None)
            got, _, _ = await collect_via_poll(jobs, "a-1", machine("a-1", 50, release))
            if release:
                assert list(got["result"]["classes"]) == ["os"]
        status = await jobs.status(job)
        assert status["results"][0]["result"]["classes"]["os"]["release"] == 4
        history = await db.inventory.class_history("a-1", "os")
        assert [h["version"] for h in history] == [5, 4, 3]  # current + the last 2
        assert [h["version"] for h in await db.inventory.class_history("a-1", "software")] == [1]
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_an_agent_that_ignores_digests_still_works(tmp_path):
    db, jobs = make(tmp_path)
    try:
        for _ in range(2):
            job = await jobs.create("inventory.collect", {}, ["a-1"], 60, None)
            (request,) = jobs.work_for("a-1")
            # an older agent: its schema took `known`, but it sends everything, with the full
            # digest of each class (or none at all)
            result = agent_inventory.collect(["os", "hostname"], None, machine("a-1"))
            result["digests"].pop("hostname")
            assert await jobs.result("a-1", request.id, "succeeded", result, None, None, None)
            status = await jobs.status(job)
            assert status["results"][0]["state"] == "succeeded"
            assert status["results"][0]["result"]["classes"]["os"]["family"] == "debian"
        inv = await db.inventory.get_inventory("a-1")
        assert inv["os"]["version"] == 1 and inv["hostname"]["data"]["hostname"] == "a-1"
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_bad_inventory_payloads_are_refused_by_class_with_the_rest_kept(tmp_path):
    db, jobs = make(tmp_path, max_class_bytes=4096)
    try:
        job = await jobs.create("inventory.collect", {}, ["a-1"], 60, None)
        (request,) = jobs.work_for("a-1")
        good = {"hostname": "a-1", "fqdn": "a-1.example"}
        result = {
            "classes": {
                "hostname": good,
                "os": {"family": "debian"},
                "gpu": {"model": "x"},
                "software": {"packages": ["p" * 5000]},
            },
            "digests": {
                "hostname": agent_inventory.digest(good),
                "os": "f" * 64,  # not the digest of the data sent
                "users": "zz",  # unchanged, but no digest to go by
            },
            "collected_at": 1.0,
        }
        stored = await jobs.result("a-1", request.id, "succeeded", result, None, None, None)
        assert stored is True  # acknowledged: the agent does not send it again and again
        status = await jobs.status(job)
        target = status["results"][0]
        assert target["state"] == "failed"
        error = target["error"]
        assert error.startswith("inventory refused: ")
        assert "gpu: unknown class" in error
        assert "os: digest 'ffff" in error and "not the digest of the data sent" in error
        assert "software: 5" in error and "over the 4096 bytes a class may have" in error
        assert "users: an unchanged class needs its digest" in error
        assert set(target["result"]["inventory"]["rejected"]) == {"gpu", "os", "software", "users"}
        # the good class is kept, and nothing else was stored
        inv = await db.inventory.get_inventory("a-1")
        assert list(inv) == ["hostname"] and inv["hostname"]["data"] == good
        assert target["result"]["classes"] == {"hostname": good}
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_a_class_said_unchanged_that_the_store_lacks_is_asked_in_full_next_time(tmp_path):
    db, jobs = make(tmp_path)
    try:
        await jobs.create("inventory.collect", {}, ["a-1"], 60, None)
        await collect_via_poll(jobs, "a-1", machine("a-1", 10))
        assert "os" in jobs.known_digests.known("a-1")
        # the store lost the row (restored from an older backup, another node's write...)
        await db.transaction(lambda c: c.exec_driver_sql("DELETE FROM inventory WHERE class='os'"))
        await jobs.create("inventory.collect", {}, ["a-1"], 60, None)
        got, _, _ = await collect_via_poll(jobs, "a-1", machine("a-1", 10))
        assert "os" in got["result"]["unchanged"]
        assert "os" not in jobs.known_digests.known("a-1")  # forgotten: asked in full next
        await jobs.create("inventory.collect", {}, ["a-1"], 60, None)
        got, _, _ = await collect_via_poll(jobs, "a-1", machine("a-1", 10))
        assert list(got["result"]["classes"]) == ["os"]
        assert "os" in await db.inventory.get_inventory("a-1")
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_known_digests_are_loaded_at_startup(tmp_path):
    db, jobs = make(tmp_path)
    try:
        await jobs.create("inventory.collect", {}, ["a-1"], 60, None)
        await collect_via_poll(jobs, "a-1", machine("a-1", 10))
    finally:
        db.close()
    db, jobs = make(tmp_path)  # a restarted server
    try:
        await jobs.load()
        assert set(jobs.known_digests.known("a-1")) == {"os", "hostname", "software"}
    finally:
        db.close()


def test_memory_is_given_back_once_after_a_large_batch():
    from twisted.internet.task import Clock

    from tcm.process import MemoryReleaser, release_memory

    clock = Clock()
    calls = []
    releaser = MemoryReleaser(clock, threshold=100, interval=2.0, release=lambda: calls.append(1))
    releaser.handled(60)
    clock.advance(10)
    assert calls == []  # under the threshold: nothing to give back
    releaser.handled(60)
    clock.advance(1)
    releaser.handled(500)  # still busy: wait for the batch to end
    clock.advance(1.5)
    assert calls == []
    clock.advance(0.6)
    assert calls == [1] and releaser.pending == 0
    clock.advance(60)
    assert calls == [1]
    releaser.handled(100)
    releaser.stop()
    clock.advance(60)
    assert calls == [1]
    # the real call: glibc's malloc_trim where there is one, a no-op elsewhere
    assert release_memory() in (True, False)


@pytest_twisted.ensureDeferred
async def test_a_scheduled_collection_learns_what_the_server_holds_from_its_report(tmp_path):
    from tcm.server.agentconfig import AgentConfigBook
    from tcm.server.policies import PolicyService

    db = Database(f"sqlite:///{tmp_path / 'tcm.sqlite'}", reactor=reactor)
    db.open()
    try:
        book = AgentConfigBook(db.agents, Dispatcher(SessionRegistry()), reactor, None)
        service = PolicyService(book, db.config, db.inventory, reactor)
        service.policies["inv"] = {"name": "inv", "type": "inventory.schedule", "version": 1}
        collectors = machine("a-1", 20)

        async def run(known):
            result = agent_inventory.collect(list(collectors), known, collectors)
            run = {"at": 1.0, "ok": True, "error": None, "result": result}
            report = {"inv": {"version": 1, "state": "applied", "last_run": run}}
            return result, await service.report_policies("a-1", report)

        result, answer = await run({})
        assert set(result["classes"]) == {"os", "hostname", "software"}
        known = answer["inventory_known"]
        assert set(known) == {"os", "hostname", "software"}
        result, answer = await run(known)  # the next run, with what the server said
        assert result["classes"] == {} and len(result["unchanged"]) == 3
        kept = book.row("a-1")["policies"]["inv"]["last_run"]["result"]
        assert kept["classes"] == [] and set(kept["inventory"]["unchanged"]) == set(known)
        assert (await db.inventory.get_inventory("a-1"))["software"]["version"] == 1
        # a report without an inventory run answers as before
        plain = {"inv": {"version": 1, "state": "applied"}}
        assert service.report_policies("a-1", plain) == {"stored": 1}
    finally:
        db.close()
