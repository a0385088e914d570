"""`tcm targets`, `tcm select`, `tcm groups`: choosing agents."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Any

from tcm.cli.api import Api, dump, quote, table, ts


def _selection(args) -> dict[str, Any]:
    """The selection options of a command as an API body."""
    body: dict[str, Any] = {}
    if getattr(args, "filter", None) is not None:
        body["filter"] = args.filter
    if getattr(args, "agents", None) is not None:
        body["agents"] = [a for a in args.agents.split(",") if a]
    if getattr(args, "from_job", None) is not None:
        body["from_job"] = args.from_job
    if getattr(args, "state", None):
        body["state"] = args.state
    if getattr(args, "of_target", None) is not None:
        body["target"] = args.of_target
    return body


def _print_members(members: list[dict[str, Any]], as_csv: bool, as_json: bool) -> None:
    if as_json:
        dump(members)
    elif as_csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["id", "name", "platform", "online", "mode", "groups"])
        for m in members:
            writer.writerow(
                [
                    m["id"],
                    m["name"],
                    m["platform"],
                    "yes" if m["online"] else "no",
                    m["mode"] or "",
                    " ".join(m["group"]),
                ]
            )
        sys.stdout.write(out.getvalue())
    else:
        rows = [
            [m["id"], m["name"], "yes" if m["online"] else "no", ",".join(m["group"])]
            for m in members
        ]
        print(table(rows, ["ID", "NAME", "ONLINE", "GROUPS"]))


def cmd_targets_create(api: Api, args) -> int:
    body = {"name": args.name, "description": args.description or "", **_selection(args)}
    target = api.call("POST", "/targets", body)
    if args.json:
        dump(target)
    else:
        what = target["filter"] if target["filter"] is not None else target["agents"]
        print(f"target {target['name']} ({target['kind']}): {what}")
    return 0


def cmd_targets_list(api: Api, args) -> int:
    targets = api.call("GET", "/targets")["targets"]
    if args.json:
        dump(targets)
        return 0
    rows = [
        [
            t["name"],
            t["kind"],
            t["filter"] if t["filter"] is not None else f"{len(t['agents'])} agents",
            t["description"],
        ]
        for t in targets
    ]
    print(table(rows, ["NAME", "KIND", "FILTER / AGENTS", "DESCRIPTION"]))
    return 0


def cmd_targets_show(api: Api, args) -> int:
    target = api.call("GET", f"/targets/{quote(args.name)}")
    if args.json:
        dump(target)
        return 0
    print(f"target {target['name']} ({target['kind']}), {target['members']} members now")
    if target["filter"] is not None:
        print(f"filter: {target['filter']}")
    else:
        print(f"agents: {', '.join(target['agents'])}")
    print(f"created {ts(target['created_at'])} by {target['created_by']}")
    if target["description"]:
        print(target["description"])
    return 0


def cmd_targets_delete(api: Api, args) -> int:
    api.call("DELETE", f"/targets/{quote(args.name)}")
    return 0


def cmd_targets_members(api: Api, args) -> int:
    members = api.call("GET", f"/targets/{quote(args.name)}/members")["members"]
    _print_members(members, args.csv, args.json)
    return 0


def cmd_select(api: Api, args) -> int:
    members = api.call("POST", "/selection", _selection(args))["members"]
    _print_members(members, args.csv, args.json)
    return 0


def _print_group(group: dict[str, Any], as_json: bool) -> None:
    if as_json:
        dump(group)
        return
    print(f"group {group['name']}: {len(group['agents'])} members")
    for agent in group["agents"]:
        print(f"  {agent}")


def cmd_groups_create(api: Api, args) -> int:
    body: dict[str, Any] = {"name": args.name, "description": args.description or ""}
    if args.agents:
        body["agents"] = [a for a in args.agents.split(",") if a]
    _print_group(api.call("POST", "/groups", body), args.json)
    return 0


def cmd_groups_list(api: Api, args) -> int:
    groups = api.call("GET", "/groups")["groups"]
    if args.json:
        dump(groups)
        return 0
    rows = [[g["name"], str(g["members"]), g["description"]] for g in groups]
    print(table(rows, ["NAME", "MEMBERS", "DESCRIPTION"]))
    return 0


def cmd_groups_show(api: Api, args) -> int:
    _print_group(api.call("GET", f"/groups/{quote(args.name)}"), args.json)
    return 0


def cmd_groups_delete(api: Api, args) -> int:
    api.call("DELETE", f"/groups/{quote(args.name)}")
    return 0


def cmd_groups_add(api: Api, args) -> int:
    group = api.call("POST", f"/groups/{quote(args.name)}/members", {"add": args.agents})
    _print_group(group, args.json)
    return 0


def cmd_groups_remove(api: Api, args) -> int:
    group = api.call("POST", f"/groups/{quote(args.name)}/members", {"remove": args.agents})
    _print_group(group, args.json)
    return 0


# -- inventory ------------------------------------------------------------------------------


def _selection_options(s: argparse.ArgumentParser, with_filter: bool = True) -> None:
    group = s.add_mutually_exclusive_group(required=True)
    if with_filter:
        group.add_argument("--filter", help="a filter expression, e.g. 'os.family == \"debian\"'")
    group.add_argument("--agents", help="agent ids separated by commas")
    group.add_argument("--from-job", metavar="JOBID", help="the agents of a job ...")
    group.add_argument("--of-target", metavar="NAME", help="a target's members now")
    s.add_argument(
        "--state",
        action="append",
        choices=["pending", "delivered", "running", "succeeded", "failed", "expired"],
        help="... in this state (repeatable; with --from-job)",
    )


def add_commands(sub: Any) -> None:
    """Add this module's commands to the `tcm` parser's subcommands."""
    tg = sub.add_parser("targets", help="targets: saved selections of agents")
    tgsub = tg.add_subparsers(dest="targets_command", required=True)
    s = tgsub.add_parser(
        "create", help="save a filter (evaluated live) or a selection (fixed) as a target"
    )
    s.add_argument("name")
    _selection_options(s)
    s.add_argument("--description")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_targets_create)
    s = tgsub.add_parser("list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_targets_list)
    s = tgsub.add_parser("show")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_targets_show)
    s = tgsub.add_parser("delete")
    s.add_argument("name")
    s.set_defaults(func=cmd_targets_delete)
    s = tgsub.add_parser("members", help="a target's members now")
    s.add_argument("name")
    s.add_argument("--csv", action="store_true", help="as CSV (id,name,platform,online,...)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_targets_members)

    s = sub.add_parser("select", help="list the agents of a selection without saving it")
    _selection_options(s)
    s.add_argument("--csv", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_select)

    gr = sub.add_parser("groups", help="groups: named sets of agents")
    grsub = gr.add_subparsers(dest="groups_command", required=True)
    s = grsub.add_parser("create")
    s.add_argument("name")
    s.add_argument("--agents", help="first members, ids separated by commas")
    s.add_argument("--description")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_groups_create)
    s = grsub.add_parser("list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_groups_list)
    s = grsub.add_parser("show")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_groups_show)
    s = grsub.add_parser("delete")
    s.add_argument("name")
    s.set_defaults(func=cmd_groups_delete)
    for verb, func in (("add", cmd_groups_add), ("remove", cmd_groups_remove)):
        s = grsub.add_parser(verb, help=f"{verb} agents")
        s.add_argument("name")
        s.add_argument("agents", nargs="+", metavar="AGENT")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=func)
