"""The administrator's model with real processes: twistd tcm-server, three twistd tcm-agent,
and the tcm CLI as an admin (and an operator, and a viewer) would use it."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import pytest

from tests.harness import PYTHON, Server

pytestmark = pytest.mark.integration


def cli_as(server: Server, token: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI with another API token than the bootstrap one."""
    return subprocess.run(
        [PYTHON, "-m", "tcm.cli.admin", "--url", server.url, "--ca-cert", server.ca]
        + ["--token", token, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_job_to_a_target_reaches_exactly_its_members(server, agents):
    ids = [p.agent_id for p in agents]
    server.cli("groups", "create", "web", "--agents", ",".join(ids[:2]))
    server.cli("targets", "create", "web-hosts", "--filter", 'group == "web" and online')
    listed = server.cli_json("targets", "members", "web-hosts")
    assert {m["id"] for m in listed} == set(ids[:2])
    out = server.cli_json("run", "ping", "--target", "web-hosts", "--wait")
    assert {r["agent"] for r in out["results"]} == set(ids[:2])
    assert out["counts"]["succeeded"] == 2 and out["counts"]["total"] == 2
    assert all(r["result"]["pong"] is True for r in out["results"])  # answered by the agents

    # CSV export of the members
    rows = list(csv.DictReader(io.StringIO(server.cli("targets", "members", "web-hosts", "--csv"))))
    assert {r["id"] for r in rows} == set(ids[:2])
    assert all(r["online"] == "yes" and r["groups"] == "web" for r in rows)

    # a bad filter: the CLI points at the error
    r = server.cli_result("targets", "create", "bad", "--filter", "memory.total > 8 GiB")
    assert r.returncode == 2
    assert "400 bad filter" in r.stderr and "at position 17" in r.stderr
    assert "\n  memory.total > 8 GiB\n                   ^" in r.stderr

    # the succeeded agents of that job, saved as a static target
    server.cli("targets", "create", "pinged", "--from-job", out["job"], "--state", "succeeded")
    shown = server.cli_json("targets", "show", "pinged")
    assert shown["kind"] == "static" and set(shown["agents"]) == set(ids[:2])
    server.cli("groups", "remove", "web", ids[0])
    assert {m["id"] for m in server.cli_json("targets", "members", "web-hosts")} == {ids[1]}
    assert {m["id"] for m in server.cli_json("targets", "members", "pinged")} == set(ids[:2])


def test_inventory_refresh_collects_only_what_is_stale_and_agents_send_only_changes(server, agents):
    ids = {p.agent_id for p in agents}
    stale = server.cli_json("inventory", "stale", "--older-than", "1h")
    assert {(s["agent"], s["class"]) for s in stale} >= {(a, "os") for a in ids}
    out = json.loads(
        server.cli("inventory", "refresh", "--stale", "--older-than", "1h", "--wait", "--json")
    )
    assert len(out) == 1  # every agent misses the same classes: one job
    assert set(out[0]["agents"]) == ids and out[0]["counts"]["succeeded"] == 3
    assert server.cli_json("inventory", "stale", "--older-than", "1h") == []

    # a filter on real inventory: every agent runs on this machine
    inv = server.cli_json("inventory", "show", agents[0].agent_id)
    family = inv["classes"]["os"]["data"]["family"]
    total = inv["classes"]["memory"]["data"]["total"]
    server.cli("targets", "create", "same-os", "--filter", f'os.family == "{family}"')
    assert {m["id"] for m in server.cli_json("targets", "members", "same-os")} == ids
    members = server.cli_json("select", "--filter", f"memory.total > {total}")
    assert members == []

    # refresh everything: the server sends the digests it holds, so unchanged classes
    # (the OS, the host name) come back as digests only and keep their data
    out = json.loads(
        server.cli(
            "inventory",
            "refresh",
            "--class",
            "os",
            "--class",
            "hostname",
            "--class",
            "memory",
            "--wait",
            "--json",
        )
    )
    job = server.job(out[0]["job"])
    for r in job["results"]:
        assert "os" in r["result"]["unchanged"] and "hostname" in r["result"]["unchanged"]
        assert "os" not in r["result"]["classes"]
    again = server.cli_json("inventory", "show", agents[0].agent_id)
    assert again["classes"]["os"]["data"] == inv["classes"]["os"]["data"]
    assert again["classes"]["os"]["collected_at"] > inv["classes"]["os"]["collected_at"]


def test_roles_through_the_cli_and_the_audit_log(server, agents):
    viewer = server.cli("apitoken", "create", "val", "--role", "viewer").strip()
    operator = server.cli("apitoken", "create", "otto", "--role", "operator").strip()
    r = cli_as(server, viewer, "run", "ping", "--targets", "all")
    assert r.returncode == 2
    assert "403" in r.stderr and "'viewer'" in r.stderr and "'run'" in r.stderr
    r = cli_as(server, operator, "token", "create")
    assert r.returncode == 2 and "403" in r.stderr and "'operator'" in r.stderr
    r = cli_as(server, operator, "apitoken", "create", "x", "--role", "admin")
    assert r.returncode == 2 and "403" in r.stderr
    r = cli_as(server, operator, "run", "ping", "--targets", agents[0].agent_id, "--wait")
    assert r.returncode == 0, r.stderr
    assert cli_as(server, viewer, "agents", "--json").returncode == 0
    server.cli("apitoken", "revoke", "val")
    r = cli_as(server, viewer, "agents")
    assert r.returncode == 2 and "401" in r.stderr
    # enrollment tokens (tcm token) are unchanged
    assert server.token(uses=1)
    log = server.cli_json("audit", "--since", "1h")
    seen = {(e["actor"], e["action"], e["object"]) for e in log}
    assert ("admin", "apitoken.create", "otto") in seen
    assert ("admin", "apitoken.revoke", "val") in seen
    assert any(e["actor"] == "otto" and e["action"] == "job.create" for e in log)
    # the viewer changed nothing; its refusals (403, then 401 once revoked: no name) are logged
    assert {e["action"] for e in log if e["actor"] == "val"} == {"request.refused"}
    refused = [e for e in log if e["actor"] == "val"]
    assert refused[0]["object"] == "POST /api/v1/jobs" and refused[0]["details"]["status"] == 403
    assert any(
        e["actor"] == "-" and e["object"] == "GET /api/v1/agents" and e["details"]["status"] == 401
        for e in log
    )
    assert "apitoken.create" in server.cli("audit")
