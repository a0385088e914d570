"""The administrator's model through the admin API of a real server (tests/inproc.py):
targets that follow inventory, jobs to targets, groups, inventory freshness, roles, audit.

The agents are real sessions over WSS with real certificates; they answer the jobs pushed to
them with results the test chooses (the inventory an agent would report)."""

from __future__ import annotations

import pytest_twisted

from tcm.server.inventory import DIGEST_PREFIX, digest
from tcm.server.targets import most_specific
from tests.inproc import inproc_server, wait_for  # noqa: F401

CAPS = ("ping", "inventory.collect")
GiB = 1024**3


async def answer(client, result, state="succeeded", action=None):
    """Take the next pushed job (of `action`), accept it, report `result`; the job id."""
    pushed = await client.wait_message(
        lambda m: (
            m.get("type") == "action.request" and (action is None or m["data"]["action"] == action)
        )
    )
    job = pushed["data"]["job"]
    accept = await client.request("POST", f"/agent/v1/jobs/{job}/accept", {})
    assert accept["data"]["body"] == {"decision": "run"}, accept
    reply = await client.request(
        "POST", f"/agent/v1/jobs/{job}/result", {"state": state, "result": result}
    )
    assert reply["data"]["body"] == {"stored": True}, reply
    return pushed


def inventory_result(classes, unchanged=(), at=None):
    digests = {name: digest(data) for name, data in classes.items()}
    digests.update(dict(unchanged))
    out = {"classes": classes, "digests": digests, "unchanged": [n for n, _ in unchanged]}
    if at is not None:
        out["collected_at"] = at
    return out


async def ok(reply, status=200):
    assert reply.status == status, reply
    return reply.body


async def members(server, target):
    body = await ok(await server.admin("GET", f"/api/v1/targets/{target}/members"))
    return {m["id"] for m in body["members"]}


@pytest_twisted.ensureDeferred
async def test_a_filter_target_follows_inventory_groups_and_online_state(inproc_server):  # noqa: F811
    server = inproc_server
    a, _, ida = await server.session(capabilities=CAPS)
    b, _, idb = await server.session(capabilities=CAPS)
    await ok(
        await server.admin(
            "POST",
            "/api/v1/targets",
            {"name": "big", "filter": "memory.total > 8GiB and online"},
        ),
        201,
    )
    assert await members(server, "big") == set()  # no inventory yet

    async def collect(mem_a, mem_b):
        body = await ok(
            await server.admin(
                "POST",
                "/api/v1/jobs",
                {"action": "inventory.collect", "targets": [ida.agent_id, idb.agent_id]},
            ),
            201,
        )
        await answer(a, inventory_result({"memory": {"total": mem_a}}))
        await answer(b, inventory_result({"memory": {"total": mem_b}}))
        return body["job"]

    await collect(16 * GiB, 4 * GiB)
    assert await members(server, "big") == {ida.agent_id}
    await collect(4 * GiB, 32 * GiB)  # the inventory changed: so does the membership
    assert await members(server, "big") == {idb.agent_id}
    stored = await ok(await server.admin("GET", f"/api/v1/agents/{idb.agent_id}/inventory"))
    assert stored["classes"]["memory"]["data"] == {"total": 32 * GiB}

    # group membership, evaluated live too
    await ok(
        await server.admin("POST", "/api/v1/targets", {"name": "webs", "filter": 'group == "web"'}),
        201,
    )
    await ok(await server.admin("POST", "/api/v1/groups", {"name": "web"}), 201)
    assert await members(server, "webs") == set()
    group = await ok(
        await server.admin("POST", "/api/v1/groups/web/members", {"add": [ida.agent_id]})
    )
    assert group["agents"] == [ida.agent_id]
    assert await members(server, "webs") == {ida.agent_id}
    await ok(await server.admin("POST", "/api/v1/groups/web/members", {"remove": [ida.agent_id]}))
    assert await members(server, "webs") == set()

    # online state: b goes away, and out of the target
    await b.shut()
    await wait_for(
        lambda: server.parts.presence.registry.get(idb.agent_id) is None, what="b offline"
    )
    assert await members(server, "big") == set()
    await a.shut()


@pytest_twisted.ensureDeferred
async def test_a_job_to_a_target_reaches_exactly_its_members(inproc_server):  # noqa: F811
    server = inproc_server
    sessions = [await server.session(capabilities=CAPS) for _ in range(3)]
    ids = [s[2].agent_id for s in sessions]
    await ok(await server.admin("POST", "/api/v1/groups", {"name": "pair", "agents": ids[:2]}), 201)
    await ok(
        await server.admin(
            "POST", "/api/v1/targets", {"name": "pair-t", "filter": 'group == "pair"'}
        ),
        201,
    )
    job = (
        await ok(
            await server.admin("POST", "/api/v1/jobs", {"action": "ping", "target": "pair-t"}),
            201,
        )
    )["job"]
    for client, _, _ in sessions[:2]:
        pushed = await answer(client, {"pong": True})
        assert pushed["data"]["job"] == job
    status = await ok(await server.admin("GET", f"/api/v1/jobs/{job}"))
    assert {r["agent"] for r in status["results"]} == set(ids[:2])
    assert status["counts"]["succeeded"] == 2
    assert not [m for m in sessions[2][0].messages if m.get("type") == "action.request"]
    # a member added later is not a recipient of the job made before
    await ok(await server.admin("POST", "/api/v1/groups/pair/members", {"add": [ids[2]]}))
    status = await ok(await server.admin("GET", f"/api/v1/jobs/{job}"))
    assert status["counts"]["total"] == 2

    # a static target saved from a job's failed agents
    job2 = (
        await ok(
            await server.admin("POST", "/api/v1/jobs", {"action": "ping", "targets": ids}), 201
        )
    )["job"]
    await answer(sessions[0][0], {"pong": True})
    await answer(sessions[1][0], None, state="failed")
    await answer(sessions[2][0], None, state="failed")
    saved = await ok(
        await server.admin(
            "POST",
            "/api/v1/targets",
            {"name": "retry", "from_job": job2, "state": "failed"},
        ),
        201,
    )
    assert saved["kind"] == "static" and saved["agents"] == sorted(ids[1:])
    assert await members(server, "retry") == set(ids[1:])
    selection = await ok(
        await server.admin("POST", "/api/v1/selection", {"from_job": job2, "state": ["succeeded"]})
    )
    assert [m["id"] for m in selection["members"]] == [ids[0]]
    for client, _, _ in sessions:
        await client.shut()


@pytest_twisted.ensureDeferred
async def test_bad_selections_are_400_with_the_reason(inproc_server):  # noqa: F811
    server = inproc_server
    reply = await server.admin(
        "POST", "/api/v1/targets", {"name": "t", "filter": 'os.family = "debian"'}
    )
    assert reply.status == 400
    assert reply.body["position"] == 10
    assert "unexpected character '='" in reply.body["error"]
    assert "position 10" in reply.body["error"]
    reply = await server.admin("POST", "/api/v1/selection", {"filter": "memory.total > 8XB"})
    assert reply.status == 400 and reply.body["position"] == 16
    for body, words in [
        ({"name": "t"}, "exactly one of"),
        ({"name": "t", "filter": "online", "agents": []}, "exactly one of"),
        ({"name": "bad name", "filter": "online"}, "'name'"),
        ({"name": "t", "filter": 3}, "'filter' must be a string"),
        ({"name": "t", "agents": ["a-nope"]}, "unknown agent ids"),
        ({"name": "t", "from_job": "j", "state": "done"}, "'state' must be"),
        ({"name": "t", "filter": "online", "state": "failed"}, "'state' goes with"),
    ]:
        reply = await server.admin("POST", "/api/v1/targets", body)
        assert reply.status == 400, (body, reply)
        assert words in reply.body["error"], (body, reply.body)
    reply = await server.admin("POST", "/api/v1/targets", {"name": "t", "from_job": "nope"})
    assert reply.status == 404
    reply = await server.admin("POST", "/api/v1/jobs", {"action": "ping", "target": "nope"})
    assert reply.status == 404 and "no such target" in reply.body["error"]
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "target": "x", "targets": "all"}
    )
    assert reply.status == 400
    await ok(await server.admin("POST", "/api/v1/targets", {"name": "t", "filter": "online"}), 201)
    reply = await server.admin("POST", "/api/v1/targets", {"name": "t", "filter": "online"})
    assert reply.status == 409
    reply = await server.admin("POST", "/api/v1/jobs", {"action": "ping", "target": "t"})
    assert reply.status == 400 and "no members" in reply.body["error"]
    reply = await server.admin("POST", "/api/v1/groups/none/members", {"add": []})
    assert reply.status == 400
    reply = await server.admin("GET", "/api/v1/inventory/stale?older_than=soon")
    assert reply.status == 400
    reply = await server.admin("POST", "/api/v1/apitokens", {"name": "x", "role": "root"})
    assert reply.status == 400 and "'role'" in reply.body["error"]


@pytest_twisted.ensureDeferred
async def test_inventory_freshness_stale_and_refresh_of_just_what_is_stale(inproc_server):  # noqa: F811
    server = inproc_server
    a, _, ida = await server.session(capabilities=CAPS)
    agent = ida.agent_id
    await ok(
        await server.admin(
            "POST", "/api/v1/jobs", {"action": "inventory.collect", "targets": [agent]}
        ),
        201,
    )
    os_data = {"family": "debian", "name": "Debian 12"}
    await answer(a, inventory_result({"os": os_data, "memory": {"total": GiB}}))
    stale = await ok(await server.admin("GET", "/api/v1/inventory/stale?older_than=3600"))
    listed = {(s["agent"], s["class"]): s["collected_at"] for s in stale["stale"]}
    assert ("os", "memory") not in {c for _, c in listed}  # fresh: not listed
    assert set(listed) == {
        (agent, c) for c in ("hostname", "cpu", "disks", "network", "software", "users")
    }
    assert all(at is None for at in listed.values())  # never collected

    # refresh --stale: one job, just the missing classes, from just this agent
    plan = await ok(
        await server.admin("POST", "/api/v1/inventory/refresh", {"older_than": 3600}), 201
    )
    assert len(plan["jobs"]) == 1
    assert plan["jobs"][0]["classes"] == [
        "hostname",
        "cpu",
        "disks",
        "network",
        "software",
        "users",
    ]
    assert plan["jobs"][0]["agents"] == [agent]
    pushed = await answer(
        a,
        inventory_result({c: {"v": 1} for c in plan["jobs"][0]["classes"]}),
        action="inventory.collect",
    )
    assert "known" not in pushed["data"]["args"]  # nothing held yet for those classes
    stale = await ok(await server.admin("GET", "/api/v1/inventory/stale?older_than=3600"))
    assert stale["stale"] == []

    # everything (older than 0 s): the server sends what it holds; an unchanged class comes
    # back as its digest only and keeps its data with the new collection time
    before = await ok(await server.admin("GET", f"/api/v1/agents/{agent}/inventory"))
    plan = await ok(
        await server.admin(
            "POST", "/api/v1/inventory/refresh", {"older_than": 0, "classes": ["os", "memory"]}
        ),
        201,
    )
    pushed = await answer(
        a,
        inventory_result({"memory": {"total": 2 * GiB}}, unchanged=[("os", digest(os_data))]),
        action="inventory.collect",
    )
    assert pushed["data"]["args"] == {
        "classes": ["os", "memory"],
        # the digests the server holds, as prefixes (DIGEST_PREFIX hex digits; issue 18)
        "known": {
            "os": digest(os_data)[:DIGEST_PREFIX],
            "memory": digest({"total": GiB})[:DIGEST_PREFIX],
        },
    }
    after = await ok(await server.admin("GET", f"/api/v1/agents/{agent}/inventory"))
    assert after["classes"]["os"]["data"] == os_data
    assert after["classes"]["os"]["collected_at"] >= before["classes"]["os"]["collected_at"]
    assert after["classes"]["os"]["changed_at"] == before["classes"]["os"]["changed_at"]
    assert after["classes"]["memory"]["data"] == {"total": 2 * GiB}
    filtered = await ok(
        await server.admin("POST", "/api/v1/selection", {"filter": 'os.family == "debian"'})
    )
    assert [m["id"] for m in filtered["members"]] == [agent]
    await a.shut()


async def token(server, name, role, target=None):
    body = {"name": name, "role": role}
    if target:
        body["target"] = target
    created = await ok(await server.admin("POST", "/api/v1/apitokens", body), 201)
    assert created["role"] == role and "secret_hash" not in created
    return created["token"]


@pytest_twisted.ensureDeferred
async def test_roles_refuse_with_a_reason_and_the_audit_log_records_who_did_what(
    inproc_server,  # noqa: F811
):
    server = inproc_server
    a, _, ida = await server.session(capabilities=CAPS)
    b, _, idb = await server.session(capabilities=CAPS)
    viewer = await token(server, "alice", "viewer")
    operator = await token(server, "bob", "operator")

    # a viewer reads, and cannot create jobs
    assert (await server.admin("GET", "/api/v1/agents", token=viewer)).status == 200
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": "all"}, token=viewer
    )
    assert reply.status == 403
    assert reply.body["role"] == "viewer" and reply.body["lacks"] == "run"
    assert "'alice' has role 'viewer'" in reply.body["error"]
    assert "may not create jobs" in reply.body["error"]

    # an operator creates jobs, and cannot create tokens of either kind, nor targets
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": [ida.agent_id]}, token=operator
    )
    assert reply.status == 201
    job = reply.body["job"]
    await answer(a, {"pong": True})
    for path, body in [
        ("/api/v1/tokens", {}),
        ("/api/v1/apitokens", {"name": "eve", "role": "admin"}),
        ("/api/v1/targets", {"name": "x", "filter": "online"}),
    ]:
        reply = await server.admin("POST", path, body, token=operator)
        assert reply.status == 403, (path, reply)
        assert reply.body["role"] == "operator" and reply.body["lacks"] == "admin"
        assert "'bob' has role 'operator'" in reply.body["error"]
    reply = await server.admin("PUT", "/api/v1/settings", {"long_poll": 5}, token=operator)
    assert reply.status == 403 and "may not change settings" in reply.body["error"]
    job_view = await ok(await server.admin("GET", f"/api/v1/jobs/{job}", token=viewer))
    assert job_view["created_by"] == "bob"

    # an operator scoped to a target: jobs to its members only
    await ok(
        await server.admin("POST", "/api/v1/targets", {"name": "only-a", "agents": [ida.agent_id]}),
        201,
    )
    scoped = await token(server, "carol", "operator", target="only-a")
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": [ida.agent_id]}, token=scoped
    )
    assert reply.status == 201
    await answer(a, {"pong": True})
    for targets in ([ida.agent_id, idb.agent_id], "all"):
        reply = await server.admin(
            "POST", "/api/v1/jobs", {"action": "ping", "targets": targets}, token=scoped
        )
        assert reply.status == 403, reply
        assert reply.body["lacks"] == "scope"
        assert "scoped to target 'only-a'" in reply.body["error"]
        assert idb.agent_id in reply.body["error"]

    # revoked and unknown tokens are 401; the bootstrap admin token stays valid
    await ok(await server.admin("DELETE", "/api/v1/apitokens/alice"), 204)
    assert (await server.admin("GET", "/api/v1/agents", token=viewer)).status == 401
    assert (await server.admin("GET", "/api/v1/agents", token="nope.nope")).status == 401
    assert (await server.admin("GET", "/api/v1/agents")).status == 200
    listed = await ok(await server.admin("GET", "/api/v1/apitokens"))
    states = {t["name"]: t["revoked_at"] is not None for t in listed["tokens"]}
    assert states == {"alice": True, "bob": False, "carol": False}
    assert all("secret_hash" not in t for t in listed["tokens"])
    rows = await server.parts.db.access.list_api_tokens(include_hashes=True)
    assert all(operator.partition(".")[2] not in str(r) for r in rows)  # hashes only

    # the audit log: who did what
    log = (await ok(await server.admin("GET", "/api/v1/audit", token=operator)))["entries"]
    seen = [(e["actor"], e["action"], e["object"]) for e in log]
    assert ("admin", "apitoken.create", "alice") in seen
    assert ("admin", "apitoken.create", "bob") in seen
    assert ("bob", "job.create", job) in seen
    assert ("admin", "target.create", "only-a") in seen
    assert ("admin", "apitoken.revoke", "alice") in seen
    assert sum(1 for s in seen if s[:2] == ("carol", "job.create")) == 1  # refusals: no job
    assert [e["id"] for e in log] == sorted(e["id"] for e in log)
    entry = next(e for e in log if e["action"] == "apitoken.create" and e["object"] == "carol")
    assert entry["details"]["role"] == "operator" and entry["details"]["target"] == "only-a"
    later = await ok(
        await server.admin("GET", f"/api/v1/audit?since={log[-1]['at'] + 1}", token=operator)
    )
    assert later["entries"] == []
    await a.shut()
    await b.shut()


@pytest_twisted.ensureDeferred
async def test_resolve_targets_and_the_most_specific_target(inproc_server):  # noqa: F811
    server = inproc_server
    a, _, ida = await server.session(capabilities=CAPS)
    b, _, idb = await server.session(capabilities=CAPS)
    for body in (
        {"name": "everyone", "filter": "online"},
        {"name": "just-a", "agents": [ida.agent_id]},
        {"name": "online-too", "filter": "online"},
    ):
        await ok(await server.admin("POST", "/api/v1/targets", body), 201)
    assert await server.parts.targets.resolve_target("just-a") == {ida.agent_id}
    everything = await server.parts.targets.resolve_targets()
    assert everything == {
        "everyone": {ida.agent_id, idb.agent_id},
        "just-a": {ida.agent_id},
        "online-too": {ida.agent_id, idb.agent_id},
    }
    assert await server.parts.targets.resolve_targets(["just-a", "nope"]) == {
        "just-a": {ida.agent_id}
    }
    assert most_specific(everything, ida.agent_id) == "just-a"
    assert most_specific(everything, idb.agent_id) == "everyone"  # a tie: by name
    await a.shut()
    await b.shut()


@pytest_twisted.ensureDeferred
async def test_the_agent_list_in_pages_follows_next_to_every_agent_once(
    inproc_server,  # noqa: F811
):
    """GET /api/v1/agents?limit=N&after=ID (the console reads the list so at 10,000 agents):
    pages in id order, `next` chained to the last page, each agent once; ?state= applies
    before paging; without `limit` the whole list as before, `next` null."""
    server = inproc_server
    ids = [(await server.enroll_identity(hostname=f"h{i}")).agent_id for i in range(5)]
    await ok(await server.admin("POST", f"/api/v1/agents/{ids[2]}/revoke"))
    everything = await ok(await server.admin("GET", "/api/v1/agents"))
    assert [a["id"] for a in everything["agents"]] == ids  # enrolled order, as before
    assert everything["next"] is None

    seen, after, pages = [], None, 0
    while True:
        path = "/api/v1/agents?limit=2" + (f"&after={after}" if after else "")
        page = await ok(await server.admin("GET", path))
        pages += 1
        assert 0 < len(page["agents"]) <= 2
        seen += [a["id"] for a in page["agents"]]
        after = page["next"]
        if after is None:
            break
        assert after == seen[-1]
    assert seen == sorted(ids) and pages == 3
    assert (await ok(await server.admin("GET", "/api/v1/agents?limit=5")))["next"] is None

    revoked = await ok(await server.admin("GET", "/api/v1/agents?state=revoked&limit=1"))
    assert [a["id"] for a in revoked["agents"]] == [ids[2]] and revoked["next"] is None
    ok_agents = await ok(await server.admin("GET", "/api/v1/agents?state=ok&limit=3"))
    assert [a["id"] for a in ok_agents["agents"]] == sorted(set(ids) - {ids[2]})[:3]
    assert ok_agents["next"] == ok_agents["agents"][-1]["id"]

    for bad, words in (("limit=0", "'limit' must be"), ("limit=x", "'limit' must be")):
        reply = await server.admin("GET", f"/api/v1/agents?{bad}")
        assert reply.status == 400 and words in reply.body["error"], reply
