"""The intake budget (issue 18): bytes of agents' large messages in transit are bounded.

Unit tests of the bookkeeping, and a real server over real TLS whose store is held: the
first large result is read and waits for its commit; the next ones are not read at all
until it is stored (and the server pings those it holds, whose own pings it cannot read);
a connection that goes away while waiting leaves nothing behind (its loss is seen when its
turn comes and reading resumes)."""

from __future__ import annotations

import os
import threading

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tcm.server.intake import IntakeBudget
from tests.inproc import send_hello, start_server, wait_for, within


class TestIntakeBudget:
    def test_grants_what_fits_and_queues_the_rest_in_order(self):
        budget = IntakeBudget(limit=100, threshold=10)
        granted: list[str] = []
        assert budget.request(60, lambda: granted.append("a"))
        assert not budget.request(50, lambda: granted.append("b"))
        # fits, but may not overtake the one waiting
        assert not budget.request(10, lambda: granted.append("c"))
        assert (budget.used, budget.waiting, budget.waits) == (60, 2, 2)
        budget.release(60)
        assert granted == ["b", "c"] and budget.used == 60 and budget.waiting == 0

    def test_a_message_larger_than_the_budget_goes_alone(self):
        budget = IntakeBudget(limit=100, threshold=10)
        granted: list[str] = []
        assert budget.request(500, lambda: granted.append("huge"))
        assert not budget.request(20, lambda: granted.append("next"))
        budget.release(500)
        assert granted == ["next"] and budget.used == 20

    def test_a_cancelled_wait_is_never_granted_and_lets_the_next_in(self):
        budget = IntakeBudget(limit=100, threshold=10)
        got: list[str] = []

        def gone():
            got.append("gone")

        budget.request(90, lambda: None)
        assert not budget.request(50, gone)
        assert not budget.request(5, lambda: got.append("small"))
        assert budget.cancel(gone)
        assert not budget.cancel(gone)
        assert got == ["small"] and budget.used == 95

    def test_small_frames_do_not_count_and_the_limit_is_positive(self):
        budget = IntakeBudget(limit=100, threshold=10)
        assert not budget.counts(9) and budget.counts(10)
        with pytest.raises(ValueError, match="positive"):
            IntakeBudget(limit=0)


BIG = 30_000  # bytes of a result: over the 16 KiB threshold; two do not fit in 40,000


async def _agent(server):
    identity = await server.enroll_identity()
    client = await server.ws_connect(identity)
    assert client.opened_ok, client.close_info
    await send_hello(client)
    return client, identity.agent_id


def _send_result(client, job: str) -> str:
    msg_id = os.urandom(8).hex()
    body = {"state": "succeeded", "result": {"blob": "x" * BIG}}
    data = {"method": "POST", "path": f"/agent/v1/jobs/{job}/result", "body": body}
    client.send_json({"id": msg_id, "type": "request", "data": data})
    return msg_id


@pytest_twisted.ensureDeferred
async def test_large_results_beyond_the_budget_wait_unread_until_the_first_is_stored(tmp_path):
    # pings every 0.2 s to the sessions held or waiting for an answer (keepalive_timeout / 2)
    server = await start_server(
        str(tmp_path / "server"), intake_budget=40_000, keepalive_timeout=0.4
    )
    budget = server.parts.intake
    inside, release = threading.Event(), threading.Event()
    try:
        agents = [await _agent(server) for _ in range(3)]
        reply = await server.admin(
            "POST",
            "/api/v1/jobs",
            {"action": "ping", "args": {}, "targets": [a for _, a in agents]},
        )
        assert reply.status == 201, reply
        job = reply.body["job"]
        for client, _ in agents:
            await client.wait_message(lambda m: m.get("type") == "action.request")

        # the store is busy: nothing queued behind this commits until it is released
        server.parts.db.writes.submit(lambda c: (inside.set(), release.wait(10)))
        await within(deferToThread(inside.wait, 10))

        ids = [_send_result(client, job) for client, _ in agents]
        await wait_for(
            lambda: budget.used >= BIG and budget.waiting == 2,
            what=f"two to wait ({budget.used} used, {budget.waiting} waiting)",
        )
        assert budget.used < 2 * BIG  # one result in transit, the others not read
        paused = [c for c, _ in agents if c is not agents[0][0]]
        assert all(not c.messages for c in paused)
        # their own pings are not read: the server pings them, as proof it is alive
        await wait_for(lambda: all(c.pings for c in paused), what="pings to the held")
        # the one read waits for its commit: pinged too, so that it waits for the answer
        # rather than send its result again over HTTPS
        await wait_for(lambda: agents[0][0].pings >= 2, what="pings to the one waiting")

        # one waiting agent goes away: an unread connection's loss is seen when its turn
        # comes (reading resumes), and what it was granted is given back
        gone, _ = agents[2]
        await gone.shut()

        release.set()
        for (client, _), msg_id in list(zip(agents, ids, strict=True))[:2]:
            answer = await client.wait_reply(msg_id, seconds=10)
            assert answer["data"]["status"] == 200, answer
            assert answer["data"]["body"] == {"stored": True}
        await wait_for(lambda: budget.used == 0 and budget.waiting == 0, what="all released")
        # and each connection that carried one gave its TLS memory BIOs back (after the
        # upgrade, once; after its large result, again)
        sessions = {s.agent_id: s for s in server.parts.presence.registry.all()}
        for _, agent_id in agents[:2]:
            protocol = sessions[agent_id].transport
            await wait_for(lambda p=protocol: p.tls_buffer_releases >= 2, what="BIOs released")
        assert budget.waits >= 2

        shown = await server.admin("GET", f"/api/v1/jobs/{job}")
        results = {r["agent"]: r for r in shown.body["results"]}
        # (the third's result was sent before it went: stored too if the server read it
        # before it saw the connection gone, else its target is still delivered)
        for _, agent_id in agents[:2]:
            assert results[agent_id]["state"] == "succeeded"
            assert len(results[agent_id]["result"]["blob"]) == BIG
    finally:
        release.set()
        await server.stop()
