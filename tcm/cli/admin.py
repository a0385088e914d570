"""`tcm`: the administrator's command line. It speaks only the REST API.

Where to reach the server comes from, in order: --url/--ca-cert/--token, the TCM_URL /
TCM_CA_CERT / TCM_TOKEN environment variables, or --state-dir (TCM_STATE_DIR) on the server
machine, whose server.json, ca.pem and admin.token say it all.

This module holds the parser, `main`, and the server-wide commands (status, settings, API
tokens, audit); each family of commands lives in its own module with an `add_commands(sub)`:
`agents` (agents, enrollment tokens, task servers, gateways), `jobs` (run, jobs, inventory),
`targets` (targets, select, groups), `config` (policies, profiles) and `package`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

from tcm.cli import agents, config, jobs, targets
from tcm.cli.api import (  # noqa: F401  (Api, CliError: imported from here by scripts and tests)
    Api,
    CliError,
    arg_value,
    closed_pipe,
    connect,
    dump,
    duration,
    quote,
    table,
    ts,
)

# -- commands ----------------------------------------------------------------------------


def cmd_status(api: Api, args) -> int:
    try:
        status = api.call("GET", "/status?store=now")  # the store's size, measured now
    except CliError as e:
        if ": 400 " not in str(e):
            raise
        status = api.call("GET", "/status")  # a server before issue 18: no store figures
    dump(status)
    return 0


def cmd_whoami(api: Api, args) -> int:
    who = api.call("GET", "/whoami")
    if args.json:
        dump(who)
        return 0
    print(f"token:       {who['name']}")
    print(f"role:        {who['role']}")
    print(f"permissions: {', '.join(who['permissions'])}")
    print(f"scope:       {'target ' + who['target'] if who['target'] else 'every agent'}")
    return 0


def cmd_settings_get(api: Api, args) -> int:
    settings = api.call("GET", "/settings")
    if args.key:
        if args.key not in settings:
            raise CliError(f"no setting {args.key!r}; there are {sorted(settings)}")
        print(json.dumps(settings[args.key]))
    elif args.json:
        dump(settings)
    else:
        for k in sorted(settings):
            print(f"{k} = {json.dumps(settings[k])}")
    return 0


def cmd_settings_set(api: Api, args) -> int:
    value = arg_value(args.value)
    if isinstance(value, str) and value.lower() in ("on", "off", "yes", "no", "true", "false"):
        value = value.lower() in ("on", "yes", "true")
    settings = api.call("PUT", "/settings", {args.key: value})
    print(f"{args.key} = {json.dumps(settings[args.key])}")
    return 0


def cmd_apitoken_create(api: Api, args) -> int:
    body: dict[str, Any] = {"name": args.name, "role": args.role}
    if args.target:
        body["target"] = args.target
    if args.ttl is not None:
        body["ttl"] = args.ttl
    result = api.call("POST", "/apitokens", body)
    if args.json:
        dump(result)
    else:
        print(result["token"])
    return 0


def cmd_apitoken_list(api: Api, args) -> int:
    tokens = api.call("GET", "/apitokens")["tokens"]
    if args.json:
        dump(tokens)
        return 0
    rows = [
        [
            t["name"],
            t["id"],
            t["role"],
            t["target"] or "-",
            ts(t["created_at"]),
            ts(t["expires_at"]),
            "revoked " + ts(t["revoked_at"]) if t["revoked_at"] else "active",
        ]
        for t in tokens
    ]
    print(table(rows, ["NAME", "ID", "ROLE", "TARGET", "CREATED", "EXPIRES", "STATE"]))
    return 0


def cmd_apitoken_revoke(api: Api, args) -> int:
    api.call("DELETE", f"/apitokens/{quote(args.name)}")
    return 0


def cmd_nodes(api: Api, args) -> int:
    """The cluster's server nodes (a single server lists itself)."""
    cluster = api.call("GET", "/cluster")
    if args.json:
        dump(cluster)
        return 0
    rows = [
        [
            n["node"] + (" *" if n.get("this") else ""),
            n.get("address") or "-",
            str(n["sessions"]["core"]),
            str(n["sessions"]["task"]),
            str(n["sessions"]["polls"]),
            n["state"],
            ts(n.get("last_heartbeat")),
        ]
        for n in cluster["nodes"]
    ]
    print(table(rows, ["NODE", "ADDRESS", "CORE", "TASK", "POLLS", "STATE", "LAST HEARTBEAT"]))
    print(f"bus: {cluster['bus']} (seen from {cluster['node']}, marked *)")
    return 0


def cmd_audit(api: Api, args) -> int:
    query = [("limit", str(args.limit))]
    if args.since is not None:
        query.append(("since", str(time.time() - args.since)))
    if args.who is not None:
        query.append(("who", args.who))
    if args.action is not None:
        query.append(("action", args.action))
    entries = api.call("GET", "/audit?" + urllib.parse.urlencode(query))["entries"]
    if args.json:
        dump(entries)
        return 0
    rows = [
        [ts(e["at"]), e["actor"], e["action"], e["object"], json.dumps(e["details"])[:60]]
        for e in entries
    ]
    print(table(rows, ["WHEN", "WHO", "WHAT", "ON", "DETAILS"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcm", description="Administer a tcm server.")
    p.add_argument("--state-dir", help="server state directory (on the server machine)")
    p.add_argument("--url", help="server URL, https://HOST:PORT")
    p.add_argument("--ca-cert", help="CA certificate to trust for the server")
    p.add_argument("--token", help="admin API token")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", help="server status")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("whoami", help="this token's name, role, permissions and scope")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_whoami)

    st = sub.add_parser("settings", help="server settings changeable at run time")
    stsub = st.add_subparsers(dest="settings_command", required=True)
    s = stsub.add_parser("get")
    s.add_argument("key", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_settings_get)
    s = stsub.add_parser("set", help="e.g. tcm settings set persistent_connections false")
    s.add_argument("key")
    s.add_argument("value", help="JSON value (true/false, numbers) or on/off")
    s.set_defaults(func=cmd_settings_set)

    at = sub.add_parser("apitoken", help="named admin API tokens with roles")
    atsub = at.add_subparsers(dest="apitoken_command", required=True)
    s = atsub.add_parser("create", help="create an API token (printed once)")
    s.add_argument("name")
    s.add_argument("--role", required=True, choices=["viewer", "operator", "admin"])
    s.add_argument("--target", help="scope: its jobs may go to this target's members only")
    s.add_argument("--ttl", type=duration, help="valid for this long (e.g. 30d; default ever)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_apitoken_create)
    s = atsub.add_parser("list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_apitoken_list)
    s = atsub.add_parser("revoke")
    s.add_argument("name")
    s.set_defaults(func=cmd_apitoken_revoke)

    s = sub.add_parser("nodes", help="the server nodes of this cluster, their sessions and state")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_nodes)

    s = sub.add_parser("audit", help="the audit log: who changed what, when")
    s.add_argument("--since", type=duration, help="only the last ... (e.g. 1h, 7d)")
    s.add_argument("--who", help="only what this principal did (an API token's name, admin)")
    s.add_argument(
        "--action",
        help="only this action (job.create, request.refused, ...) or a prefix ending in '.'",
    )
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_audit)

    for commands in (agents, jobs, targets, config):
        commands.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.func(connect(args), args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except CliError as e:
        print(f"tcm: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return closed_pipe()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as the importable module, not as __main__, so that CliError is one class for every
    # command module and main() catches what they raise.
    from tcm.cli.admin import main as _main

    sys.exit(_main())
