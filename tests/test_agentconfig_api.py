"""Policies and profiles through the agent API, in process, with a protocol-level agent:
one fetch over both transports, `notify` on the session and in a poll's answer, PushPolicy
waiting for the agent's report, a token that gives its profile at enrollment."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.defer import gatherResults

from tests.inproc import inproc_server  # noqa: F401  (fixture)


async def target_of(server, name: str, agent_ids: list[str]) -> None:
    reply = await server.admin("POST", "/api/v1/targets", {"name": name, "agents": agent_ids})
    assert reply.status == 201, reply


@pytest_twisted.ensureDeferred
async def test_policies_and_profile_fetched_the_same_over_both_transports(inproc_server):  # noqa: F811
    server = inproc_server
    client, welcome, identity = await server.session()
    assert welcome["data"]["policy_count"] == welcome["data"]["profile_count"] == 0
    await target_of(server, "one", [identity.agent_id])
    body = {
        "name": "inv",
        "type": "inventory.schedule",
        "document": {"every": 600},
        "targets": ["one"],
    }
    created = await server.admin("POST", "/api/v1/policies", body)
    assert created.status == 201 and created.body["version"] == 1
    # the change was told at once on the session
    note = await client.wait_message(lambda m: m.get("type") == "notify")
    assert note["data"] == {"topic": "policies", "version": 1, "name": "inv"}
    reply = await server.admin(
        "POST", "/api/v1/profiles", {"name": "p", "settings": {"keepalive": 30}, "targets": ["one"]}
    )
    assert reply.status == 201
    note = await client.wait_message(
        lambda m: m.get("type") == "notify" and m["data"]["topic"] == "profile"
    )

    for path in ("/agent/v1/policies", "/agent/v1/profile"):
        over_https = await server.agent_https("GET", path, identity=identity)
        over_ws = await client.request("GET", path)
        assert over_https.status == over_ws["data"]["status"] == 200
        assert over_https.body == over_ws["data"]["body"]
    assert over_https.body == {
        "profile": {"name": "p", "version": 1, "settings": {"keepalive": 30}}
    }
    policies = (await server.agent_https("GET", "/agent/v1/policies", identity=identity)).body
    assert policies == {
        "policies": [
            {"name": "inv", "type": "inventory.schedule", "version": 1, "document": {"every": 600}}
        ]
    }

    # reports over either transport end up in the admin's views
    status = {"policies": {"inv": {"version": 1, "state": "applied", "error": None}}}
    sent = await client.request("POST", "/agent/v1/policies/status", status)
    assert sent["data"]["body"] == {"stored": 1}
    sent = await server.agent_https(
        "POST", "/agent/v1/profile/status", {"name": "p", "version": 1}, identity=identity
    )
    assert sent.body == {"stored": True}
    agent = (await server.admin("GET", f"/api/v1/agents/{identity.agent_id}")).body
    assert agent["profile"] == {"name": "p", "version": 1}
    assert agent["policies"]["inv"]["state"] == "applied"
    shown = (await server.admin("GET", "/api/v1/policies/inv")).body
    assert shown["agents"][identity.agent_id]["version"] == 1

    bad = await client.request("POST", "/agent/v1/policies/status", {"policies": {"inv": {}}})
    assert bad["data"]["status"] == 400 and "state" in bad["data"]["body"]["error"]
    await client.shut()


@pytest_twisted.ensureDeferred
async def test_a_poller_gets_the_notify_in_its_poll_answer(inproc_server):  # noqa: F811
    server = inproc_server
    identity = await server.enroll_identity()
    await target_of(server, "poller", [identity.agent_id])
    # between polls: kept for the next poll's answer
    reply = await server.admin(
        "POST", "/api/v1/profiles", {"name": "slow", "settings": {"poll_interval": 300}}
    )
    assert reply.status == 201
    await server.admin("PUT", "/api/v1/profiles/slow", {"targets": ["poller"], "priority": 1})
    work = await server.agent_https("GET", "/agent/v1/work", identity=identity)
    assert [(r["type"], r["data"]["topic"]) for r in work.body["requests"]] == [
        ("notify", "profile")
    ]
    again = await server.agent_https("GET", "/agent/v1/work", identity=identity)
    assert again.body["requests"] == []
    # while a long-poll is held: it is answered with the notify at once
    held = server.agent_https("GET", "/agent/v1/work?wait=20", identity=identity)
    await _until_held(server, identity.agent_id)
    await server.admin("PUT", "/api/v1/profiles/slow", {"settings": {"poll_interval": 200}})
    answered = await held
    assert answered.body["requests"][0]["data"]["topic"] == "profile"


async def _until_held(server, agent_id: str) -> None:
    from tests.inproc import wait_for

    await wait_for(
        lambda: server.parts.presence.polls.get(agent_id) is not None, what="a held poll"
    )


@pytest_twisted.ensureDeferred
async def test_push_waits_for_the_agents_report(inproc_server):  # noqa: F811
    server = inproc_server
    client, _w, identity = await server.session()
    silent, _w2, quiet = await server.session()
    offline = await server.enroll_identity()
    ids = [identity.agent_id, quiet.agent_id, offline.agent_id]
    await target_of(server, "three", ids)
    body = {"name": "s", "type": "agent.settings", "document": {"spool_fsync": False}}
    await server.admin("POST", "/api/v1/policies", {**body, "targets": ["three"]})
    for agent in (client, silent):  # told of the new policy; the quiet one never answers
        await agent.wait_message(lambda m: m.get("type") == "notify")
    push = server.admin("POST", "/api/v1/policies/s/push?wait=3")
    note = await client.wait_message(
        lambda m: m.get("type") == "notify" and m["data"].get("name") == "s"
    )
    await client.request(
        "POST",
        "/agent/v1/policies/status",
        {"policies": {"s": {"version": note["data"]["version"], "state": "applied"}}},
    )
    result = (await push).body["agents"]
    assert result[identity.agent_id] == {"status": "pushed", "version": 1}
    assert result[quiet.agent_id]["status"] == "failed"
    assert "no report from the agent within 3 s" in result[quiet.agent_id]["reason"]
    assert result[offline.agent_id]["status"] == "not connected"
    await gatherResults([client.shut(), silent.shut()])


@pytest_twisted.ensureDeferred
async def test_push_with_wait_0_notifies_and_does_not_wait(inproc_server):  # noqa: F811
    server = inproc_server
    client, _w, identity = await server.session()
    offline = await server.enroll_identity()
    await target_of(server, "two", [identity.agent_id, offline.agent_id])
    body = {"name": "z", "type": "agent.settings", "document": {"spool_fsync": False}}
    await server.admin("POST", "/api/v1/policies", {**body, "targets": ["two"]})
    await client.wait_message(lambda m: m.get("type") == "notify")
    reply = await server.admin("POST", "/api/v1/policies/z/push?wait=0")
    assert reply.status == 200, reply
    result = reply.body["agents"]
    assert result[identity.agent_id]["status"] == "sent"
    assert result[offline.agent_id]["status"] == "not connected"
    note = await client.wait_message(
        lambda m: m.get("type") == "notify" and m["data"].get("name") == "z"
    )
    assert note["data"]["version"] == 1
    bad = await server.admin("POST", "/api/v1/policies/z/push?wait=-1")
    assert bad.status == 400 and "0..120" in bad.body["error"]
    await client.shut()


@pytest_twisted.ensureDeferred
async def test_a_token_with_a_profile_gives_it_at_enrollment(inproc_server):  # noqa: F811
    from tcm.tls import pki

    server = inproc_server
    await server.admin("POST", "/api/v1/profiles", {"name": "kiosk", "settings": {}})
    bad = await server.admin("POST", "/api/v1/tokens", {"uses": 1, "profile": "nope"})
    assert bad.status == 400 and "no such profile" in bad.body["error"]
    token = (await server.admin("POST", "/api/v1/tokens", {"uses": 1, "profile": "kiosk"})).body
    assert token["profile"] == "kiosk"
    key = pki.generate_key()
    reply = await server.agent_https(
        "POST",
        "/agent/v1/enroll",
        {"token": token["token"], "csr": pki.make_csr(key).decode(), "hostname": "k"},
    )
    assert reply.status == 201
    from tests.inproc import AgentIdentity

    identity = AgentIdentity(
        reply.body["agent_id"], reply.body["certificate"].encode(), pki.key_to_pem(key)
    )
    profile = await server.agent_https("GET", "/agent/v1/profile", identity=identity)
    assert profile.body["profile"]["name"] == "kiosk"
    # a target assignment wins over the token's profile
    await target_of(server, "k1", [identity.agent_id])
    await server.admin("POST", "/api/v1/profiles", {"name": "special", "targets": ["k1"]})
    profile = await server.agent_https("GET", "/agent/v1/profile", identity=identity)
    assert profile.body["profile"]["name"] == "special"


@pytest_twisted.ensureDeferred
async def test_roles_for_policies_and_profiles(inproc_server):  # noqa: F811
    server = inproc_server
    mine = await server.enroll_identity()
    other = await server.enroll_identity()
    await target_of(server, "mine", [mine.agent_id])
    await target_of(server, "both", [mine.agent_id, other.agent_id])
    for name, targets in (("narrow", ["mine"]), ("wide", ["both"])):
        body = {"name": name, "type": "agent.settings", "document": {"flush_interval": 9}}
        reply = await server.admin("POST", "/api/v1/policies", {**body, "targets": targets})
        assert reply.status == 201, reply

    async def token(name, role, target=None):
        body = {"name": name, "role": role, **({"target": target} if target else {})}
        reply = await server.admin("POST", "/api/v1/apitokens", body)
        assert reply.status == 201, reply
        return reply.body["token"]

    viewer = await token("v", "viewer")
    operator = await token("o", "operator", target="mine")
    refused = await server.admin("POST", "/api/v1/policies/narrow/push?wait=1", token=viewer)
    assert refused.status == 403 and "push policies" in refused.body["error"]
    refused = await server.admin(
        "POST", "/api/v1/profiles", {"name": "x", "settings": {}}, token=operator
    )
    assert refused.status == 403
    # a scoped operator pushes within its target, not past it
    pushed = await server.admin("POST", "/api/v1/policies/narrow/push?wait=1", token=operator)
    assert pushed.status == 200
    assert pushed.body["agents"] == {
        mine.agent_id: {
            "status": "not connected",
            "reason": "no session and no waiting poll; it gets the policy when it returns",
        }
    }
    refused = await server.admin("POST", "/api/v1/policies/wide/push?wait=1", token=operator)
    assert refused.status == 403 and other.agent_id in refused.body["error"]
    audit = (await server.admin("GET", "/api/v1/audit")).body
    assert any(e["action"] == "policy.push" and e["object"] == "narrow" for e in audit["entries"])


@pytest_twisted.ensureDeferred
async def test_fetches_share_target_resolutions_but_see_their_own_session(inproc_server):  # noqa: F811
    server = inproc_server
    parts = server.parts
    resolved: list[str] = []
    real = parts.agent_config.resolve_target

    def spy(name):
        resolved.append(name)
        return real(name)

    parts.agent_config.resolve_target = spy
    a_client, _w, a = await server.session()
    reply = await server.admin("POST", "/api/v1/targets", {"name": "on", "filter": "online"})
    assert reply.status == 201, reply
    body = {"name": "p-on", "type": "agent.settings", "document": {"spool_fsync": True}}
    await server.admin("POST", "/api/v1/policies", {**body, "targets": ["on"]})
    assert resolved == ["on", "on"]  # checking the target, then whom to tell
    mine = await a_client.request("GET", "/agent/v1/policies")
    assert [p["name"] for p in mine["data"]["body"]["policies"]] == ["p-on"]
    assert len(resolved) == 2  # answered from the resolution just made
    # a session opened after that resolution: resolved afresh, and it is a member
    b_client, _w, b = await server.session()
    theirs = await b_client.request("GET", "/agent/v1/policies")
    assert [p["name"] for p in theirs["data"]["body"]["policies"]] == ["p-on"]
    assert len(resolved) == 3
    again = await a_client.request("GET", "/agent/v1/policies")
    assert again["data"]["body"] == mine["data"]["body"] and len(resolved) == 3
    # an agent without a session (HTTP mode) trusts nothing cached: it is not online
    c = await server.enroll_identity()
    theirs = await server.agent_https("GET", "/agent/v1/policies", identity=c)
    assert theirs.body == {"policies": []} and len(resolved) == 4
    await gatherResults([a_client.shut(), b_client.shut()])


@pytest_twisted.ensureDeferred
async def test_an_agent_running_a_deleted_profile_is_told_even_outside_its_target(inproc_server):  # noqa: F811
    server = inproc_server
    client, _, identity = await server.session()
    other = await server.enroll_identity()
    await target_of(server, "one", [identity.agent_id])
    reply = await server.admin(
        "POST", "/api/v1/profiles", {"name": "p", "settings": {"keepalive": 30}, "targets": ["one"]}
    )
    assert reply.status == 201
    await client.wait_message(
        lambda m: m.get("type") == "notify" and m["data"]["topic"] == "profile"
    )
    sent = await client.request("POST", "/agent/v1/profile/status", {"name": "p", "version": 1})
    assert sent["data"]["body"] == {"stored": True}
    # the agent leaves the profile's targets (told, as its profile changed) ...
    await target_of(server, "two", [other.agent_id])
    reply = await server.admin("PUT", "/api/v1/profiles/p", {"targets": ["two"]})
    assert reply.status == 200, reply
    await client.wait_message(
        lambda m: m.get("type") == "notify" and m["data"]["topic"] == "profile"
    )
    # ... but has not fetched since, and still says it runs p
    # ... then the profile is deleted: it still runs it, so it is told
    client.messages.clear()
    reply = await server.admin("DELETE", "/api/v1/profiles/p")
    assert reply.status == 200, reply
    note = await client.wait_message(
        lambda m: m.get("type") == "notify" and m["data"]["topic"] == "profile"
    )
    assert note["data"]["topic"] == "profile"
    await client.shut()
