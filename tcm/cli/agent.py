"""`tcm-agent`: look at and control the agent on this machine (the Network Status).

`status`, `disconnect` and `reconnect` talk to the running agent over the control socket in
its state directory (only its own user can open it); `info` reads the state directory alone.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from tcm.agent import CONTROL_SOCKET
from tcm.cli.api import CliError, closed_pipe, tls_context


class ControlError(Exception):
    pass


def control(state_dir: str, command: str, timeout: float = 10.0) -> dict[str, Any]:
    """Send one command to the running agent; its JSON answer."""
    path = os.path.join(state_dir, CONTROL_SOCKET)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        raise ControlError(f"no agent running with state directory {state_dir}") from None
    except PermissionError:
        raise ControlError(f"not allowed to open {path} (run as the agent's user)") from None
    except OSError as e:
        raise ControlError(f"cannot reach the agent at {path}: {e.strerror}") from None
    with s:
        s.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "the agent refused the command"))
    return answer


def _ago(t: float | None) -> str:
    if not t:
        return "never"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))} ({time.time() - t:.0f} s ago)"


def _size(n: int) -> str:
    return f"{n / 1024:.2f} KB" if n >= 1024 else f"{n} B"


def _when(t: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def print_status(st: dict[str, Any]) -> None:
    p, h = st["persistent"], st["http"]
    print("Network Status")
    print(f"  Agent:              {st['agent_id']}")
    print(f"  Server:             {st['server']}")
    print(f"  Proxy:              {st['proxy'] or 'none'}")
    mode = {"persistent": "Persistent", "http": "HTTP (polling)", "disconnected": "Disconnected"}[
        st["mode"]
    ]
    print(f"  Server connection:  {mode}, since {_ago(st['mode_since'])}")
    if p["connected"]:
        tls = p["tls"] or {}
        print(f"  Cryptographic protocol: {tls.get('version')}")
        print(f"  Cipher suite:       {tls.get('cipher')}")
        print(f"  Connected since:    {_ago(p['connected_since'])}")
        print(f"  Sent:               {_size(p['bytes_sent'])}")
        print(f"  Received:           {_size(p['bytes_received'])}")
    if p["disabled_by_user"]:
        print("  Persistent connection terminated here (tcm-agent reconnect to allow it)")
    print(
        f"  Last poll:          {_ago(h['last_poll'])}"
        + (f" (error: {h['last_error']})" if h["last_error"] else "")
    )
    if st["mode"] == "http" or h.get("bytes_sent"):
        # the HTTPS calls' counted traffic (polls, results, output) since the agent started
        print(f"  Sent over HTTPS:    {_size(h.get('bytes_sent') or 0)}")
        print(f"  Received over HTTPS: {_size(h.get('bytes_received') or 0)}")
    print(
        f"  Reconnect attempts: {st['reconnect_attempts']}"
        + (f" (last: {st['last_refusal']})" if st["last_refusal"] else "")
    )
    cert = st.get("certificate")
    if cert:
        until = _when(cert["not_after"])
        print(f"  Certificate:        serial {cert['serial']}, valid until {until}")
        if cert.get("last_error"):
            print(f"    {cert['last_error']}")
    t = st.get("task")
    if t is not None:
        print("Task Server Connection")
        print(f"  Task server:        {t['task_server'] or 'none'} ({t['assignment']})")
        if t["url"]:
            print(f"  Address:            {t['url']}")
        if t["connected"]:
            tls = t["tls"] or {}
            print("  State:              Connected")
            print(f"  Cryptographic protocol: {tls.get('version')}")
            print(f"  Connected since:    {_ago(t['connected_since'])}")
            print(f"  Sent:               {_size(t['bytes_sent'])}")
            print(f"  Received:           {_size(t['bytes_received'])}")
        elif t["url"]:
            print("  State:              Connecting")
        print(
            f"  Reconnect attempts: {t['reconnect_attempts']}"
            + (f" (last: {t['last_refusal']})" if t["last_refusal"] else "")
        )
    print(f"  Results waiting:    {st['results_waiting']}")
    print(f"  Jobs running:       {st['jobs_running']}")
    profile = st.get("profile")
    if profile and profile.get("name"):
        print(f"  Connection profile: {profile['name']} v{profile['version']}")
        if profile.get("stored_only"):
            print(f"    stored, not applied: {', '.join(profile['stored_only'])}")
    else:
        print("  Connection profile: none (command-line settings)")
    if profile and profile.get("error"):
        print(f"    {profile['error']}")
    for name, policy in (st.get("policies") or {}).items():
        why = f": {policy['error']}" if policy.get("error") else ""
        print(
            f"  Policy {name} ({policy.get('type')}) v{policy['version']}: {policy['state']}{why}"
        )


def agent_info(state_dir: str) -> dict[str, Any]:
    """What the state directory says about the agent: identity, server, spool."""
    meta_path = os.path.join(state_dir, "agent.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return {"enrolled": False, "state_dir": state_dir}
    counts: dict[str, int] = {}
    jobs_dir = os.path.join(state_dir, "jobs")
    if os.path.isdir(jobs_dir):
        for name in os.listdir(jobs_dir):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(jobs_dir, name)) as f:
                    state = json.load(f).get("state", "?")
            except (OSError, ValueError):
                state = "unreadable"
            counts[state] = counts.get(state, 0) + 1
    return {
        "enrolled": True,
        "state_dir": state_dir,
        "agent_id": meta.get("agent_id"),
        "server": meta.get("server"),
        "results_waiting": counts.get("finished", 0),
        "jobs": counts,
    }


def main(argv: list[str] | None = None) -> int:
    """`tcm-agent`: its commands, with a quiet stop when the reader of the output goes away."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except BrokenPipeError:
        return closed_pipe()


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcm-agent", description="The tcm agent on this machine.")
    p.add_argument(
        "--state-dir", default=os.environ.get("TCM_AGENT_STATE_DIR", "/var/lib/tcm-agent")
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="identity, server and spool from the state directory")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="the running agent's Network Status")
    s.add_argument("--json", action="store_true")
    sub.add_parser("disconnect", help="terminate the persistent connection (stay on HTTPS)")
    sub.add_parser("reconnect", help="allow the persistent connection again")
    s = sub.add_parser("swarm", help="run many real agents in this process (load tests)")
    s.add_argument("--count", type=int, required=True, help="number of agents")
    s.add_argument(
        "--server",
        action="append",
        help="server URL (needed to enroll); again for the other nodes of a cluster, tried in "
        "turn after the first",
    )
    s.add_argument("--ca-cert", help="server CA certificate (needed to enroll)")
    s.add_argument("--token", help="enrollment token with at least --count uses")
    s.add_argument("--source-addresses", help="e.g. 127.0.0.2-127.0.0.9 (loopback only)")
    s.add_argument(
        "--state-dir",
        dest="swarm_state_dir",
        default="./swarm-state",
        help="one subdirectory per agent (kept: a second run reconnects)",
    )
    s.add_argument(
        "--first",
        type=int,
        default=0,
        help="number of the first agent (to run several swarm processes on one state directory)",
    )
    s.add_argument("--rate", type=float, default=500.0, help="agents started per second")
    s.add_argument(
        "--enroll-rate",
        type=float,
        default=200.0,
        help="agents started per second while they still have to enroll (CSR signing is the "
        "server's dearest request: several swarm processes share what it can sign)",
    )
    s.add_argument(
        "--enroll-only",
        action="store_true",
        help="only enroll the agents not enrolled yet (at --enroll-rate), hold no session, "
        "and exit: 0 once all are enrolled (a benchmark's first phase)",
    )
    s.add_argument(
        "--enroll-concurrency",
        type=int,
        default=64,
        help="with --enroll-only: enrollments in flight at most",
    )
    s.add_argument(
        "--keepalive",
        type=float,
        default=None,
        help="seconds between pings (default: as the server says)",
    )
    s.add_argument(
        "--keepalive-timeout",
        type=float,
        default=None,
        help="seconds an agent waits for its ping's answer before it drops the session "
        "(default: the agent's, 20)",
    )
    s.add_argument("--backoff-max", type=float, default=60.0)
    s.add_argument(
        "--inventory-packages",
        type=int,
        default=0,
        help="give each agent an inventory of its own with this many packages (benchmarks; "
        "default: this machine's real inventory)",
    )
    s.add_argument("--duration", type=float, help="stop after this many seconds")
    s.add_argument("--verbose", action="store_true", help="every agent's info log lines")
    args = p.parse_args(argv)
    if args.command == "swarm":
        from tcm.agent import swarm

        args.state_dir = args.swarm_state_dir
        try:
            args.source_addresses and swarm.parse_sources(args.source_addresses)
            if args.ca_cert:
                tls_context(args.ca_cert)  # a clear error now, not a traceback per agent
        except (ValueError, CliError) as e:
            print(f"tcm-agent: {e}", file=sys.stderr)
            return 2
        return swarm.run(args)
    if args.command in ("status", "disconnect", "reconnect"):
        try:
            answer = control(args.state_dir, args.command)
        except ControlError as e:
            print(f"tcm-agent: {e}", file=sys.stderr)
            return 2
        if args.command == "status":
            if args.json:
                print(json.dumps(answer["status"], indent=2))
            else:
                print_status(answer["status"])
        else:
            print(f"mode: {answer['mode']}")
        return 0
    if args.command == "info":
        info = agent_info(args.state_dir)
        if args.json:
            print(json.dumps(info, indent=2))
        elif not info["enrolled"]:
            print(f"not enrolled (state directory {args.state_dir})")
        else:
            print(f"agent id:        {info['agent_id']}")
            print(f"server:          {info['server']}")
            print(f"results waiting: {info['results_waiting']}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
