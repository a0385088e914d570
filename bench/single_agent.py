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
Each row also has the agent process's memory at the end of its idle window (`agent_rss_mib`,
`agent_uss_mib`, `agent_pss_mib`; the RSS split into `agent_anon_mib`, anonymous memory, and
`agent_file_mib`, pages of mapped files) and its CPU during it (`agent_cpu_pct_idle`, % of one core,
from the kernel's per-thread run time in nanoseconds).

`--idle-only`: the cost of one idle agent (issue 17) and nothing else. The agent enrolls, is
stopped and started again (how it runs after enrollment, at every boot since), opens its
session, sits idle --settle seconds, then its CPU is taken over --idle-window seconds and its
memory at the end. Beside it, the same figures for the floor: a `twistd -n -y` process that
loads only Twisted's reactor, pyOpenSSL and Autobahn's Twisted WebSocket (no tcm code).
The USS of both is lower here than on an endpoint: the server on the same machine maps the
same shared libraries (pages mapped by two processes are not unique to either).

Usage: .venv/bin/python bench/single_agent.py [--window 130] [--jobs 4]
       .venv/bin/python bench/single_agent.py --idle-only [--settle 60] [--idle-window 60]
           [--agent-python /path/to/agent-venv/bin/python]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402
from common import PYTHON, Api, emit  # noqa: E402

from tests.harness import AgentProc, Process, Server, wait_until  # noqa: E402

# What every agent process loads whatever tcm does: twistd, the reactor (which loads pyOpenSSL
# and cryptography), Autobahn's Twisted WebSocket, ClientService, and the lookup of the
# IServiceMaker plugins that twistd does for a subcommand such as tcm-agent (not for -y).
FLOOR_TAC = """\
import autobahn.twisted.websocket
import OpenSSL.SSL
import twisted.application.internet
import twisted.internet.ssl
from twisted.application import service
from twisted.plugin import getPlugins

list(getPlugins(service.IServiceMaker))
application = service.Application("floor")
"""


def status(agent: AgentProc) -> dict:
    r = subprocess.run(
        [PYTHON, "-m", "tcm.cli.agent", "--state-dir", agent.state_dir, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(r.stdout)


def run_ns(pid: int) -> int:
    """CPU time of all the process's threads so far, in ns (/proc/PID/task/*/schedstat)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended; its time is in the process's own figures
    return total


def anonymous_kib(pid: int) -> int:
    """The process's anonymous memory resident (Python's heap, the C heap, relocated data of
    the shared libraries, stacks), from /proc/PID/smaps_rollup; the rest of its RSS is pages
    of files it maps (the interpreter, cryptography's Rust extension, libcrypto...)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise ValueError(f"no Anonymous line in /proc/{pid}/smaps_rollup")


def memory(pid: int) -> dict:
    m = psutil.Process(pid).memory_full_info()
    anonymous = anonymous_kib(pid) * 1024
    return {
        "agent_rss_mib": round(m.rss / 2**20, 1),
        "agent_uss_mib": round(m.uss / 2**20, 1),
        "agent_pss_mib": round(m.pss / 2**20, 1),
        "agent_anon_mib": round(anonymous / 2**20, 1),
        "agent_file_mib": round((m.rss - anonymous) / 2**20, 1),
    }


def usage(pids: list[int], seconds: float) -> list[dict]:
    """CPU of each process over `seconds` (% of one core), then its memory."""
    before = [run_ns(pid) for pid in pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    after = [run_ns(pid) for pid in pids]
    elapsed = time.monotonic() - t0
    return [
        {
            "agent_cpu_pct_idle": round(100 * (a - b) / 1e9 / elapsed, 4),
            **memory(pid),
        }
        for pid, a, b in zip(pids, after, before, strict=True)
    ]


def idle(agent: AgentProc, part: str, seconds: float) -> dict:
    assert agent.proc is not None
    s0 = status(agent)[part]
    (use,) = usage([agent.proc.pid], seconds)
    s1 = status(agent)[part]
    sent = s1["bytes_sent"] - s0["bytes_sent"]
    received = s1["bytes_received"] - s0["bytes_received"]
    return {
        "idle_sent": sent,
        "idle_received": received,
        "idle_kb_per_hour": round((sent + received) * 3600 / seconds / 1024, 1),
        **use,
    }


def compile_tcm() -> str:
    """Compile tcm's modules as the agent's subprocesses will import them (PYTHONPATH too).

    An installed agent has its .pyc files (pip and distribution packages compile at install);
    a source checkout run with PYTHONDONTWRITEBYTECODE (as here) would compile every tcm
    module at each start, and the garbage of compiling stays in the heap: 1 to 2 MiB."""
    where = subprocess.run(
        [PYTHON, "-c", "import os, tcm; print(os.path.dirname(tcm.__file__))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    ).stdout.strip()
    compileall.compile_dir(where, quiet=1)
    return where


def use_python(proc: Process, python: str | None) -> None:
    """Run a harness process's twistd with another interpreter (an agent's own install)."""
    if python:
        proc.executable = python
        proc.args = [
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
        ] + proc.args


def idle_only(settle: float, window: float, python: str | None) -> list[dict]:
    """One idle agent after a restart, and the floor process, measured side by side."""
    with tempfile.TemporaryDirectory(prefix="tcm-idle-") as base:
        server = Server(base)
        server.start()
        tac = os.path.join(base, "floor.tac")
        with open(tac, "w") as f:
            f.write(FLOOR_TAC)
        floor = Process("floor", ["-y", tac], os.path.join(base, "floor.log"))
        agent = AgentProc(base, "agent", server, server.token(uses=1))
        use_python(agent, python)
        use_python(floor, python)
        try:
            agent.start()  # enrolls
            agent.stop()
            agent.start()  # as after every boot: enrolled, straight to its session
            floor.start()
            time.sleep(settle)
            assert agent.proc is not None and floor.proc is not None
            assert floor.alive(), floor.log()[-2000:]
            mine, bare = usage([agent.proc.pid, floor.proc.pid], window)
            state = status(agent)
            assert state["mode"] == "persistent", state["mode"]
        finally:
            floor.stop()
            agent.stop()
            server.stop()
    return [
        {"mode": "persistent, idle", **mine},
        {"mode": "floor (no tcm)", **bare},
    ]


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
    p.add_argument("--idle-only", action="store_true", help="memory and CPU of an idle agent")
    p.add_argument("--settle", type=float, default=60.0)
    p.add_argument("--idle-window", type=float, default=60.0)
    p.add_argument(
        "--agent-python",
        help="the interpreter of another install to run the agent (and the floor) with, "
        "e.g. a venv with the agent's requirements only, as its install package makes",
    )
    args = p.parse_args()
    compile_tcm()
    usage_columns = [
        ("agent_rss_mib", "RSS MiB"),
        ("agent_uss_mib", "USS MiB"),
        ("agent_pss_mib", "PSS MiB"),
        ("agent_anon_mib", "anon MiB"),
        ("agent_file_mib", "file MiB"),
        ("agent_cpu_pct_idle", "CPU % idle"),
    ]
    if args.idle_only:
        emit(
            "single_agent_idle",
            idle_only(args.settle, args.idle_window, args.agent_python),
            [("mode", "process"), *usage_columns],
        )
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcm-one-") as base:
        server = Server(base, extra=["--poll-interval", "60", "--long-poll", "30"])
        server.start()
        agent = AgentProc(base, "agent", server, server.token(uses=1))
        use_python(agent, args.agent_python)
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
            *usage_columns,
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
