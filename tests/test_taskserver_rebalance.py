"""Task-server failover and rebalancing with real processes: twistd tcm-server (at most one
agent moved a second), two twistd tcm-taskserver, four agents. One task server stops and
returns: its agents move away and come back, one a second, and each says why; `tcm
taskservers` shows when and why each task server last changed. Then one is removed."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.harness import PYTHON, Server, TaskServerProc, agent_status, start_agents, wait_until

pytestmark = pytest.mark.integration

TASK_OPEN = "task session open with"
STEP = re.compile(r"rebalancing: moved (\d+) agents")


def listing(server: Server) -> dict[str, dict]:
    return {t["name"]: t for t in server.cli_json("taskservers")}


def status_text(agent) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "tcm.cli.agent", "--state-dir", agent.state_dir, "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def on(agents) -> dict[str, str | None]:
    return {a.agent_id: agent_status(a)["task"]["task_server"] for a in agents}


def test_agents_move_away_and_back_at_a_bounded_rate(stack):
    base, add = stack
    server = add(Server(str(base), extra=["--taskserver-rebalance-rate", "1"]))
    server.start()
    ts1 = add(TaskServerProc(str(base), "ts1", server))
    ts2 = add(TaskServerProc(str(base), "ts2", server))
    ts1.start()
    ts2.start()
    agents = [add(a) for a in start_agents(str(base), server, 4)]
    for a in agents:
        wait_until(lambda a=a: a.count(TASK_OPEN) >= 1, 30, 0.05, f"{a.name} task session")
    first = on(agents)
    assert sorted(first.values()) == ["ts1", "ts1", "ts2", "ts2"]
    homes = [a for a in agents if first[a.agent_id] == "ts1"]
    assert listing(server)["ts1"]["reason"] == "joined"

    # ts1 stops: its two agents move to ts2 at once, and say why
    ts1.stop()
    for a in homes:
        st = wait_until(
            lambda a=a: (lambda t: t if t["task_server"] == "ts2" else None)(
                agent_status(a)["task"]
            ),
            30,
            0.1,
            f"{a.name} moved to ts2",
        )
        assert re.fullmatch(
            r"moved to ts2: ts1 went down at \d\d:\d\d:\d\d UTC", st["assignment"]
        ), st
    assert "moved to ts2: ts1 went down at" in status_text(homes[0])
    down = listing(server)["ts1"]
    assert (down["state"], down["reason"]) == ("down", "link lost") and down["since"]
    text = server.cli("taskservers")
    assert "SINCE" in text.splitlines()[0] and "REASON" in text.splitlines()[0]
    assert "link lost" in text

    # ts1 returns: its agents come back, one a second (the server's rate), and say why
    ts1.start()
    for a in homes:
        wait_until(
            lambda a=a: agent_status(a)["task"]["task_server"] == "ts1",
            30,
            0.1,
            f"{a.name} back on ts1",
        )
    back = listing(server)
    assert back["ts1"]["reason"] == "returned" and back["ts1"]["since"] > down["since"]
    assert (back["ts1"]["assigned"], back["ts2"]["assigned"]) == (2, 2)
    steps = [int(n) for n in STEP.findall(server.log())]
    assert steps == [1, 1], steps  # bounded: one agent per step, one step a second
    for a in homes:
        assert agent_status(a)["task"]["assignment"] == (
            "moved back to ts1: rebalancing after ts1 returned"
        )
    assert "moved back to ts1: rebalancing after ts1 returned" in status_text(homes[0])
    assert on(agents) == first  # the others never moved

    # ts2 removed: refused from now on, its link closed, its agents moved to ts1
    assert "ts2 removed" in server.cli("taskservers", "remove", "ts2")
    others = [a for a in agents if a not in homes]
    for a in others:
        wait_until(
            lambda a=a: agent_status(a)["task"]["task_server"] == "ts1",
            30,
            0.1,
            f"{a.name} moved off the removed ts2",
        )
        assert "ts2 was removed at" in agent_status(a)["task"]["assignment"]
    gone = listing(server)["ts2"]
    assert (gone["state"], gone["reason"]) == ("revoked", "was removed")
    wait_until(lambda: "node 'ts2' is revoked" in server.log(), 30, 0.2, "ts2 refused")
    assert "taskserver.remove" in server.cli("audit")
