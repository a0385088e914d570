"""`tcm-agent`: look at and control the agent on this machine.

`info` reads the agent's state directory. The live status and control commands (status,
disconnect, reconnect) talk to the running agent over its control socket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


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
    p = argparse.ArgumentParser(prog="tcm-agent", description="The tcm agent on this machine.")
    p.add_argument(
        "--state-dir", default=os.environ.get("TCM_AGENT_STATE_DIR", "/var/lib/tcm-agent")
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="identity, server and spool from the state directory")
    s.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
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
