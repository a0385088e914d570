"""Issue 15.1 and 15.7 as an administrator runs them: twistd tcm-server (with
--job-retention), one twistd tcm-agent, and the tcm CLI: filters that name unknown fields,
`not approved`, job listing with filters and pages, a job's results as CSV, refusals in the
audit log and its filters, and output to a closed pipe."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import urllib.request

import pytest

from tcm.cli.api import CLOSED_PIPE, tls_context
from tests.harness import PYTHON, Server

pytestmark = pytest.mark.integration

SERVER_ARGS = ["--job-retention", "2d"]
AGENT_COUNT = 1


def cli_as(server: Server, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "tcm.cli.admin", "--url", server.url, "--ca-cert", server.ca]
        + ["--token", token, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_filters_refuse_unknown_fields_with_a_suggestion(server, agents):
    r = server.cli_result("targets", "create", "typo", "--filter", 'os.famly == "debian"')
    assert r.returncode == 2
    assert "400 bad filter: unknown field 'os.famly' at position 0" in r.stderr
    assert "did you mean 'os.family'?" in r.stderr
    assert '\n  os.famly == "debian"\n  ^' in r.stderr
    r = server.cli_result("select", "--filter", "online and memory.totl > 8GiB")
    assert r.returncode == 2 and "unknown field 'memory.totl' at position 11" in r.stderr
    assert "did you mean 'memory.total'?" in r.stderr
    assert "typo" not in server.cli("targets", "list")

    # a target saved before fields were checked: `tcm run --target` is refused
    with sqlite3.connect(os.path.join(server.state_dir, "tcm.sqlite")) as db:
        db.execute(
            "INSERT INTO targets (name, filter, agents, description, created_at, created_by)"
            " VALUES ('legacy', 'os.famly != \"debian\"', NULL, '', 1.0, 'admin')"
        )
    r = server.cli_result("run", "ping", "--target", "legacy")
    assert r.returncode == 2 and "unknown field 'os.famly'" in r.stderr, r.stderr

    # every documented agent field works; `not approved` selects the agents awaiting approval
    ids = [a.agent_id for a in agents]
    assert server.cli_json("select", "--filter", "not approved") == []
    assert [m["id"] for m in server.cli_json("select", "--filter", "approved")] == ids
    everything = "id ~ '*' and name ~ '*' and platform ~ '*' and online and mode == 'persistent'"
    assert [m["id"] for m in server.cli_json("select", "--filter", everything)] == ids
    assert server.cli_json("select", "--filter", "group == 'none' or last_seen < 0") == []


def test_job_history_pages_filters_and_csv(server, agents):
    agent = agents[0].agent_id
    jobs = [server.cli_json("run", "ping", "--targets", "all", "--wait")["job"] for _ in range(3)]
    cmd = json.dumps({"argv": ["sh", "-c", "exit 3"]})
    failed = server.cli_json("run", "command.run", "--args-json", cmd, "--targets", "all", "--wait")
    r = server.cli_result("jobs", "list", "--limit", "2", "--json")
    first = json.loads(r.stdout)
    assert [j["id"] for j in first] == [failed["job"], jobs[2]]
    assert f"more: tcm jobs list --before {jobs[2]}" in r.stderr
    rest = server.cli_json("jobs", "list", "--before", jobs[2], "--since", "1h")
    assert [j["id"] for j in rest][:2] == [jobs[1], jobs[0]]
    pings = server.cli_json("jobs", "list", "--action", "ping", "--since", "1h")
    assert {j["id"] for j in pings} >= set(jobs) and failed["job"] not in {j["id"] for j in pings}
    assert [j["id"] for j in server.cli_json("jobs", "list", "--state", "failed")] == [
        failed["job"]
    ]
    r = server.cli_result("jobs", "list", "--state", "bogus")
    assert r.returncode == 2 and "'state' must be one of" in r.stderr
    table = server.cli("jobs", "list", "--action", "command.run")
    assert failed["job"] in table and jobs[0] not in table

    # the results as CSV, from the CLI and from the API (both forms)
    rows = list(csv.DictReader(io.StringIO(server.cli("jobs", "show", failed["job"], "--csv"))))
    assert len(rows) == 1 and rows[0]["agent"] == agent and rows[0]["state"] == "failed"
    assert rows[0]["exit_code"] == "3" and rows[0]["name"] and rows[0]["finished_at"]
    token = open(os.path.join(server.state_dir, "admin.token")).read().strip()
    for path in (f"/jobs/{failed['job']}/results.csv", f"/jobs/{failed['job']}?format=csv"):
        req = urllib.request.Request(
            server.url + "/api/v1" + path, headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, context=tls_context(server.ca), timeout=30) as resp:
            assert resp.headers["content-type"].startswith("text/csv")
            body = resp.read().decode()
        assert body.splitlines()[0] == (
            "agent,name,state,delivered_at,started_at,finished_at,exit_code,error"
        )
        assert list(csv.DictReader(io.StringIO(body))) == rows

    # the retention given on the command line is the setting in force
    assert server.cli("settings", "get", "job_retention").strip() == "172800.0"
    r = server.cli_result("settings", "set", "job_retention", "10")
    assert r.returncode == 2 and "job_retention must be 3600" in r.stderr


def test_refusals_in_the_audit_log_and_its_filters(server, agents):
    viewer = server.cli("apitoken", "create", "vera", "--role", "viewer").strip()
    r = cli_as(server, viewer, "targets", "create", "x", "--filter", "online")
    assert r.returncode == 2 and "403" in r.stderr
    assert cli_as(server, "tcm_not-a-token", "agents").returncode == 2
    mine = server.cli_json("audit", "--who", "vera", "--since", "1h")
    assert [(e["action"], e["object"], e["details"]["status"]) for e in mine] == [
        ("request.refused", "POST /api/v1/targets", 403)
    ]
    assert "'viewer'" in mine[0]["details"]["reason"]
    refused = server.cli_json("audit", "--action", "request.refused")
    assert any(e["actor"] == "-" and e["details"]["status"] == 401 for e in refused)
    created = server.cli_json("audit", "--action", "apitoken.create", "--who", "admin")
    assert [e["object"] for e in created][-1] == "vera"
    assert all(e["action"].startswith("apitoken.") for e in server.cli_json("audit", "--action",
                                                                          "apitoken."))  # fmt: skip
    assert "request.refused" in server.cli("audit", "--who", "vera")


def test_output_to_a_closed_pipe_ends_quietly(server, agents):
    for command in (["agents"], ["jobs", "list"]):
        proc = subprocess.Popen(
            [PYTHON, "-m", "tcm.cli.admin", "--state-dir", server.state_dir, *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before the first line (`| head -0`)
        err = proc.stderr.read().decode()
        assert proc.wait(60) == CLOSED_PIPE
        assert err == ""
