"""Clones are seen (issue 16.5): one agent identity on two machines.

The unit tests drive `CloneWatch` with times passed in; the integration test starts two real
agent processes from copies of one state directory and finds the identity reported cloned
(`tcm agents`, the audit log, /metrics), refused with 4013 instead of superseded forever, and
re-keyed by the operator: revoke, then each machine enrolls with its own token.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request

from tcm.protocol import codes
from tcm.server.sessions import CloneWatch
from tests.harness import AgentProc, Server, free_port, wait_until


def test_a_reconnecting_agent_is_not_a_clone():
    watch = CloneWatch(limit=6, window=120)
    for minute in range(20):  # a reconnect a minute, each superseding a half-open session
        assert watch.session_opened("a-1", "fp-1", "fp-1", True, minute * 60.0) is None
    assert watch.session_opened("a-2", "fp-2", None, False, 0.0) is None  # no supersede
    assert not watch.is_cloned("a-1") and watch.superseded_total == 20


def test_sessions_superseding_each_other_mark_a_clone():
    watch = CloneWatch(limit=6, window=120)
    found = [watch.session_opened("a-1", None, None, True, t * 2.0) for t in range(6)]
    assert found[:5] == [None] * 5
    assert found[5] == "6 sessions superseded each other within 120 s"
    assert watch.is_cloned("a-1") and not watch.is_cloned("a-2")
    assert watch.session_opened("a-1", None, None, True, 20.0) is None  # reported once


def test_two_keys_alternating_mark_a_clone_but_a_renewal_does_not():
    watch = CloneWatch()
    old, new = "0" * 64, "1" * 64
    assert watch.session_opened("a-1", new, old, True, 10.0) is None  # renewed: a new key
    assert watch.session_opened("a-1", new, new, True, 20.0) is None
    assert not watch.is_cloned("a-1")
    why = watch.session_opened("a-1", old, new, True, 30.0)
    assert why == f"two certificates alternate ({new[:16]}, {old[:16]})"
    watch.forget("a-1")
    assert not watch.is_cloned("a-1")


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def test_two_agents_from_one_state_directory_are_reported_and_refused(tmp_path):
    metrics_port = free_port()
    server = Server(str(tmp_path), extra=["--metrics-port", str(metrics_port)])
    server.start()
    first = AgentProc(str(tmp_path), "first", server, server.token())
    second = AgentProc(str(tmp_path), "second")
    procs = [first, second]
    try:
        first.start()
        agent_id = first.agent_id
        shutil.copytree(
            first.state_dir,
            second.state_dir,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("control.sock"),
        )
        second.start(wait=False)

        def listed() -> dict:
            return next(a for a in server.agents() if a["id"] == agent_id)

        view = wait_until(lambda: listed().get("state") == "cloned" and listed(), 60, 0.5, "clone")
        assert "superseded each other" in view["cloned"] or "alternate" in view["cloned"]
        audit = json.loads(server.cli("audit", "--json"))
        assert [e for e in audit if e["action"] == "agent.cloned" and e["object"] == agent_id]
        scraped = _metrics(metrics_port)
        assert "tcm_server_cloned_agents 1.0" in scraped
        assert "tcm_server_sessions_superseded_total" in scraped

        # not superseded forever: both are refused with 4013 and neither keeps a session
        wait_until(
            lambda: (
                str(codes.CLOSE_CLONED) in first.log() and str(codes.CLOSE_CLONED) in second.log()
            ),
            30,
            0.5,
            "both agents told 4013",
        )
        wait_until(lambda: not listed()["online"], 30, 0.5, "the identity offline")
        opened = first.count(AgentProc.SESSION_OPEN) + second.count(AgentProc.SESSION_OPEN)
        wait_until(
            lambda: first.count("4013") + second.count("4013") >= 4, 30, 0.5, "refusals again"
        )
        assert not listed()["online"]
        assert "tcm_server_cloned_agents 1.0" in _metrics(metrics_port)
        assert opened >= 2

        # the operator re-keys: revoke the identity, then each machine enrolls anew
        server.cli("agents", "revoke", agent_id)
        first.stop()
        second.stop()
        token = server.token(uses=2)
        ids = set()
        for name in ("first", "second"):
            state_dir = str(tmp_path / name)
            for stale in ("cert.pem", "key.pem", "agent.json"):
                os.unlink(os.path.join(state_dir, stale))
            again = AgentProc(str(tmp_path), name, server, token)
            procs.append(again)
            again.start()
            ids.add(again.agent_id)
        assert len(ids) == 2 and agent_id not in ids
        online = {a["id"] for a in server.agents() if a["online"]}
        assert ids <= online
    finally:
        for p in procs:
            p.stop()
        server.stop()
