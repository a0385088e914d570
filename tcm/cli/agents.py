"""`tcm agents`, `tcm token`, `tcm taskservers`, `tcm gateways`: the fleet and how it joins."""

from __future__ import annotations

from typing import Any

from tcm.cli.api import Api, dump, table, ts


def cmd_token_create(api: Api, args) -> int:
    body: dict[str, Any] = {"description": args.description or ""}
    if args.ttl is not None:
        body["ttl"] = args.ttl
    if args.uses is not None:
        body["uses"] = args.uses
    if args.profile is not None:
        body["profile"] = args.profile
    result = api.call("POST", "/tokens", body)
    if args.json:
        dump(result)
    else:
        print(result["token"])
    return 0


def cmd_token_list(api: Api, args) -> int:
    tokens = api.call("GET", "/tokens")["tokens"]
    if args.json:
        dump(tokens)
        return 0
    rows = [
        [
            t["id"],
            ts(t["created_at"]),
            ts(t["expires_at"]),
            "-" if t["uses_left"] is None else str(t["uses_left"]),
            str(t["used"]),
            t["description"],
        ]
        for t in tokens
    ]
    print(table(rows, ["ID", "CREATED", "EXPIRES", "USES LEFT", "USED", "DESCRIPTION"]))
    return 0


def cmd_taskservers(api: Api, args) -> int:
    listing = api.call("GET", "/taskservers")
    if args.json:
        dump(listing["taskservers"])
        return 0
    rows = [
        [
            t["name"],
            t["state"],
            f"{t['clients']}",
            f"{t['assigned']}/{t['max_clients']}",
            t["url"] or "-",
        ]
        for t in listing["taskservers"]
    ]
    print(table(rows, ["NAME", "STATE", "CLIENTS", "ASSIGNED/MAX", "URL"]))
    print(f"policy: {listing['policy']}")
    return 0


def cmd_taskservers_enroll(api: Api, args) -> int:
    body: dict[str, Any] = {"name": args.name, "ttl": args.ttl}
    if args.max_clients is not None:
        body["max_clients"] = args.max_clients
    reply = api.call("POST", "/taskservers", body)
    if args.json:
        dump(reply)
    else:
        print(reply["token"])
    return 0


def _profile_ref(profile: dict[str, Any] | None) -> str:
    """The profile an agent reports running, as NAME vN."""
    return f"{profile['name']} v{profile['version']}" if profile else "-"


def cmd_gateways(api: Api, args) -> int:
    listing = api.call("GET", "/gateways")
    if args.json:
        dump(listing["gateways"])
        return 0
    rows = [
        [
            g["name"],
            g["state"],
            str(len(g["links"])),
            str(g["sessions"]),
            str(g["task_sessions"]),
            ",".join(g.get("task_servers") or []) or "-",
            g["url"] or "-",
        ]
        for g in listing["gateways"]
    ]
    print(table(rows, ["NAME", "STATE", "LINKS", "SESSIONS", "TASK", "TASK SERVERS", "URL"]))
    print(f"this server: {listing['server']}")
    return 0


def cmd_gateways_enroll(api: Api, args) -> int:
    reply = api.call("POST", "/gateways", {"name": args.name, "ttl": args.ttl})
    if args.json:
        dump(reply)
    else:
        print(reply["token"])
    return 0


def cmd_agents_approve(api: Api, args) -> int:
    reply = api.call("POST", f"/agents/{args.agent_id}/approve", {})
    if args.json:
        dump(reply)
    else:
        print(f"{args.agent_id} approved" if reply["changed"] else f"{args.agent_id} was approved")
    return 0


def cmd_agents_revoke(api: Api, args) -> int:
    reply = api.call("POST", f"/agents/{args.agent_id}/revoke", {})
    if args.json:
        dump(reply)
    else:
        print(f"{args.agent_id} revoked" if reply["changed"] else f"{args.agent_id} was revoked")
    return 0


def cmd_agents(api: Api, args) -> int:
    agents = api.call("GET", "/agents")["agents"]
    if args.json:
        dump(agents)
        return 0
    rows = [
        [
            a["id"],
            a["hostname"],
            "yes" if a["online"] else "no",
            ts(a["connected_since"]),
            ts(a["last_seen"]),
            _profile_ref(a.get("profile")),
        ]
        for a in agents
    ]
    print(table(rows, ["ID", "HOSTNAME", "ONLINE", "CONNECTED SINCE", "LAST SEEN", "PROFILE"]))
    return 0


def add_commands(sub: Any) -> None:
    """Add this module's commands to the `tcm` parser's subcommands."""
    ag = sub.add_parser("agents", help="list agents; revoke or approve one")
    ag.add_argument("--json", action="store_true")
    ag.set_defaults(func=cmd_agents)
    agsub = ag.add_subparsers(dest="agents_command")
    s = agsub.add_parser("revoke", help="revoke an agent: refused from now on, sessions closed")
    s.add_argument("agent_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_agents_revoke)
    s = agsub.add_parser(
        "approve", help="approve an agent that enrolled while require_approval is on"
    )
    s.add_argument("agent_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_agents_approve)

    tok = sub.add_parser("token", help="enrollment tokens")
    toksub = tok.add_subparsers(dest="token_command", required=True)
    s = toksub.add_parser("create", help="create an enrollment token (printed once)")
    s.add_argument("--ttl", type=float, help="seconds until it expires (default: never)")
    s.add_argument("--uses", type=int, help="how many enrollments it allows (default: any)")
    s.add_argument("--description")
    s.add_argument("--profile", help="agents enrolling with it get this connection profile")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_token_create)
    s = toksub.add_parser("list", help="list enrollment tokens")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_token_list)

    ts = sub.add_parser("taskservers", help="task servers: list, enroll")
    ts.add_argument("--json", action="store_true")
    ts.set_defaults(func=cmd_taskservers)
    tssub = ts.add_subparsers(dest="taskservers_command")
    s = tssub.add_parser(
        "enroll", help="register a task server; prints its one-time token (for --token)"
    )
    s.add_argument("name", help="the task server's name, e.g. ts1")
    s.add_argument("--max-clients", type=int, help="its maximum of agents (default: server's)")
    s.add_argument("--ttl", type=float, default=3600, help="seconds the token is valid")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_taskservers_enroll)

    gw = sub.add_parser("gateways", help="internet gateways: list, enroll")
    gw.add_argument("--json", action="store_true")
    gw.set_defaults(func=cmd_gateways)
    gwsub = gw.add_subparsers(dest="gateways_command")
    s = gwsub.add_parser(
        "enroll", help="register a gateway; prints its one-time token (--upstream-token)"
    )
    s.add_argument("name", help="the gateway's name, e.g. gw1")
    s.add_argument("--ttl", type=float, default=3600, help="seconds the token is valid")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_gateways_enroll)
