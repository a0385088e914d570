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
            "revoked " + ts(t["revoked_at"]) if t.get("revoked_at") else "ok",
            t["description"],
        ]
        for t in tokens
    ]
    print(table(rows, ["ID", "CREATED", "EXPIRES", "USES LEFT", "USED", "STATE", "DESCRIPTION"]))
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
            ts(t.get("since")),
            t.get("reason") or "-",
            t["url"] or "-",
        ]
        for t in listing["taskservers"]
    ]
    print(table(rows, ["NAME", "STATE", "CLIENTS", "ASSIGNED/MAX", "SINCE", "REASON", "URL"]))
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


def _via(raw: str | None) -> str:
    """A session's route as shown: direct, gateway NAME, task server NAME."""
    if not raw:
        return "-"
    return raw.replace("taskserver:", "task server ").replace("gateway:", "gateway ")


def _name(agent: dict[str, Any]) -> str:
    """The display name with the agent's tags, e.g. `web-1 [env=prod]`."""
    tags = agent.get("tags") or {}
    label = agent.get("name") or agent["hostname"]
    if tags:
        label += " [" + ",".join(f"{k}={v}" for k, v in sorted(tags.items())) + "]"
    return label


def _agent_rows(agents: list[dict[str, Any]]) -> str:
    rows = [
        [
            a["id"],
            _name(a),
            a.get("mode") or "offline",
            _via(a.get("via")),
            a.get("task_server") or "-",
            a.get("state", "ok"),
            ts(a["last_seen"]),
            _profile_ref(a.get("profile")),
        ]
        for a in agents
    ]
    return table(
        rows, ["ID", "NAME", "MODE", "VIA", "TASK SERVER", "STATE", "LAST SEEN", "PROFILE"]
    )


def cmd_agents(api: Api, args) -> int:
    path = "/agents?include=deleted" if getattr(args, "all", False) else "/agents"
    agents = api.call("GET", path)["agents"]
    if args.json:
        dump(agents)
        return 0
    print(_agent_rows(agents))
    return 0


def cmd_agents_pending(api: Api, args) -> int:
    agents = api.call("GET", "/agents?state=pending")["agents"]
    if args.json:
        dump(agents)
    elif agents:
        print(_agent_rows(agents))
    else:
        print("no agent awaits approval")
    return 0


def _tags(pairs: list[str]) -> dict[str, str]:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"tcm: --tag takes KEY=VALUE, not {pair!r}")
        tags[key] = value
    return tags


def cmd_agents_set(api: Api, args) -> int:
    body: dict[str, Any] = {}
    if args.name is not None:
        body["name"] = args.name or None  # --name '': back to the hostname
    if args.tag:
        body["tags"] = _tags(args.tag)
    if args.untag:
        body["untag"] = args.untag
    if not body:
        raise SystemExit("tcm: agents set needs --name, --tag or --untag")
    view = api.call("PATCH", f"/agents/{args.agent_id}", body)
    if args.json:
        dump(view)
    else:
        print(f"{view['id']}: {_name(view)}")
    return 0


def cmd_agents_delete(api: Api, args) -> int:
    reply = api.call("DELETE", f"/agents/{args.agent_id}")
    if args.json:
        dump(reply)
    else:
        print(f"{args.agent_id} deleted" if reply["changed"] else f"{args.agent_id} was deleted")
    return 0


def cmd_token_revoke(api: Api, args) -> int:
    reply = api.call("POST", f"/tokens/{args.token_id}/revoke", {})
    if args.json:
        dump(reply)
    else:
        print(f"{args.token_id} revoked" if reply["changed"] else f"{args.token_id} was revoked")
    return 0


def _cmd_node_remove(kind: str):
    def run(api: Api, args) -> int:
        reply = api.call("DELETE", f"/{kind}/{args.name}")
        if args.json:
            dump(reply)
        else:
            print(f"{args.name} removed" if reply["changed"] else f"{args.name} was removed")
        return 0

    return run


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
    ag.add_argument("--all", action="store_true", help="deleted agents too")
    s = agsub.add_parser("pending", help="agents awaiting approval")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_agents_pending)
    s = agsub.add_parser("set", help="set an agent's display name and tags")
    s.add_argument("agent_id")
    s.add_argument("--name", help="display name ('' for the hostname again)")
    s.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--untag", action="append", default=[], metavar="KEY")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_agents_set)
    s = agsub.add_parser(
        "delete", help="delete an agent: revoked and hidden from lists; its history is kept"
    )
    s.add_argument("agent_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_agents_delete)

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
    s = toksub.add_parser("revoke", help="withdraw an enrollment token: refused at once")
    s.add_argument("token_id", help="the token's ID (the part before the dot)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_token_revoke)

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
    s = tssub.add_parser(
        "remove", help="remove a task server: refused from now on, its agents moved"
    )
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_node_remove("taskservers"))

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
    s = gwsub.add_parser("remove", help="remove a gateway: refused from now on, links closed")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_node_remove("gateways"))
