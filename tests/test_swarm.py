"""The swarm: real agents of their own (identity, mutual TLS, session) in one process, and
its process-level tuning (full garbage collections kept off settled agents)."""

from __future__ import annotations

import gc
import json

import pytest_twisted
from twisted.internet.task import Clock

from tcm.agent.swarm import Swarm, parse_sources
from tests.inproc import inproc_server  # noqa: F401


def _counts(started: int, persistent: int) -> dict:
    return {"started": started, "persistent": persistent}


def test_agents_frozen_once_all_have_sessions_and_given_back_when_one_is_lost(tmp_path):
    swarm = Swarm(Clock(), 3, str(tmp_path), None, None, None, parse_sources(None))
    try:
        swarm._tune_gc(_counts(2, 2))  # still starting: nothing frozen
        assert not swarm.gc_frozen and gc.get_freeze_count() == 0
        swarm._tune_gc(_counts(3, 3))
        assert swarm.gc_frozen and gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        swarm._tune_gc(_counts(3, 3))  # settled still: not frozen again
        assert gc.get_freeze_count() == frozen
        swarm._tune_gc(_counts(3, 2))  # a session lost: everything back to the collector
        assert not swarm.gc_frozen and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()


def test_swarm_members_have_inventories_of_their_own(tmp_path):
    import json

    from tcm.agent.swarm import CHANGES_FILE, SwarmInventory

    action = SwarmInventory(300, str(tmp_path))
    first = action._collect(1, {})
    other = action._collect(2, {})
    assert set(first["classes"]) == set(SwarmInventory.make_classes())
    assert 290 < first["classes"]["software"]["count"] < 300  # some not installed
    assert first["digests"]["software"] != other["digests"]["software"]
    known = {cls: d[:16] for cls, d in first["digests"].items()}
    again = action._collect(1, {"known": known})
    assert again["classes"] == {} and sorted(again["unchanged"]) == sorted(known)
    (tmp_path / CHANGES_FILE).write_text(json.dumps({"software": {"1": 1}}))
    changed = action._collect(1, {"known": known})
    assert list(changed["classes"]) == ["software"]
    assert action._collect(2, {"known": {}})["digests"] == other["digests"]


@pytest_twisted.ensureDeferred
async def test_members_are_real_agents_of_their_own_over_one_shared_tls_context(
    inproc_server,  # noqa: F811
    tmp_path,
):
    """Three members against the real server: each enrolls and holds a mutual-TLS session
    as itself (the server sees three agents), while their client identities share one
    OpenSSL context (issue 17), and each releases its TLS buffers once its session is open."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    ca = tmp_path / "ca.pem"
    ca.write_bytes(inproc_server.ca_pem)
    token = await inproc_server.create_token(uses=3)
    swarm = Swarm(
        reactor, 3, str(tmp_path / "swarm"), inproc_server.base_url, str(ca), token,
        parse_sources(None), rate=100, keepalive=3600,
    )  # fmt: skip
    swarm.startService()
    try:
        for _ in range(200):  # at most 20 s
            if swarm.counts()["persistent"] == 3:
                break
            await deferLater(reactor, 0.1, lambda: None)
        assert swarm.counts()["persistent"] == 3
        agents = [member.agent for member in swarm.members]
        assert len({a.agent_id for a in agents}) == 3
        registry = inproc_server.parts.presence.registry
        assert {s.agent_id for s in registry.all()} == {a.agent_id for a in agents}
        shared = {id(a.connection.identity.options_now("127.0.0.1")._shared) for a in agents}
        assert len(shared) == 1
        assert len({a.connection.identity.cert_pem for a in agents}) == 3
        await deferLater(reactor, 0.1, lambda: None)  # the release waits a turn
        assert all(a.connection.protocol.tls_buffer_releases == 1 for a in agents)
        reply = await agents[0].connection.link.call("GET", "/agent/v1/whoami")
        assert reply.body == {"agent_id": agents[0].agent_id, "transport": "websocket"}
    finally:
        await swarm.stopService()
        gc.unfreeze()


@pytest_twisted.ensureDeferred
async def test_enroll_only_enrolls_each_member_once_and_holds_no_session(
    inproc_server,  # noqa: F811
    tmp_path,
):
    """`--enroll-only` (a benchmark's first phase): each member gets an identity of its own
    and no session; a second run passes the enrolled members without asking the server."""
    from twisted.internet import reactor

    from tcm.agent.enrollment import AgentState

    ca = tmp_path / "ca.pem"
    ca.write_bytes(inproc_server.ca_pem)
    state = str(tmp_path / "swarm")
    token = await inproc_server.create_token(uses=3)
    swarm = Swarm(
        reactor, 3, state, inproc_server.base_url, str(ca), token, parse_sources(None),
        enroll_rate=100, enroll_only=True, enroll_concurrency=2,
    )  # fmt: skip
    swarm.startService()
    try:
        failed = await swarm.enrollment_done
    finally:
        await swarm.stopService()
    assert failed == 0
    assert swarm.members == []  # no agent service, no session
    assert not list(inproc_server.parts.presence.registry.all())
    ids = {AgentState(swarm.member_dir(i)).meta()["agent_id"] for i in range(3)}
    assert len(ids) == 3
    counts = json.loads((tmp_path / "swarm" / "enroll-0.json").read_text())
    assert (counts["enrolled"], counts["already"], counts["failed"]) == (3, 0, 0)

    again = Swarm(
        reactor, 3, state, inproc_server.base_url, str(ca), "spent-token",
        parse_sources(None), enroll_only=True,
    )  # fmt: skip
    again.startService()
    try:
        assert await again.enrollment_done == 0
    finally:
        await again.stopService()
    assert again.enroll_counts()["already"] == 3 and again.enroll_counts()["enrolled"] == 0
    assert {AgentState(again.member_dir(i)).meta()["agent_id"] for i in range(3)} == ids
