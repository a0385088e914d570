"""Policies and connection profiles with real processes: a server and agents on loopback.

- A policy changed on a target reaches its connected members by a push (a `notify` on their
  session: no reconnect, no poll), and its offline members when they come back.
- PushPolicy reports pushed / not connected / empty policy / failed (a policy type the agent
  has no handler for: the server has the example plugin, the agents do not).
- A connection profile with persistent connections off drops an agent to HTTP, and back on
  restores its session, in the same agent process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tcm.cli.admin import Api, CliError
from tests.conftest import ROOT
from tests.harness import PYTHON, AgentProc, Server, agent_status, wait_until
from tests.test_integration_reach import proxy_factory  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

EXAMPLE = os.path.join(ROOT, "examples", "tcm-example-plugin")
SERVER_ARGS = ["--poll-interval", "2", "--long-poll", "5"]
AGENT_ARGS = ["--backoff-max", "1"]
FETCH_BY_NOTIFY = "fetching policies (the server notified a change of {name})"

# The server knows the example plugin's policy type; the agents do not have it.
SERVER_ENV = {"PYTHONPATH": os.pathsep.join([EXAMPLE, ROOT])}
AGENT_COUNT = 2


@pytest.fixture(scope="module")
def api(server):
    with open(os.path.join(server.state_dir, "admin.token")) as f:
        return Api(server.url, server.ca, f.read().strip())


def reported(api: Api, policy: str) -> dict:
    return api.call("GET", f"/policies/{policy}")["agents"]


def make_target(api: Api, name: str, agents: list[AgentProc]) -> None:
    api.call("POST", "/targets", {"name": name, "agents": [a.agent_id for a in agents]})


def test_policy_change_reaches_connected_members_by_push_and_offline_ones_on_return(api, agents):
    a, b = agents
    make_target(api, "pol-both", agents)
    document = {"flush_interval": 20}
    api.call(
        "POST",
        "/policies",
        {
            "name": "settings",
            "type": "agent.settings",
            "document": document,
            "targets": ["pol-both"],
        },
    )
    wait_until(
        lambda: all((s or {}).get("version") == 1 for s in reported(api, "settings").values()),
        20,
        0.1,
        "both agents to report version 1",
    )
    sessions = [p.count(AgentProc.SESSION_OPEN) for p in agents]
    polls = [agent_status(p)["http"]["polls"] for p in agents]
    notified = [p.count(FETCH_BY_NOTIFY.format(name="settings")) for p in agents]

    api.call("PUT", "/policies/settings", {"document": {"flush_interval": 25}})
    wait_until(
        lambda: all(
            (s or {}).get("version") == 2 and s.get("state") == "applied"
            for s in reported(api, "settings").values()
        ),
        20,
        0.05,
        "both agents to report version 2",
    )
    # It came as a push on the open session: a notify-triggered fetch, no reconnect, no poll.
    assert [p.count(FETCH_BY_NOTIFY.format(name="settings")) for p in agents] == [
        n + 1 for n in notified
    ]
    assert [p.count(AgentProc.SESSION_OPEN) for p in agents] == sessions
    assert [agent_status(p)["http"]["polls"] for p in agents] == polls
    assert agent_status(a)["policies"]["settings"]["version"] == 2

    # An offline member gets the change when it returns (fetched at session start).
    b.stop()
    api.call("PUT", "/policies/settings", {"document": {"flush_interval": 30}})
    wait_until(
        lambda: (reported(api, "settings")[a.agent_id] or {}).get("version") == 3,
        20,
        0.05,
        "the connected agent to report version 3",
    )
    assert reported(api, "settings")[b.agent_id]["version"] == 2
    b.start()
    wait_until(
        lambda: (reported(api, "settings")[b.agent_id] or {}).get("version") == 3,
        20,
        0.05,
        "the returning agent to report version 3",
    )
    stored = json.loads(open(os.path.join(b.state_dir, "policies.json")).read())
    assert stored["policies"][0]["document"] == {"flush_interval": 30}


def test_push_policy_statuses(api, agents, server):
    a, b = agents
    make_target(api, "push-both", agents)
    api.call(
        "POST",
        "/policies",
        {
            "name": "inventory-hourly",
            "type": "inventory.schedule",
            "document": {"every": 3600, "classes": ["hostname"]},
            "targets": ["push-both"],
        },
    )
    api.call(
        "POST",
        "/policies",
        {"name": "nothing", "type": "command.schedule", "document": {}, "targets": ["push-both"]},
    )
    api.call(
        "POST",
        "/policies",
        {
            "name": "disk-watch",
            "type": "example.disk_watch",
            "document": {"path": "/", "min_free": 0, "every": 3600},
            "targets": ["push-both"],
        },
    )
    b.stop()
    try:
        pushed = server.cli_json("policies", "push", "inventory-hourly", "--wait", "20")
        assert pushed["agents"][a.agent_id]["status"] == "pushed"
        assert pushed["agents"][b.agent_id]["status"] == "not connected"

        empty = server.cli_json("policies", "push", "nothing")
        assert {r["status"] for r in empty["agents"].values()} == {"empty policy"}

        failed = server.cli_json("policies", "push", "disk-watch", "--wait", "20")
        assert failed["agents"][a.agent_id]["status"] == "failed"
        assert (
            "no handler for policy type 'example.disk_watch'"
            in (failed["agents"][a.agent_id]["reason"])
        )
        assert failed["agents"][b.agent_id]["status"] == "not connected"
        # the CLI says so in its exit status too
        assert server.cli_result("policies", "push", "disk-watch").returncode == 1
    finally:
        b.start()
    # The pushed inventory policy ran once at once on the agent and reported its run.
    run = wait_until(
        lambda: (reported(api, "inventory-hourly")[a.agent_id] or {}).get("last_run"),
        20,
        0.1,
        "the first inventory run",
    )
    assert run["ok"] and run["result"]["classes"] == ["hostname"]
    # which classes changed and their digests are kept; the data only in the inventory
    assert list(run["result"]["inventory"]["changed"]) == ["hostname"]
    # the collected class is in the server's inventory, as from an inventory.collect job
    stored = api.call("GET", f"/agents/{a.agent_id}/inventory")
    assert "hostname" in stored["classes"]


def test_profile_with_persistent_off_drops_to_http_and_back_without_restart(api, agents, server):
    a, _b = agents
    pid = a.proc.pid
    make_target(api, "prof-a", [a])
    opened = a.count(AgentProc.SESSION_OPEN)
    api.call(
        "POST",
        "/profiles",
        {"name": "base", "settings": {"persistent_connections": True}, "targets": ["prof-a"]},
    )
    wait_until(lambda: agent_status(a)["profile"]["name"] == "base", 20, 0.1, "the base profile")
    api.call(
        "POST",
        "/profiles",
        {
            "name": "http-only",
            "settings": {"persistent_connections": False, "poll_interval": 2},
            "targets": ["prof-a"],
            "priority": 10,
        },
    )
    status = wait_until(
        lambda: (s := agent_status(a))["mode"] == "http" and s["http"]["polling"] and s,
        20,
        0.1,
        "the agent to drop to HTTP",
    )
    assert status["profile"]["name"] == "http-only" and status["profile"]["version"] == 1
    assert "persistent_connections" in status["profile"]["applied"]
    text = subprocess.run(
        [PYTHON, "-m", "tcm.cli.agent", "--state-dir", a.state_dir, "status"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "Connection profile: http-only v1" in text
    # the HTTP-mode text status shows the HTTPS calls' traffic
    sent = re.search(r"Sent over HTTPS: +(\S+ \S+)", text)
    received = re.search(r"Received over HTTPS: +(\S+ \S+)", text)
    assert sent and received, text
    assert not sent.group(1).startswith("0 ") and not received.group(1).startswith("0 ")
    view = wait_until(
        lambda: (
            (v := next(x for x in server.agents() if x["id"] == a.agent_id))["profile"]
            == {"name": "http-only", "version": 1}
            and v
        ),
        20,
        0.1,
        "the server to show the agent's profile",
    )
    assert view["online"] is False
    assert (view["mode"], view["state"]) == ("http", "ok")  # working over polls: not offline

    # Moved back (http-only no longer assigned, so `base` wins again): the notify reaches it
    # through its held long-poll, and the session comes back.
    api.call("PUT", "/profiles/http-only", {"targets": []})
    a.wait_session(opened + 1, timeout=30)
    status = wait_until(
        lambda: (s := agent_status(a))["mode"] == "persistent" and s,
        20,
        0.1,
        "the agent back on its session",
    )
    assert status["profile"]["name"] == "base"
    assert a.proc.pid == pid and a.alive()  # no restart
    assert "connection profile base v1 in force" in a.log()
    api.call("DELETE", "/profiles/http-only")
    api.call("DELETE", "/profiles/base")


def test_profile_proxy_and_back_reconnect_without_restart(api, agents, server, proxy_factory):  # noqa: F811
    _a, b = agents
    pid = b.proc.pid
    make_target(api, "prof-b", [b])
    proxy = proxy_factory([server.port])
    url = f"http://127.0.0.1:{proxy.port}"
    opened = b.count(AgentProc.SESSION_OPEN)
    api.call(
        "POST",
        "/profiles",
        {"name": "via-proxy", "settings": {"proxy": url}, "targets": ["prof-b"]},
    )
    b.wait_session(opened + 1, timeout=30)
    status = wait_until(
        lambda: (s := agent_status(b))["mode"] == "persistent" and s["proxy"] == url and s,
        20,
        0.1,
        "the agent's session through the proxy",
    )
    assert status["profile"]["applied"] == ["proxy"]
    assert "CONNECT 127.0.0.1:" in proxy.log_text()
    # the profile deleted: straight to the server again
    api.call("DELETE", "/profiles/via-proxy")
    b.wait_session(opened + 2, timeout=30)
    wait_until(lambda: agent_status(b)["proxy"] is None, 20, 0.1, "a direct connection")
    assert b.proc.pid == pid and b.alive()


def test_bad_policy_and_profile_input_is_refused_with_a_reason(api, agents):
    make_target(api, "bad-input", agents[:1])
    cases = [
        ("POST", "/policies", {"name": "x", "type": "no.such.type", "targets": ["bad-input"]}),
        (
            "POST",
            "/policies",
            {"name": "x", "type": "inventory.schedule", "document": {"every": "often"}},
        ),
        ("POST", "/policies", {"name": "x", "type": "inventory.schedule", "targets": ["nope"]}),
        (
            "POST",
            "/policies",
            {"name": "x", "type": "inventory.schedule", "document": {"cron": "0 25 * * *"}},
        ),
        ("POST", "/policies", {"name": "x", "type": "agent.settings", "doc": {}}),
        ("POST", "/profiles", {"name": "p", "settings": {"colour": "blue"}}),
        ("POST", "/profiles", {"name": "p", "settings": {"keepalive": -1}}),
        ("POST", "/profiles", {"name": "p", "settings": {"proxy": "socks://x"}}),
    ]
    reasons = []
    for method, path, body in cases:
        with pytest.raises(CliError) as e:
            api.call(method, path, body)
        assert ": 400 " in str(e.value), str(e.value)
        reasons.append(str(e.value))
    assert "unknown policy type 'no.such.type'" in reasons[0]
    assert "bad inventory.schedule document" in reasons[1]
    assert "no such target: 'nope'" in reasons[2]
    assert "cron hour: '25' is outside 0-23" in reasons[3]
    assert "unknown field(s) doc for a policy" in reasons[4]
    assert "unknown profile setting(s) colour" in reasons[5]
    assert "keepalive" in reasons[6]
    assert "proxy" in reasons[7]


def test_cli_for_policies_and_profiles(server, agents, tmp_path):
    a, _b = agents
    make_target(api_of(server), "cli-a", [a])
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"every": 7200, "command": {"argv": ["true"]}}))
    created = server.cli_json(
        "policies", "create", "cli-cmd", "--type", "command.schedule", "--document", str(doc),
        "--target", "cli-a",
    )  # fmt: skip
    assert created["version"] == 1 and created["document"]["every"] == 7200
    updated = server.cli_json(
        "policies", "update", "cli-cmd", "--document", '{"cron": "0 3 * * *", "command": '
        '{"argv": ["true"]}}',
    )  # fmt: skip
    assert updated["version"] == 2 and updated["document"]["cron"] == "0 3 * * *"
    assert "cli-cmd" in server.cli("policies", "list")
    shown = wait_until(
        lambda: (
            (p := server.cli_json("policies", "show", "cli-cmd"))["agents"][a.agent_id]
            and p["agents"][a.agent_id]["version"] == 2
            and p
        ),
        20,
        0.1,
        "the agent's report in policies show",
    )
    assert shown["agents"][a.agent_id]["state"] == "applied"
    assert a.agent_id in server.cli("policies", "show", "cli-cmd")
    bad = server.cli_result("policies", "create", "x", "--type", "command.schedule",
                            "--document", '{"every": 5}')  # fmt: skip
    assert bad.returncode == 2 and "400 bad command.schedule document" in bad.stderr
    bad = server.cli_result("policies", "create", "x", "--type", "t", "--document", "nofile")
    assert bad.returncode == 2 and "cannot read the document file" in bad.stderr
    assert "deleted policy cli-cmd" in server.cli("policies", "delete", "cli-cmd")

    made = server.cli_json(
        "profiles", "create", "cli-prof", "--set", "poll_interval=90", "--set", "long_poll=false",
        "--target", "cli-a", "--priority", "-5",
    )  # fmt: skip
    assert made["settings"] == {"poll_interval": 90, "long_poll": False}
    assert made["assignments"] == [{"target": "cli-a", "priority": -5}]
    changed = server.cli_json(
        "profiles", "update", "cli-prof", "--set", "keepalive=45", "--unset", "long_poll"
    )
    assert changed["version"] == 2 and changed["settings"] == {"poll_interval": 90, "keepalive": 45}
    assert "cli-prof" in server.cli("profiles", "list")
    assert "keepalive = 45" in server.cli("profiles", "show", "cli-prof")
    bad = server.cli_result("profiles", "update", "cli-prof", "--set", "keepalive=often")
    assert bad.returncode == 2 and "400 bad profile setting" in bad.stderr
    bad = server.cli_result("profiles", "create", "cli-bad", "--set", "colour=blue")
    assert bad.returncode == 2 and "unknown profile setting(s) colour" in bad.stderr
    assert "deleted profile cli-prof" in server.cli("profiles", "delete", "cli-prof")


def api_of(server: Server) -> Api:
    with open(os.path.join(server.state_dir, "admin.token")) as f:
        return Api(server.url, server.ca, f.read().strip())


def test_policies_run_on_their_schedule_offline_and_after_a_restart(tmp_path):
    """A command.schedule keeps running while the server is down, and after the agent
    restarts without it (from policies.json)."""
    server = Server(str(tmp_path), extra=SERVER_ARGS)
    server.start()
    agent = AgentProc(str(tmp_path), "sched", server, server.token(uses=1), extra=AGENT_ARGS)
    marks = tmp_path / "marks"
    try:
        agent.start()
        # a server without policies or profiles: nothing fetched at session start
        assert "fetching policies (session start)" not in agent.log()
        api = api_of(server)
        make_target(api, "sched", [agent])
        command = {"argv": ["sh", "-c", f"echo run >> {marks}"]}
        api.call(
            "POST",
            "/policies",
            {
                "name": "tick",
                "type": "command.schedule",
                "document": {"every": 1, "command": command, "run_now": True},
                "targets": ["sched"],
            },
        )

        def runs() -> int:
            return marks.read_text().count("run") if marks.exists() else 0

        wait_until(lambda: runs() >= 2, 20, 0.1, "two scheduled runs")
        last = wait_until(
            lambda: (reported(api, "tick")[agent.agent_id] or {}).get("last_run"),
            20,
            0.1,
            "a run report",
        )
        assert last["ok"] and last["result"]["exit_code"] == 0
        server.stop()
        before = runs()
        wait_until(lambda: runs() >= before + 2, 20, 0.1, "runs with the server down")
        agent.stop()
        agent.start(wait=False)  # no server to connect to: the stored policy runs anyway
        before = runs()
        wait_until(lambda: runs() >= before + 2, 30, 0.1, "runs after a restart, offline")
    finally:
        agent.stop()
        server.stop()
