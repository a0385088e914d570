"""`tcm policies ...` and `tcm profiles ...`: what agents run and how they connect."""

from __future__ import annotations

import json
from typing import Any

from tcm.cli.api import Api, CliError, arg_value, dump, table, ts
from tcm.cli.package import add_package_command


def _document(text: str) -> dict[str, Any]:
    """--document: a JSON object, or the name of a file holding one."""
    source = "--document"
    if not text.lstrip().startswith("{"):
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise CliError(f"cannot read the document file {text!r}: {e.strerror}") from None
        source = "the document file"
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CliError(f"{source} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise CliError(f"{source} must be a JSON object")
    return value


# -- policies ----------------------------------------------------------------------------


def cmd_policies_create(api: Api, args) -> int:
    body = {
        "name": args.name,
        "type": args.type,
        "document": _document(args.document) if args.document else {},
        "targets": args.target or [],
    }
    _print_policy(api.call("POST", "/policies", body), args.json)
    return 0


def cmd_policies_update(api: Api, args) -> int:
    body: dict[str, Any] = {}
    if args.document is not None:
        body["document"] = _document(args.document)
    if args.target is not None:
        body["targets"] = args.target
    if args.type is not None:
        body["type"] = args.type
    if not body:
        raise CliError("give --document, --type or --target to change")
    _print_policy(api.call("PUT", f"/policies/{args.name}", body), args.json)
    return 0


def _print_policy(policy: dict[str, Any], as_json: bool) -> None:
    if as_json:
        dump(policy)
        return
    print(f"policy {policy['name']} ({policy['type']}) version {policy['version']}")
    print(f"targets: {', '.join(policy['targets']) or '-'}")
    print("document: " + json.dumps(policy["document"], sort_keys=True))
    agents = policy.get("agents")
    if agents is not None:
        rows = []
        for agent_id, state in agents.items():
            state = state or {}
            last = state.get("last_run") or {}
            rows.append(
                [
                    agent_id,
                    str(state.get("version", "-")),
                    state.get("state", "not reported"),
                    ts(last.get("at")),
                    "" if not last else ("ok" if last.get("ok") else str(last.get("error"))),
                    state.get("error") or "",
                ]
            )
        print(table(rows, ["AGENT", "VERSION", "STATE", "LAST RUN", "RUN", "ERROR"]))


def cmd_policies_list(api: Api, args) -> int:
    answer = api.call("GET", "/policies")
    if args.json:
        dump(answer)
        return 0
    rows = [
        [p["name"], p["type"], str(p["version"]), ", ".join(p["targets"]), ts(p["updated_at"])]
        for p in answer["policies"]
    ]
    print(table(rows, ["NAME", "TYPE", "VERSION", "TARGETS", "UPDATED"]))
    return 0


def cmd_policies_show(api: Api, args) -> int:
    _print_policy(api.call("GET", f"/policies/{args.name}"), args.json)
    return 0


def cmd_policies_delete(api: Api, args) -> int:
    api.call("DELETE", f"/policies/{args.name}")
    print(f"deleted policy {args.name}")
    return 0


def cmd_policies_push(api: Api, args) -> int:
    answer = api.call(
        "POST", f"/policies/{args.name}/push?wait={args.wait:g}", {}, timeout=args.wait + 60
    )
    if args.json:
        dump(answer)
    else:
        rows = [
            [agent_id, r["status"], r.get("reason", "")] for agent_id, r in answer["agents"].items()
        ]
        print(f"policy {answer['policy']} version {answer['version']}")
        print(table(rows, ["AGENT", "STATUS", "REASON"]) if rows else "no agents in its targets")
    failed = any(r["status"] == "failed" for r in answer["agents"].values())
    return 1 if failed else 0


# -- connection profiles -----------------------------------------------------------------


def _settings(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--set takes KEY=VALUE, not {pair!r}")
        out[key] = arg_value(value)
    return out


def cmd_profiles_create(api: Api, args) -> int:
    body: dict[str, Any] = {"name": args.name, "settings": _settings(args.set)}
    if args.target is not None:
        body["targets"] = args.target
    if args.priority is not None:
        body["priority"] = args.priority
    _print_profile(api.call("POST", "/profiles", body), args.json)
    return 0


def cmd_profiles_update(api: Api, args) -> int:
    body: dict[str, Any] = {}
    if args.set:
        body["settings"] = _settings(args.set)
    if args.unset:
        body["unset"] = args.unset
    if args.target is not None:
        body["targets"] = args.target
    if args.priority is not None:
        body["priority"] = args.priority
    if not body:
        raise CliError("give --set, --unset, --target or --priority to change")
    _print_profile(api.call("PUT", f"/profiles/{args.name}", body), args.json)
    return 0


def _print_profile(profile: dict[str, Any], as_json: bool) -> None:
    if as_json:
        dump(profile)
        return
    print(f"profile {profile['name']} version {profile['version']}")
    assignments = [f"{a['target']} (priority {a['priority']})" for a in profile["assignments"]]
    print(f"targets: {', '.join(assignments) or '-'}")
    for key, value in sorted(profile["settings"].items()):
        print(f"  {key} = {json.dumps(value)}")


def cmd_profiles_list(api: Api, args) -> int:
    answer = api.call("GET", "/profiles")
    if args.json:
        dump(answer)
        return 0
    rows = [
        [
            p["name"],
            str(p["version"]),
            ", ".join(f"{a['target']}:{a['priority']}" for a in p["assignments"]),
            ", ".join(sorted(p["settings"])),
        ]
        for p in answer["profiles"]
    ]
    print(table(rows, ["NAME", "VERSION", "TARGETS:PRIORITY", "SETTINGS"]))
    return 0


def cmd_profiles_show(api: Api, args) -> int:
    _print_profile(api.call("GET", f"/profiles/{args.name}"), args.json)
    return 0


def cmd_profiles_delete(api: Api, args) -> int:
    api.call("DELETE", f"/profiles/{args.name}")
    print(f"deleted profile {args.name}")
    return 0


def add_commands(sub: Any) -> None:
    """Add `policies`, `profiles` and `package` to the `tcm` parser."""
    pol = sub.add_parser("policies", help="policies: documents agents apply, assigned to targets")
    psub = pol.add_subparsers(dest="subcmd", required=True)
    s = psub.add_parser("create", help="create a policy (version 1)")
    s.add_argument("name")
    s.add_argument("--type", required=True, help="policy type, e.g. inventory.schedule")
    s.add_argument("--document", help="the document: a JSON object or a file holding one")
    s.add_argument("--target", action="append", help="a target it applies to (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_policies_create)
    s = psub.add_parser("update", help="change a policy (its version goes up by one)")
    s.add_argument("name")
    s.add_argument("--type")
    s.add_argument("--document", help="the new document: a JSON object or a file")
    s.add_argument("--target", action="append", help="the new targets (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_policies_update)
    s = psub.add_parser("list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_policies_list)
    s = psub.add_parser("show", help="a policy and what each of its agents reports")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_policies_show)
    s = psub.add_parser("delete")
    s.add_argument("name")
    s.set_defaults(func=cmd_policies_delete)
    s = psub.add_parser(
        "push", help="PushPolicy: deliver now; per agent pushed / not connected / empty / failed"
    )
    s.add_argument("name")
    s.add_argument("--wait", type=float, default=10.0, help="seconds to wait for agents' reports")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_policies_push)

    pro = sub.add_parser("profiles", help="connection profiles: how agents connect")
    rsub = pro.add_subparsers(dest="subcmd", required=True)
    for name, func in (("create", cmd_profiles_create), ("update", cmd_profiles_update)):
        s = rsub.add_parser(name, help=f"{name} a connection profile")
        s.add_argument("name")
        s.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="a setting (JSON value or text), e.g. persistent_connections=false",
        )
        if name == "update":
            s.add_argument("--unset", action="append", metavar="KEY", help="drop a setting")
        s.add_argument("--target", action="append", help="a target it is assigned to")
        s.add_argument("--priority", type=int, help="higher wins (default 0)")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=func)
    s = rsub.add_parser("list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_profiles_list)
    s = rsub.add_parser("show")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_profiles_show)
    s = rsub.add_parser("delete")
    s.add_argument("name")
    s.set_defaults(func=cmd_profiles_delete)

    add_package_command(sub)
