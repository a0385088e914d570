"""Filters check their fields (issue 15.1) on a running server: the 400 at target creation,
selection and a job to a saved target, with the position and a suggestion."""

from __future__ import annotations

import pytest_twisted

from tests.inproc import inproc_server  # noqa: F401  (fixture)

TYPO = 'os.famly != "debian"'


@pytest_twisted.ensureDeferred
async def test_an_unknown_field_is_refused_at_creation_selection_and_run(inproc_server):  # noqa: F811
    server = inproc_server
    await server.enroll_identity()
    for path, body in (
        ("/api/v1/targets", {"name": "t", "filter": TYPO}),
        ("/api/v1/selection", {"filter": TYPO}),
        ("/api/v1/selection", {"filter": "online and memory.totl > 1"}),
    ):
        reply = await server.admin("POST", path, body)
        assert reply.status == 400, reply
        assert "unknown field" in reply.body["error"]
        assert "did you mean" in reply.body["error"]
        assert reply.body["suggestion"] in ("os.family", "memory.total")
    assert (await server.admin("POST", "/api/v1/targets", {"name": "t", "filter": TYPO})).body[
        "position"
    ] == 0
    assert (await server.admin("GET", "/api/v1/targets/t")).status == 404  # nothing saved

    # a target saved before fields were checked is refused when a job goes to it
    await server.parts.db.targets.create_target(
        {
            "name": "old",
            "filter": TYPO,
            "agents": None,
            "description": "",
            "created_at": 1.0,
            "created_by": "admin",
        }
    )
    reply = await server.admin("POST", "/api/v1/jobs", {"action": "ping", "target": "old"})
    assert reply.status == 400, reply
    assert "unknown field 'os.famly'" in reply.body["error"]
    assert reply.body["suggestion"] == "os.family"
    assert (await server.admin("GET", "/api/v1/jobs")).body["jobs"] == []


@pytest_twisted.ensureDeferred
async def test_not_approved_selects_the_agents_awaiting_approval(inproc_server):  # noqa: F811
    server = inproc_server
    approved = await server.enroll_identity()
    waiting = await server.enroll_identity()
    await server.parts.db.agents.add_agent("a-waiting-2", "w2", "f" * 64, 1.0, approved=False)
    await server.parts.db.agents.add_agent("a-revoked", "r", "e" * 64, 1.0, approved=False)
    await server.parts.db.agents.revoke_agent("a-revoked")
    assert waiting.agent_id
    reply = await server.admin("POST", "/api/v1/selection", {"filter": "not approved"})
    assert reply.status == 200, reply
    # added straight to the store: the server's directory may not list it, the view does
    ids = {m["id"] for m in reply.body["members"]}
    assert ids == {"a-waiting-2"}
    reply = await server.admin("POST", "/api/v1/selection", {"filter": "approved"})
    assert approved.agent_id in {m["id"] for m in reply.body["members"]}
    assert "a-waiting-2" not in {m["id"] for m in reply.body["members"]}
