"""Inventory at fleet scale (issue 18) with real processes: twistd tcm-server, two twistd
tcm-agent on this machine, and the tcm CLI. A plain `tcm run inventory.collect` carries each
agent's known digests: what did not change comes back as a name only and is stored once;
the data is shown from the inventory store; versions, history and diffs through the CLI."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

AGENT_COUNT = 2
SERVER_ARGS = ["--inventory-history", "2"]

# Classes whose data does not move between two collections a second apart on one machine
# (memory, disks, cpu frequency and users may).
STEADY = {"os", "hostname", "software"}


def collect(server, *classes: str) -> dict:
    args = ["run", "inventory.collect", "--targets", "all", "--wait"]
    if classes:
        args += ["--arg", f"classes={json.dumps(list(classes))}"]
    return server.cli_json(*args)


def test_unchanged_classes_are_skipped_end_to_end(server, agents):
    first = collect(server)
    assert first["counts"]["succeeded"] == 2
    for r in first["results"]:
        assert STEADY <= set(r["result"]["classes"])  # the first time: everything
        assert r["result"]["classes"]["hostname"]["hostname"]  # shown from the store
    second = collect(server)
    assert second["counts"]["succeeded"] == 2
    for r in second["results"]:
        result = r["result"]
        assert STEADY <= set(result["unchanged"]), result["unchanged"]
        assert not STEADY & set(result["classes"])
        assert set(result["inventory"]["unchanged"]) >= STEADY
        assert all(len(d) == 16 for d in result["inventory"]["unchanged"].values())
    # the stored target result is the summary: which classes changed, with digests
    job = server.job(second["job"])
    stored = json.dumps([r["result"]["inventory"] for r in job["results"]])
    assert len(stored) < 2000

    agent = agents[0].agent_id
    shown = server.cli_json("inventory", "show", agent, "--class", "os")
    assert shown["version"] == 1 and shown["data"]["system"]
    history = server.cli_json("inventory", "show", agent, "--history")
    by_class = {}
    for v in history:
        by_class.setdefault(v["class"], []).append(v["version"])
    assert by_class["os"] == [1] and by_class["hostname"] == [1]


def test_a_changed_class_becomes_a_version_with_a_diff(server, agents):
    agent = agents[0].agent_id
    # memory moves between collections on a live machine: collect until it did twice
    versions = 1
    for _ in range(20):
        collect(server, "memory")
        versions = server.cli_json("inventory", "show", agent, "--class", "memory")["version"]
        if versions >= 4:
            break
    assert versions >= 4, "memory data never changed between collections"
    history = server.cli_json("inventory", "show", agent, "--history", "--class", "memory")
    assert [v["version"] for v in history] == [versions, versions - 1, versions - 2]  # 2 kept
    assert history[0]["current"] and history[1]["replaced_at"] is not None
    diff = server.cli_json("inventory", "diff", agent, "--class", "memory")
    assert (diff["from"], diff["to"]) == (versions - 1, versions)
    assert diff["changed"] or diff["added"] or diff["removed"]
    text = server.cli("inventory", "diff", agent, "--class", "memory")
    assert f"version {versions - 1} -> {versions}" in text
    r = server.cli_result("inventory", "diff", agent, "--class", "memory", "--from", "1")
    assert r.returncode == 2 and "404" in r.stderr and "no version 1" in r.stderr
    r = server.cli_result("inventory", "show", agent, "--class", "nope")
    assert r.returncode == 2 and "404" in r.stderr


def test_status_shows_the_store_and_what_retention_keeps(server, agents):
    status = json.loads(server.cli("status"))
    assert status["retention"]["inventory_history"] == 2
    assert status["retention"]["result_bytes_total"] > 0
    assert status["store"]["database_bytes"] > 0
    assert status["store"]["inventory_rows"] > 0
