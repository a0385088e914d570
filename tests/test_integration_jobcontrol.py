"""Taking back and checking what an administrator sends, with real processes: twistd
tcm-server, two twistd tcm-agent, the tcm CLI (issue 15 points 2-4 and its smaller points,
issue 16 point 6).
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.integration

AGENT_COUNT = 2


def group_survivors(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def api(server):
    from tcm.cli.api import Api

    with open(os.path.join(server.state_dir, "admin.token")) as f:
        return Api(server.url, server.ca, f.read().strip())


def output_of(server, job_id: str) -> dict[str, str]:
    """Each agent's streamed output so far."""
    out: dict[str, str] = {}
    for chunk in api(server).call("GET", f"/jobs/{job_id}/output?after=0")["output"]:
        out[chunk["agent_id"]] = out.get(chunk["agent_id"], "") + chunk["text"]
    return out


def test_actions_lists_what_agents_advertise(server, agents):
    listed = {a["name"]: a for a in server.cli_json("actions")}
    assert {"ping", "inventory.collect", "command.run"} <= set(listed)
    assert listed["command.run"]["agents"] == AGENT_COUNT
    assert listed["command.run"]["task"] is True
    assert "argv" in listed["command.run"]["schema"]["required"]
    text = server.cli("actions")
    assert "command.run" in text and "argv*" in text


def test_unknown_action_is_refused_listing_the_known_ones(server, agents):
    r = server.cli_result("run", "pign", "--targets", "all")
    assert r.returncode == 2
    assert "400" in r.stderr and "no enrolled agent has action 'pign'" in r.stderr
    assert "ping" in r.stderr and "command.run" in r.stderr
    assert all(j["action"] != "pign" for j in server.cli_json("jobs", "list"))


def test_arguments_failing_the_schema_are_refused_naming_the_field(server, agents):
    r = server.cli_result("run", "command.run", "--arg", "argv=5", "--targets", "all")
    assert r.returncode == 2
    assert "400" in r.stderr and 'argv: 5 is not of type "array"' in r.stderr
    r = server.cli_result("run", "command.run", "--arg", "argvv=[]", "--targets", "all")
    assert r.returncode == 2 and "400" in r.stderr


def test_arg_that_looks_like_json_but_does_not_parse_is_a_cli_error(server, agents):
    before = len(server.cli_json("jobs", "list"))
    r = server.cli_result("run", "command.run", "--arg", "argv=[uname", "--targets", "all")
    assert r.returncode == 2
    assert "--arg argv" in r.stderr and "does not parse" in r.stderr
    assert len(server.cli_json("jobs", "list")) == before  # nothing was sent


def test_unknown_agent_ids_are_named(server, agents):
    r = server.cli_result("run", "ping", "--targets", f"{agents[0].agent_id},nosuch-1,nosuch-2")
    assert r.returncode == 2
    assert "unknown agent ids: nosuch-1, nosuch-2" in r.stderr


def test_follow_of_a_finished_failed_job_returns_at_once_nonzero(server, agents):
    argv = json.dumps(["sh", "-c", "echo out; exit 3"])
    job_id = server.cli(
        "run", "command.run", "--arg", f"argv={argv}", "--targets", "all", "--wait", "--json"
    )
    job_id = json.loads(job_id)["job"]
    started = time.monotonic()
    r = server.cli_result("jobs", "follow", job_id)
    took = time.monotonic() - started
    assert r.returncode == 1
    assert took < 5  # not the 10 s long-poll of a job that ended long ago
    assert r.stdout.count("out") == AGENT_COUNT
    ok = server.cli("run", "ping", "--targets", "all", "--wait", "--json")
    r = server.cli_result("jobs", "follow", json.loads(ok)["job"])
    assert r.returncode == 0


def test_cancel_ends_waiting_and_running_targets(base, server, agents):
    away, busy = agents[1], agents[0]
    away.stop()
    wait_until(lambda: not _online(server, away.agent_id), 15, 0.1, "agent to be offline")
    gate = os.path.join(base, "never-opened")
    ran = os.path.join(base, "ran-on-away-agent")
    script = f'echo $$; touch "{ran}.$$"; while [ ! -e "{gate}" ]; do sleep 0.05; done'
    args = json.dumps({"argv": ["sh", "-c", script]})
    job_id = server.cli_json("run", "command.run", "--args-json", args, "--targets", "all")["job"]

    def busy_runs() -> bool:
        return output_of(server, job_id).get(busy.agent_id, "").strip() != ""

    wait_until(busy_runs, 30, 0.1, "the task to run on the connected agent")
    pgid = int(output_of(server, job_id)[busy.agent_id].split()[0])
    assert group_survivors(pgid)
    job = server.job(job_id)
    assert job["counts"]["running"] == 1 and job["counts"]["not_connected"] == 1

    out = server.cli_json("jobs", "cancel", job_id)
    assert out["canceled"] == [away.agent_id]  # not started: canceled at once
    assert out["stopping"] == [busy.agent_id]
    assert server.job(job_id)["counts"]["canceled"] >= 1

    def all_canceled() -> bool:
        return server.job(job_id)["counts"]["canceled"] == AGENT_COUNT

    wait_until(all_canceled, 15, 0.1, "the running target to end canceled")
    wait_until(lambda: not group_survivors(pgid), 10, 0.1, "the command's group to end")
    results = {r["agent"]: r for r in server.job(job_id)["results"]}
    assert results[busy.agent_id]["error"].startswith("canceled")
    assert results[away.agent_id]["error"].startswith("canceled")

    # the agent that was away comes back: the canceled job is never delivered to it
    away.start()
    time.sleep(1.0)
    ran_on = [n for n in os.listdir(base) if n.startswith("ran-on-away-agent.")]
    assert ran_on == [f"ran-on-away-agent.{pgid}"]  # only the busy agent's run
    assert server.job(job_id)["counts"]["canceled"] == AGENT_COUNT
    entries = server.cli_json("audit")
    assert any(e["action"] == "job.cancel" and e["object"] == job_id for e in entries)
    # following a canceled job says it did not succeed
    assert server.cli_result("jobs", "follow", job_id).returncode == 1


def test_cancel_of_some_agents_only(base, server, agents):
    gate = os.path.join(base, "gate-some")
    job_id = server.gated_task(gate)
    wait_until(
        lambda: server.job(job_id)["counts"]["running"] == AGENT_COUNT, 30, 0.1, "both running"
    )
    out = server.cli_json("jobs", "cancel", job_id, "--agents", agents[0].agent_id)
    assert out["stopping"] == [agents[0].agent_id] and out["canceled"] == []
    wait_until(lambda: server.job(job_id)["counts"]["canceled"] == 1, 15, 0.1, "one canceled")
    open(gate, "w").close()
    wait_until(lambda: server.job(job_id)["counts"]["succeeded"] == 1, 15, 0.1, "other done")
    r = server.cli_result("jobs", "cancel", job_id, "--agents", "nosuch")
    assert r.returncode == 2 and "nosuch" in r.stderr


def test_a_killed_agent_leaves_no_command_running(base, server, agents):
    agent = agents[0]
    marker = os.path.join(base, "touched-after-agent-died")
    # the command and a child of it: both must end with the agent
    script = f'echo $$; (sleep 3; touch "{marker}.child") & sleep 3; touch "{marker}"'
    argv = json.dumps(["sh", "-c", script])
    job_id = server.cli("run", "command.run", "--arg", f"argv={argv}", "--targets", agent.agent_id)
    job_id = job_id.strip()
    wait_until(
        lambda: output_of(server, job_id).get(agent.agent_id, "").strip() != "",
        30,
        0.1,
        "the command to start",
    )
    pgid = int(output_of(server, job_id)[agent.agent_id].split()[0])
    assert len(group_survivors(pgid)) >= 2  # sh, its subshell and the sleeps
    agent.signal(signal.SIGKILL)
    agent.proc.wait(10)  # type: ignore[union-attr]
    wait_until(lambda: not group_survivors(pgid), 5, 0.05, "the command's group to end")
    time.sleep(3.5)  # past the moment the command would have touched its files
    assert not os.path.exists(marker)
    assert not os.path.exists(marker + ".child")
    agent.start()
    # the restarted agent reports the job it lost as interrupted
    wait_until(
        lambda: server.job(job_id)["counts"]["failed"] == 1, 30, 0.1, "the job to end failed"
    )
    assert "interrupted" in server.job(job_id)["results"][0]["error"]


def _online(server, agent_id: str) -> bool:
    return any(a["id"] == agent_id and a["online"] for a in server.agents())


def test_cancel_reaches_a_task_through_its_task_server(stack):
    """The all-in-one: the task runs on the agent's task session through the embedded task
    server, and the cancel goes the same way."""
    from tests.harness import Server, agent_status, start_agents

    base, add = stack
    server = add(Server(str(base), name="tcm", plugin="tcm"))
    server.start()
    (agent,) = [add(a) for a in start_agents(str(base), server, 1)]
    wait_until(lambda: agent.count("task session open") >= 1, 30, 0.05, "the agent's task session")
    assert agent_status(agent)["task"]["task_server"] == "local"
    args = json.dumps({"argv": ["sh", "-c", "echo $$; exec sleep 60"]})
    job_id = server.cli_json("run", "command.run", "--args-json", args, "--targets", "all")["job"]
    wait_until(
        lambda: output_of(server, job_id).get(agent.agent_id, "").strip() != "",
        30,
        0.1,
        "the task to run",
    )
    pgid = int(output_of(server, job_id)[agent.agent_id].split()[0])
    out = server.cli_json("jobs", "cancel", job_id)
    assert out["stopping"] == [agent.agent_id]
    wait_until(lambda: server.job(job_id)["counts"]["canceled"] == 1, 15, 0.1, "the task canceled")
    wait_until(lambda: not group_survivors(pgid), 10, 0.1, "the command's group to end")
