#!/usr/bin/env python3
"""One agent in each connection mode: how soon a job reaches it, and what an idle hour costs.

One real `twistd tcm-agent` against a real `twistd tcm-server`, switched between modes:

  persistent   WebSocket session (pings at the default 50 s keepalive)
  long-poll    HTTPS polls held by the server up to 30 s, sent again at once when answered
  poll-60s     HTTPS polls every 60 s (the legacy way)

Latency: job creation (server clock) to the agent receiving the request (agent clock, same
machine), over --jobs jobs created at random moments. Idle bytes: the agent counts its
connections' bytes below TLS (records, handshakes, HTTP included) and reports them in
`tcm-agent status --json`; read at the start and end of an idle window, scaled to an hour.

Usage: .venv/bin/python bench/single_agent.py [--window 130] [--jobs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PYTHON, Api, emit  # noqa: E402

from tests.harness import AgentProc, Server, wait_until  # noqa: E402


def status(agent: AgentProc) -> dict:
    r = subprocess.run(
        [PYTHON, "-m", "tcm.cli.agent", "--state-dir", agent.state_dir, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(r.stdout)


def idle(agent: AgentProc, part: str, seconds: float) -> dict:
    s0 = status(agent)[part]
    time.sleep(seconds)
    s1 = status(agent)[part]
    sent = s1["bytes_sent"] - s0["bytes_sent"]
    received = s1["bytes_received"] - s0["bytes_received"]
    return {
        "idle_sent": sent,
        "idle_received": received,
        "idle_kb_per_hour": round((sent + received) * 3600 / seconds / 1024, 1),
    }


def latency(server: Server, agent: AgentProc, jobs: int, spread: float) -> dict:
    with open(os.path.join(server.state_dir, "admin.token")) as f:
        api = Api(server.url, server.ca, f.read().strip())
    values = []
    for _ in range(jobs):
        time.sleep(random.uniform(0, spread))  # a random moment in the agent's poll cycle
        out = server.cli_json(
            "run", "ping", "--targets", agent.agent_id, "--wait", "--wait-timeout", "120"
        )
        job = api.call("GET", f"/jobs/{out['job']}")
        values.append(job["results"][0]["received_at"] - job["created_at"])
    return {
        "latency_median_s": round(statistics.median(values), 3),
        "latency_max_s": round(max(values), 3),
        "jobs": jobs,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--window", type=float, default=130.0)
    p.add_argument("--jobs", type=int, default=4)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcm-one-") as base:
        server = Server(base, extra=["--poll-interval", "60", "--long-poll", "30"])
        server.start()
        agent = AgentProc(base, "agent", server, server.token(uses=1))
        agent.start()
        try:
            time.sleep(3)
            row = {"mode": "persistent", **latency(server, agent, args.jobs, 2)}
            rows.append({**row, **idle(agent, "persistent", args.window)})
            server.cli("settings", "set", "long_poll", "30")
            server.cli("settings", "set", "persistent_connections", "false")
            wait_until(lambda: status(agent)["http"]["last_poll_ok"], 30, 0.5, "polling")
            time.sleep(2)
            row = {"mode": "long-poll", **latency(server, agent, args.jobs, 10)}
            rows.append({**row, **idle(agent, "http", args.window)})
            server.cli("settings", "set", "long_poll", "0")
            time.sleep(35)  # the held poll returns; the answers now say: no long-polls
            row = {"mode": "poll-60s", **latency(server, agent, args.jobs, 60)}
            rows.append({**row, **idle(agent, "http", args.window)})
        finally:
            agent.stop()
            server.stop()
    base_kb = rows[0]["idle_kb_per_hour"]
    for r in rows:
        r["idle_vs_persistent"] = round(r["idle_kb_per_hour"] / base_kb, 1) if base_kb else None
    emit(
        "single_agent",
        rows,
        [
            ("mode", "mode"),
            ("latency_median_s", "latency median s"),
            ("latency_max_s", "max s"),
            ("idle_kb_per_hour", "idle KB/hour"),
            ("idle_vs_persistent", "x persistent"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
