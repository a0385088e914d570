"""Cancel on the wire, through a real server (tests/inproc.py): a running target's agent gets
an `action.cancel` on its session (again on its next session), reports `canceled`; only a
role with the `run` permission may cancel, and the cancel is audited."""

from __future__ import annotations

import pytest_twisted

from tests.inproc import inproc_server  # noqa: F401

CAPS = ("ping", "command.run")


async def token(server, name, role):
    reply = await server.admin("POST", "/api/v1/apitokens", {"name": name, "role": role})
    assert reply.status == 201, reply
    return reply.body["token"]


async def started(client):
    """Take the next pushed job, accept it (it runs now); the job id."""
    pushed = await client.wait_message(lambda m: m.get("type") == "action.request")
    job = pushed["data"]["job"]
    accept = await client.request("POST", f"/agent/v1/jobs/{job}/accept", {})
    assert accept["data"]["body"] == {"decision": "run"}, accept
    return job


@pytest_twisted.ensureDeferred
async def test_a_running_target_is_told_on_its_session_and_reports_canceled(
    inproc_server,  # noqa: F811
):
    server = inproc_server
    a, _, ida = await server.session(capabilities=CAPS)
    viewer = await token(server, "vera", "viewer")
    operator = await token(server, "otto", "operator")
    created = await server.admin(
        "POST",
        "/api/v1/jobs",
        {"action": "command.run", "args": {"argv": ["sleep", "60"]}, "targets": [ida.agent_id]},
    )
    assert created.status == 201, created
    job = created.body["job"]
    assert await started(a) == job

    refused = await server.admin("POST", f"/api/v1/jobs/{job}/cancel", {}, token=viewer)
    assert refused.status == 403
    assert refused.body["lacks"] == "run" and "may not cancel jobs" in refused.body["error"]

    reply = await server.admin("POST", f"/api/v1/jobs/{job}/cancel", None, token=operator)
    assert reply.status == 200, reply
    assert reply.body == {"job": job, "canceled": [], "stopping": [ida.agent_id]}
    told = await a.wait_message(lambda m: m.get("type") == "action.cancel")
    assert told["data"] == {"job": job, "reason": "canceled by otto"}

    # the agent's next session is told again while the target still runs
    await a.shut()
    a2, _, _ = await server.session(ida, capabilities=CAPS)
    again = await a2.wait_message(lambda m: m.get("type") == "action.cancel")
    assert again["data"]["job"] == job

    result = await a2.request(
        "POST",
        f"/agent/v1/jobs/{job}/result",
        {"state": "canceled", "error": "canceled by otto"},
    )
    assert result["data"]["body"] == {"stored": True}, result
    status = await server.admin("GET", f"/api/v1/jobs/{job}")
    assert status.body["counts"]["canceled"] == 1
    assert status.body["results"][0]["state"] == "canceled"

    audit = await server.admin("GET", "/api/v1/audit")
    cancels = [e for e in audit.body["entries"] if e["action"] == "job.cancel"]
    assert [(e["actor"], e["object"]) for e in cancels] == [("otto", job)]
    # a job that does not exist
    missing = await server.admin("POST", "/api/v1/jobs/nosuch/cancel", {})
    assert missing.status == 404


@pytest_twisted.ensureDeferred
async def test_actions_route_counts_the_advertised_handlers(inproc_server):  # noqa: F811
    server = inproc_server
    await server.session(capabilities=CAPS)
    await server.session(capabilities=("ping",))
    reply = await server.admin("GET", "/api/v1/actions")
    assert reply.status == 200
    counts = {a["name"]: a["agents"] for a in reply.body["actions"]}
    assert counts == {"ping": 2, "command.run": 1}
