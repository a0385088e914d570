"""The fleet's state and removals with real processes: twistd tcm-server, tcm-agents, the CLI.

`tcm agents` (NAME, MODE, VIA, TASK SERVER, STATE), `agents set/pending/delete`, `token
revoke`, `gateways remove`, and the settings' boolean form."""

from __future__ import annotations

import json

import pytest

from tests.harness import AgentProc, wait_until
from tests.test_integration_admin import cli_as

pytestmark = pytest.mark.integration

AGENT_COUNT = 2


def by_id(server, *args: str) -> dict[str, dict]:
    return {a["id"]: a for a in server.cli_json("agents", *args)}


def test_the_list_shows_state_and_takes_names_and_tags(server, agents):
    a, b = (p.agent_id for p in agents)
    text = server.cli("agents")
    header = text.splitlines()[0].split()
    assert header[:5] == ["ID", "NAME", "MODE", "VIA", "TASK"]
    assert "STATE" in header and "LAST" in header
    line = next(x for x in text.splitlines() if x.startswith(a))
    assert " persistent " in line and " direct " in line and " ok " in line

    view = server.cli_json("agents", "set", a, "--name", "front door", "--tag", "env=prod")
    assert (view["name"], view["tags"], view["hostname"] != "front door") == (
        "front door",
        {"env": "prod"},
        True,
    )
    server.cli("agents", "set", a, "--tag", "rack=r1")
    server.cli("agents", "set", b, "--tag", "env=test")
    listed = by_id(server)
    assert listed[a]["tags"] == {"env": "prod", "rack": "r1"}
    assert (listed[a]["mode"], listed[a]["state"], listed[a]["via"]) == (
        "persistent",
        "ok",
        "direct",
    )
    assert "front door [env=prod,rack=r1]" in server.cli("agents")
    # the name and tags select in filters
    server.cli("targets", "create", "prod", "--filter", 'tags.env == "prod"')
    assert {m["id"] for m in server.cli_json("targets", "members", "prod")} == {a}
    server.cli("targets", "create", "door", "--filter", 'name == "front door"')
    assert {m["id"] for m in server.cli_json("targets", "members", "door")} == {a}
    # --untag and --name '' (back to the hostname)
    view = server.cli_json("agents", "set", a, "--untag", "rack", "--name", "")
    assert (view["name"], view["tags"]) == (view["hostname"], {"env": "prod"})
    r = server.cli_result("agents", "set", a, "--tag", "bad key=1")
    assert r.returncode != 0 and "'tags' must be" in r.stderr
    assert "agent.label" in server.cli("audit")


def test_pending_approval_delete_and_a_revoked_token(server, agents, base):
    # settings: a boolean, set by on/off/true/false
    assert "require_approval = false" in server.cli("settings", "get")
    server.cli("settings", "set", "require_approval", "on")
    assert server.cli("settings", "get", "require_approval").strip() == "true"
    token = server.token(uses=100)
    newcomer = AgentProc(base, "newcomer", server, token)
    newcomer.start(wait=False)
    try:
        wait_until(
            lambda: server.cli_json("agents", "pending"), 30, 0.2, "an agent awaiting approval"
        )
        (pending,) = server.cli_json("agents", "pending")
        assert pending["state"] == "awaiting approval" and pending["id"] == newcomer.agent_id
        assert newcomer.agent_id in server.cli("agents", "pending")
        server.cli("agents", "approve", newcomer.agent_id)
        assert server.cli("agents", "pending").strip() == "no agent awaits approval"
        server.cli("settings", "set", "require_approval", "False")
        newcomer.wait_session(1)

        # a job to it, then delete it: hidden, revoked, its history kept
        job = server.cli_json("run", "ping", "--targets", newcomer.agent_id, "--wait")["job"]
        assert server.cli_json("agents", "delete", newcomer.agent_id)["changed"] is True
        assert newcomer.agent_id not in by_id(server)
        shown = by_id(server, "--all")[newcomer.agent_id]
        assert (shown["state"], shown["revoked"], shown["online"]) == ("deleted", True, False)
        assert newcomer.agent_id in json.dumps(server.job(job))
        assert "was deleted" in server.cli("agents", "delete", newcomer.agent_id)
        assert "agent.delete" in server.cli("audit")
    finally:
        newcomer.stop()

    # a withdrawn token is refused at once and listed as revoked
    token_id = token.split(".")[0]
    assert f"{token_id} revoked" in server.cli("token", "revoke", token_id)
    (listed,) = [t for t in server.cli_json("token", "list") if t["id"] == token_id]
    assert listed["revoked_at"] is not None and listed["used"] == 1
    assert "revoked" in next(x for x in server.cli("token", "list").splitlines() if token_id in x)
    late = AgentProc(base, "late", server, token)
    late.start(wait=False)
    try:
        wait_until(lambda: "enrollment token revoked" in late.log(), 30, 0.2, "refusal")
    finally:
        late.stop()
    r = server.cli_result("token", "revoke", "nosuch")
    assert r.returncode != 0 and "no enrollment token nosuch" in r.stderr


def test_a_removed_gateway_is_revoked_and_audited(server):
    server.cli("gateways", "enroll", "gw9")
    assert "gw9 removed" in server.cli("gateways", "remove", "gw9")
    (gw,) = [g for g in server.cli_json("gateways") if g["name"] == "gw9"]
    assert gw["state"] == "revoked"
    assert "gateway.remove" in server.cli("audit")
    r = server.cli_result("taskservers", "remove", "gw9")  # not a task server
    assert r.returncode != 0 and "no taskserver gw9" in r.stderr


def test_whoami_and_the_removals_need_the_admin_role(server, agents):
    me = server.cli_json("whoami")
    assert me == {
        "name": "admin",
        "role": "admin",
        "permissions": ["read", "run", "policy", "admin"],
        "target": None,
    }
    assert "scope:       every agent" in server.cli("whoami")
    server.cli("targets", "create", "just-one", "--agents", agents[0].agent_id)
    token = server.cli(
        "apitoken", "create", "ops-one", "--role", "operator", "--target", "just-one"
    ).strip()
    r = cli_as(server, token, "whoami", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "name": "ops-one",
        "role": "operator",
        "permissions": ["read", "run", "policy"],
        "target": "just-one",
    }
    r = cli_as(server, token, "whoami")
    assert "role:        operator" in r.stdout and "scope:       target just-one" in r.stdout
    for args in (
        ["agents", "delete", agents[1].agent_id],
        ["agents", "set", agents[1].agent_id, "--name", "x"],
        ["token", "revoke", "abc"],
        ["taskservers", "remove", "ts1"],
        ["gateways", "remove", "gw1"],
    ):
        r = cli_as(server, token, *args)
        assert r.returncode == 2 and "403" in r.stderr and "'admin'" in r.stderr, (args, r)
    assert agents[1].agent_id in by_id(server)
