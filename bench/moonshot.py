#!/usr/bin/env python3
"""As many concurrent agent sessions as this machine holds, toward 100,000: one
`twistd tcm-server`, `twistd tcm-gateway --workers W` (processes sharing the port with
SO_REUSEPORT, each under the 20,000-descriptor limit, each with one link to the server that
carries its sessions), and `tcm-agent swarm` processes (at most 9,000 agents each, over 16
loopback source addresses). Two phases. First every identity is enrolled, straight with
the server, by a few `tcm-agent swarm --enroll-only` processes that hold no session
(--enroll-rate): identities are kept under --work (the state directories in /dev/shm,
linked from --work/n<identities>/swarm), so a later run reuses them and this phase passes
at once. Then the measured phase connects the enrolled agents through the gateway at
--connect-rate (all swarm processes together), with a status line every --watch-every
seconds (sessions, CPU of server, gateway workers and swarms, RSS, the swarms' counts, load).

Measured once every session is open: memory per session on each side (server, gateway
workers, swarms: RSS; for the swarms also less what each process held before its first
agent, and the agents' state directories in /dev/shm, memory outside any RSS), the idle
CPU of the server and gateway processes over --idle seconds (agents ping every 50 s), then
one `ping` job to all: last delivery (agent clock) and all results stored (server clock),
from the job's creation.

Usage: .venv/bin/python bench/moonshot.py [--agents 100000] [--identities N] [--workers 6]
       [--idle 60] [--tls-groups X25519] [--enroll-rate 300] [--connect-rate 200]
       [--swarm-nice 5] [--max-seconds 1800] [--work /tmp/tcm-bench-moonshot]
Heavy: run it under the bench lock. Everything it starts, it stops; every wait is bounded
and the whole run gives up after --max-seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import PER_SWARM, BenchServer, SwarmProcs, cpu_seconds, emit, run_job, summary  # noqa: E402

from tests.harness import GatewayProc  # noqa: E402

PER_WORKER = 19000  # sessions one gateway worker holds (its descriptor limit less headroom)


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            total += cpu_seconds(p)
        except psutil.NoSuchProcess:
            pass
    return total


class Watch:
    """CPU (% of one core, since the last line) and RSS of the server, the gateway workers and
    the swarm processes, the load average and the swarms' own counts: one line per call, so
    that a collapse shows which process starved first."""

    def __init__(self, srv: list, gw: list, swarm: SwarmProcs):
        self.groups: dict[str, list[psutil.Process]] = {"server": srv, "gateway": gw, "swarms": []}
        self.swarm = swarm
        self.t = time.monotonic()
        self.t_start = self.t
        self.cpu = {k: cpu(v) for k, v in self.groups.items()}
        self.cpu_start = dict(self.cpu)

    def procs(self, swarm: SwarmProcs) -> None:
        self.groups["swarms"] = [psutil.Process(p.pid) for p in swarm.procs]
        self.cpu["swarms"] = self.cpu_start["swarms"] = cpu(self.groups["swarms"])

    def mark(self) -> None:
        self.t = time.monotonic()
        self.cpu = {k: cpu(v) for k, v in self.groups.items()}

    def since_start(self) -> dict:
        dt = time.monotonic() - self.t_start
        return {
            f"{k}_cpu_pct": round(100 * (cpu(v) - self.cpu_start[k]) / dt, 1)
            for k, v in self.groups.items()
        }

    def line(self, what: str, sessions: int) -> dict:
        now = time.monotonic()
        dt = max(0.001, now - self.t)
        c = {k: cpu(v) for k, v in self.groups.items()}
        pct = {k: round(100 * (c[k] - self.cpu[k]) / dt, 1) for k in c}
        self.t, self.cpu = now, c
        mem = {k: round(rss(v) / 2**20) for k, v in self.groups.items()}
        st = self.swarm.statuses()
        agg = {
            k: sum(x.get(k, 0) for x in st)
            for k in ("started", "persistent", "http", "disconnected", "reconnect_attempts")
        }
        out = {
            "sessions": sessions,
            "load": os.getloadavg()[0],
            "cpu_pct": pct,
            "rss_mb": mem,
            "swarm": agg,
        }
        print(
            f"[{time.strftime('%H:%M:%S')}] {what}: sessions {sessions}, load "
            f"{out['load']:.1f}, CPU % server {pct['server']} gateway {pct['gateway']} swarms "
            f"{pct['swarms']}, RSS MB {mem}, swarms {agg}",
            flush=True,
        )
        return out


def enroll(args: argparse.Namespace, base: str, server: BenchServer, n: int, left) -> dict:
    """The first phase: every one of the n identities enrolled (those of an earlier run are
    kept and passed), straight with the server, at --enroll-rate, holding no session.
    Enrollment is the dearest thing an agent does (a key, a CSR signed, a full handshake);
    done here apart from the sessions it would otherwise starve."""
    swarm = SwarmProcs(
        base,
        server,
        n,
        server.token(uses=n + 10),
        extra=[
            "--enroll-only",
            "--enroll-rate",
            str(args.enroll_rate / args.enroll_processes),
            "--enroll-concurrency",
            str(args.enroll_concurrency),
            "--backoff-max",
            "10",
        ],
        nice=args.swarm_nice,
        processes=args.enroll_processes,
    )
    t0 = time.monotonic()
    swarm.start()
    try:
        codes: list = [None]
        st: list[dict] = []
        while None in codes:
            codes = swarm.wait(min(args.watch_every, left()))
            st = swarm.statuses("enroll")  # after the last wait: every process's last counts
            now = sum(x["enrolled"] for x in st)
            print(
                f"[{time.strftime('%H:%M:%S')}] enroll {time.monotonic() - t0:6.0f} s: "
                f"{now} enrolled now ({now / (time.monotonic() - t0):.0f}/s), "
                f"{sum(x['already'] for x in st)} already, {sum(x['failed'] for x in st)} "
                f"failed, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        swarm.stop()
    done = {
        "seconds": round(time.monotonic() - t0, 1),
        "enrolled_now": sum(x["enrolled"] for x in st),
        "already": sum(x["already"] for x in st),
        "failed": sum(x["failed"] for x in st),
        "exit_codes": codes,
    }
    if done["enrolled_now"]:
        done["per_s"] = round(done["enrolled_now"] / done["seconds"], 1)
    if any(codes):
        raise RuntimeError(f"enrollment incomplete: {done}")
    return done


def measure(args: argparse.Namespace) -> dict:
    started = time.monotonic()

    def left() -> float:
        remaining = args.max_seconds - (time.monotonic() - started)
        if remaining <= 0:
            raise TimeoutError(f"moonshot gave up after {args.max_seconds} s")
        return remaining

    n = args.agents
    workers = args.workers or max(1, -(-n // PER_WORKER))
    # the identities' pool: a run of fewer agents may use (and enroll) the first ones of a
    # larger pool's work directory, whose server knows them
    base = os.path.join(args.work, f"n{max(n, args.identities)}")
    os.makedirs(base, exist_ok=True)
    tls = ["--tls-groups", args.tls_groups] if args.tls_groups else []
    server = BenchServer(base, extra=["--name", "bench", *tls])
    server.start()
    gw = GatewayProc(
        base,
        "gw",
        {"s": server},
        extra=["--max-clients", str(PER_WORKER), "--workers", str(workers), *tls],
    )
    swarm: SwarmProcs | None = None
    row: dict = {"agents": n, "gateway_workers": workers, "tls_groups": args.tls_groups}
    try:
        gw.start()
        time.sleep(2)  # the other workers start after the first one's links are up
        gw_procs = [psutil.Process(gw.proc.pid)]  # type: ignore[union-attr]
        gw_procs += gw_procs[0].children()
        srv = [server.ps()]
        row["enroll"] = enroll(args, base, server, n, left)
        if args.enroll_only:
            return row
        rss_server0, rss_gw0 = rss(srv), rss(gw_procs)  # after the signing's heap
        # The measured phase: enrolled agents only, started at --connect-rate (all swarm
        # processes together): the swarms' handshakes, the gateway workers' and the server's
        # share the two cores with the sessions already open, whose keepalives must still be
        # answered in time.
        processes = -(-n // PER_SWARM)
        swarm = SwarmProcs(
            base,
            server,
            n,
            server.token(uses=1),  # unused: every agent is enrolled
            extra=[
                "--backoff-max",
                str(args.backoff_max),
                *(
                    ["--keepalive-timeout", str(args.agent_ping_timeout)]
                    if args.agent_ping_timeout
                    else []
                ),
            ],
            url=gw.url,
            nice=args.swarm_nice,
            rate=args.connect_rate / processes,
        )
        watch = Watch(srv, gw_procs, swarm)
        t0 = time.monotonic()
        swarm.start()
        watch.procs(swarm)
        sessions = 0
        peak = 0
        next_line = t0
        # one deadline, fixed now (the time left must not be compared with the time elapsed)
        connect_deadline = t0 + min(left(), args.connect_timeout)
        while time.monotonic() < connect_deadline:
            sessions = server.status()["sessions"]
            peak = max(peak, sessions)
            if time.monotonic() >= next_line:
                watch.line(f"connect {time.monotonic() - t0:6.0f} s", sessions)
                next_line += args.watch_every
            if sessions >= n:
                break
            time.sleep(2)
        row["connect_s"] = round(time.monotonic() - t0, 1)
        row["connect_rate"] = args.connect_rate
        row["sessions"] = sessions
        row["peak_sessions"] = peak
        row["connect_cpu"] = watch.since_start()
        time.sleep(min(10, left()))  # settle: hellos and their writes done, heap settled
        swarm_procs = [psutil.Process(p.pid) for p in swarm.procs]
        row["server_rss_mb"] = round(rss(srv) / 2**20, 1)
        row["gateway_rss_mb"] = round(rss(gw_procs) / 2**20, 1)
        row["swarm_rss_mb"] = round(rss(swarm_procs) / 2**20, 1)
        if sessions:
            row["server_kb_per_session"] = round((rss(srv) - rss_server0) / sessions / 1024, 1)
            row["gateway_kb_per_session"] = round((rss(gw_procs) - rss_gw0) / sessions / 1024, 1)
            # the swarm processes' RSS / agents, the same less what each process held
            # before its first agent (what one more agent costs), and the agents' state
            # directories in /dev/shm (the machine's memory, but no process's RSS)
            swarm_mem = swarm.rss_per_agent(sessions)
            row["swarm_kb_per_agent"] = swarm_mem["total_kb"]
            row["swarm_marginal_kb_per_agent"] = swarm_mem["marginal_kb"]
            row["swarm_state_kb_per_agent"] = swarm_mem.get("state_kb")
        c0 = cpu(srv + gw_procs)
        window = min(args.idle, left())
        watch.mark()
        time.sleep(window)
        row["idle"] = watch.line("idle", server.status()["sessions"])
        row["idle_cpu_pct_server_and_gateway"] = round(100 * (cpu(srv + gw_procs) - c0) / window, 2)
        row["idle_window_s"] = window
        if sessions:
            watch.mark()
            job = run_job(
                server.api(),
                {"action": "ping", "targets": "all", "ttl": 300},
                sessions,
                min(240, left()),
                cpu_of=server.ps(),
            )
            row["push"] = summary(job["received"])
            row["push_last_s"] = row["push"]["last"]
            row["all_stored_s"] = max(job["stored"]) if job["stored"] else None
            row["succeeded"] = job["counts"]["succeeded"]
            row["push_server_cpu_s"] = job["server_cpu_s"]
            row["push_watch"] = watch.line("push", server.status()["sessions"])
            row["server_cpu_per_result_ms"] = (
                round(1000 * job["server_cpu_s"] / job["counts"]["succeeded"], 3)
                if job["counts"]["succeeded"]
                else None
            )
    finally:
        if swarm is not None:
            swarm.stop()
        gw.stop(timeout=30)
        server.stop(timeout=30)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=100000)
    p.add_argument("--workers", type=int, default=0, help="gateway workers (0: agents/19,000)")
    p.add_argument("--idle", type=float, default=60.0)
    p.add_argument(
        "--identities",
        type=int,
        default=0,
        help="the pool of identities whose work directory (n<identities>) to use, of which "
        "the first --agents are enrolled and connected (default: --agents)",
    )
    p.add_argument(
        "--enroll-rate",
        type=float,
        default=300.0,
        help="agents enrolling per second, all enrolling processes together (first phase)",
    )
    p.add_argument("--enroll-processes", type=int, default=2)
    p.add_argument(
        "--enroll-only", action="store_true", help="the first phase only: enroll, then stop"
    )
    p.add_argument(
        "--enroll-concurrency", type=int, default=32, help="enrollments in flight per process"
    )
    p.add_argument(
        "--connect-rate",
        type=float,
        default=200.0,
        help="enrolled agents starting their session per second, all swarm processes together",
    )
    p.add_argument("--backoff-max", type=float, default=30.0, help="the agents' reconnect backoff")
    p.add_argument(
        "--agent-ping-timeout",
        type=float,
        default=0,
        help="seconds an agent waits for a pong before it drops its session (0: the agent's "
        "20 s); a swarm process answering a push for 8,000 agents lags longer than that",
    )
    p.add_argument("--watch-every", type=float, default=30.0, help="seconds between status lines")
    p.add_argument("--swarm-nice", type=int, default=5, help="the swarm processes' niceness")
    p.add_argument("--tls-groups", default=None)
    p.add_argument("--connect-timeout", type=float, default=900.0)
    p.add_argument("--max-seconds", type=float, default=1800.0)
    p.add_argument("--work", default="/tmp/tcm-bench-moonshot")
    args = p.parse_args()
    row = measure(args)
    emit(
        "moonshot",
        [row],
        [
            ("agents", "agents"),
            ("sessions", "sessions"),
            ("gateway_workers", "gw workers"),
            ("connect_s", "connect s"),
            ("server_kb_per_session", "server KB/s"),
            ("gateway_kb_per_session", "gateway KB/s"),
            ("swarm_kb_per_agent", "swarm KB/agent"),
            ("swarm_marginal_kb_per_agent", "marginal"),
            ("swarm_state_kb_per_agent", "state KB"),
            ("idle_cpu_pct_server_and_gateway", "idle CPU %"),
            ("push_last_s", "last delivery s"),
            ("all_stored_s", "all stored s"),
            ("succeeded", "ok"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
