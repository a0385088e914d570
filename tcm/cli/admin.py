"""`tcm`: the administrator's command line. It speaks only the REST API.

Where to reach the server comes from, in order: --url/--ca-cert/--token, the TCM_URL /
TCM_CA_CERT / TCM_TOKEN environment variables, or --state-dir (TCM_STATE_DIR) on the server
machine, whose server.json, ca.pem and admin.token say it all.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class CliError(Exception):
    """A failure to report on stderr with exit status 2."""


class Api:
    """A tiny JSON client for /api/v1 over HTTPS, trusting the tcm CA."""

    def __init__(self, url: str, ca_cert: str | None, token: str):
        self.url = url.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_cert)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + "/api/v1" + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                error = json.loads(raw)
                message = error.get("error", raw.decode())
            except (ValueError, AttributeError):
                error, message = {}, raw.decode("utf-8", "replace")
            position = error.get("position") if isinstance(error, dict) else None
            if (
                isinstance(body, dict)
                and isinstance(body.get("filter"), str)
                and position is not None
            ):
                # point at the error in the filter the user typed
                message += f"\n  {body['filter']}\n  {' ' * int(position)}^"
            raise CliError(f"{method} {path}: {e.code} {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CliError(f"cannot reach {self.url}: {reason}") from None
        return json.loads(raw) if raw else None


def connect(args: argparse.Namespace) -> Api:
    state_dir = args.state_dir or os.environ.get("TCM_STATE_DIR")
    url = args.url or os.environ.get("TCM_URL")
    ca = args.ca_cert or os.environ.get("TCM_CA_CERT")
    token = args.token or os.environ.get("TCM_TOKEN")
    if state_dir:
        try:
            with open(os.path.join(state_dir, "server.json")) as f:
                meta = json.load(f)
        except OSError as e:
            raise CliError(f"no server state in {state_dir}: {e.strerror}") from None
        url = url or meta["url"]
        if not ca and meta.get("ca"):
            ca = os.path.join(state_dir, meta["ca"])
        if not token:
            try:
                with open(os.path.join(state_dir, meta.get("token", "admin.token"))) as f:
                    token = f.read().strip()
            except OSError as e:
                raise CliError(f"cannot read the admin token: {e.strerror}") from None
    if not (url and token):
        raise CliError(
            "say where the server is: --state-dir DIR, or --url, --ca-cert and "
            "--token (or TCM_URL, TCM_CA_CERT, TCM_TOKEN)"
        )
    return Api(url, ca, token)


def _arg_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_args_kv(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--arg takes KEY=VALUE, not {pair!r}")
        out[key] = _arg_value(value)
    return out


def _ts(value: float | None) -> str:
    if not value:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def _dump(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# -- commands ----------------------------------------------------------------------------


def cmd_status(api: Api, args) -> int:
    _dump(api.call("GET", "/status"))
    return 0


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
        _dump(result)
    else:
        print(result["token"])
    return 0


def cmd_token_list(api: Api, args) -> int:
    tokens = api.call("GET", "/tokens")["tokens"]
    if args.json:
        _dump(tokens)
        return 0
    rows = [
        [
            t["id"],
            _ts(t["created_at"]),
            _ts(t["expires_at"]),
            "-" if t["uses_left"] is None else str(t["uses_left"]),
            str(t["used"]),
            t["description"],
        ]
        for t in tokens
    ]
    print(_table(rows, ["ID", "CREATED", "EXPIRES", "USES LEFT", "USED", "DESCRIPTION"]))
    return 0


def cmd_taskservers(api: Api, args) -> int:
    listing = api.call("GET", "/taskservers")
    if args.json:
        _dump(listing["taskservers"])
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
    print(_table(rows, ["NAME", "STATE", "CLIENTS", "ASSIGNED/MAX", "URL"]))
    print(f"policy: {listing['policy']}")
    return 0


def cmd_taskservers_enroll(api: Api, args) -> int:
    body: dict[str, Any] = {"name": args.name, "ttl": args.ttl}
    if args.max_clients is not None:
        body["max_clients"] = args.max_clients
    reply = api.call("POST", "/taskservers", body)
    if args.json:
        _dump(reply)
    else:
        print(reply["token"])
    return 0


def _profile_ref(profile: dict[str, Any] | None) -> str:
    """The profile an agent reports running, as NAME vN."""
    return f"{profile['name']} v{profile['version']}" if profile else "-"


def cmd_gateways(api: Api, args) -> int:
    listing = api.call("GET", "/gateways")
    if args.json:
        _dump(listing["gateways"])
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
    print(_table(rows, ["NAME", "STATE", "LINKS", "SESSIONS", "TASK", "TASK SERVERS", "URL"]))
    print(f"this server: {listing['server']}")
    return 0


def cmd_gateways_enroll(api: Api, args) -> int:
    reply = api.call("POST", "/gateways", {"name": args.name, "ttl": args.ttl})
    if args.json:
        _dump(reply)
    else:
        print(reply["token"])
    return 0


def cmd_agents_approve(api: Api, args) -> int:
    reply = api.call("POST", f"/agents/{args.agent_id}/approve", {})
    if args.json:
        _dump(reply)
    else:
        print(f"{args.agent_id} approved" if reply["changed"] else f"{args.agent_id} was approved")
    return 0


def cmd_agents_revoke(api: Api, args) -> int:
    reply = api.call("POST", f"/agents/{args.agent_id}/revoke", {})
    if args.json:
        _dump(reply)
    else:
        print(f"{args.agent_id} revoked" if reply["changed"] else f"{args.agent_id} was revoked")
    return 0


def cmd_agents(api: Api, args) -> int:
    agents = api.call("GET", "/agents")["agents"]
    if args.json:
        _dump(agents)
        return 0
    rows = [
        [
            a["id"],
            a["hostname"],
            "yes" if a["online"] else "no",
            _ts(a["connected_since"]),
            _ts(a["last_seen"]),
            _profile_ref(a.get("profile")),
        ]
        for a in agents
    ]
    print(_table(rows, ["ID", "HOSTNAME", "ONLINE", "CONNECTED SINCE", "LAST SEEN", "PROFILE"]))
    return 0


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "job": job["id"],
        "action": job["action"],
        "counts": job["counts"],
        "results": [
            {"agent": r["agent"], "state": r["state"], "result": r["result"], "error": r["error"]}
            for r in job["results"]
        ],
    }


def _progress_line(job: dict[str, Any]) -> str:
    c = job["counts"]
    return (
        f"job {job['id']}: {c['completed']}/{c['total']} completed "
        f"(succeeded {c['succeeded']}, failed {c['failed']}, expired {c['expired']}, "
        f"in progress {c['in_progress']}, not started {c['pending']})"
    )


def _print_job(job: dict[str, Any]) -> None:
    print(f"job {job['id']}  action {job['action']}  args {json.dumps(job['args'])}")
    print(
        f"created {_ts(job['created_at'])}  expires {_ts(job['expires_at'])}  "
        f"by {job['created_by']}"
    )
    print(_progress_line(job))
    rows = []
    for r in job["results"]:
        detail = r["error"] or ""
        if not detail and r["result"] is not None:
            detail = json.dumps(r["result"])
        if len(detail) > 80:
            detail = detail[:77] + "..."
        rows.append([r["agent"], r["state"], detail])
    print(_table(rows, ["AGENT", "STATE", "RESULT / ERROR"]))


def wait_for(api: Api, job_id: str, timeout: float | None, quiet: bool) -> dict[str, Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    last = ""
    delay = 0.05
    while True:
        job = api.call("GET", f"/jobs/{job_id}?results=false")  # counts: cheap to poll
        line = _progress_line(job)
        if line != last and not quiet:
            print(line, file=sys.stderr, flush=True)
            last = line
        c = job["counts"]
        if c["completed"] >= c["total"] or (deadline is not None and time.monotonic() >= deadline):
            return api.call("GET", f"/jobs/{job_id}")  # now with every target's result
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)


def cmd_run(api: Api, args) -> int:
    body: dict[str, Any] = {"action": args.action, "args": parse_args_kv(args.arg or [])}
    if args.args_json:
        extra = _arg_value(args.args_json)
        if not isinstance(extra, dict):
            raise CliError("--args-json must be a JSON object")
        body["args"].update(extra)
    if (args.targets is None) == (args.target is None):
        raise CliError("give --targets (ids or 'all') or --target NAME")
    if args.target is not None:
        body["target"] = args.target
    else:
        body["targets"] = (
            "all" if args.targets == "all" else [t for t in args.targets.split(",") if t]
        )
    if args.ttl is not None:
        body["ttl"] = args.ttl
    if args.timeout is not None:
        body["timeout"] = args.timeout
    job_id = api.call("POST", "/jobs", body)["job"]
    if not args.wait:
        if args.json:
            _dump({"job": job_id})
        else:
            print(job_id)
        return 0
    job = wait_for(api, job_id, args.wait_timeout, quiet=False)
    if args.json:
        print(json.dumps(_summary(job)))
    else:
        _print_job(job)
    c = job["counts"]
    return 0 if c["succeeded"] == c["total"] else 1


def cmd_jobs_show(api: Api, args) -> int:
    job = api.call("GET", f"/jobs/{args.id}")
    if args.json:
        print(
            json.dumps(
                {
                    **_summary(job),
                    "args": job["args"],
                    "created_at": job["created_at"],
                    "expires_at": job["expires_at"],
                }
            )
        )
    else:
        _print_job(job)
    return 0


def cmd_jobs_list(api: Api, args) -> int:
    jobs = api.call("GET", "/jobs")["jobs"]
    if args.json:
        _dump(jobs)
        return 0
    rows = []
    for j in jobs:
        states = j["states"]
        done = sum(states.get(s, 0) for s in ("succeeded", "failed", "expired"))
        rows.append(
            [
                j["id"],
                j["action"],
                _ts(j["created_at"]),
                f"{done}/{sum(states.values())}",
                str(states.get("failed", 0)),
            ]
        )
    print(_table(rows, ["JOB", "ACTION", "CREATED", "DONE", "FAILED"]))
    return 0


def cmd_jobs_follow(api: Api, args) -> int:
    """Print a job's output as it arrives, until every target has finished."""
    after = 0
    while True:
        chunks = api.call("GET", f"/jobs/{args.id}/output?after={after}&wait=10")["output"]
        for c in chunks:
            after = max(after, c["id"])
            prefix = f"[{c['agent_id']}] " if not args.raw else ""
            stream = sys.stderr if c["stream"] == "stderr" else sys.stdout
            for line in c["text"].splitlines(keepends=True):
                stream.write(prefix + line)
            stream.flush()
        job = api.call("GET", f"/jobs/{args.id}?results=false")
        if job["counts"]["completed"] >= job["counts"]["total"] and not chunks:
            print(_progress_line(job), file=sys.stderr)
            return 0


def cmd_settings_get(api: Api, args) -> int:
    settings = api.call("GET", "/settings")
    if args.key:
        if args.key not in settings:
            raise CliError(f"no setting {args.key!r}; there are {sorted(settings)}")
        print(json.dumps(settings[args.key]))
    elif args.json:
        _dump(settings)
    else:
        for k in sorted(settings):
            print(f"{k} = {json.dumps(settings[k])}")
    return 0


def cmd_settings_set(api: Api, args) -> int:
    value = _arg_value(args.value)
    if isinstance(value, str) and value.lower() in ("on", "off", "yes", "no"):
        value = value.lower() in ("on", "yes")
    settings = api.call("PUT", "/settings", {args.key: value})
    print(f"{args.key} = {json.dumps(settings[args.key])}")
    return 0


# -- targets, groups, selections -----------------------------------------------------------

DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([smhdw]?)\s*$")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '1h', '2d', '1w'."""
    m = DURATION.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h, 2d)")
    return float(m.group(1)) * UNIT_SECONDS[m.group(2)]


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


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
        _dump(members)
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
        print(_table(rows, ["ID", "NAME", "ONLINE", "GROUPS"]))


def cmd_targets_create(api: Api, args) -> int:
    body = {"name": args.name, "description": args.description or "", **_selection(args)}
    target = api.call("POST", "/targets", body)
    if args.json:
        _dump(target)
    else:
        what = target["filter"] if target["filter"] is not None else target["agents"]
        print(f"target {target['name']} ({target['kind']}): {what}")
    return 0


def cmd_targets_list(api: Api, args) -> int:
    targets = api.call("GET", "/targets")["targets"]
    if args.json:
        _dump(targets)
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
    print(_table(rows, ["NAME", "KIND", "FILTER / AGENTS", "DESCRIPTION"]))
    return 0


def cmd_targets_show(api: Api, args) -> int:
    target = api.call("GET", f"/targets/{_q(args.name)}")
    if args.json:
        _dump(target)
        return 0
    print(f"target {target['name']} ({target['kind']}), {target['members']} members now")
    if target["filter"] is not None:
        print(f"filter: {target['filter']}")
    else:
        print(f"agents: {', '.join(target['agents'])}")
    print(f"created {_ts(target['created_at'])} by {target['created_by']}")
    if target["description"]:
        print(target["description"])
    return 0


def cmd_targets_delete(api: Api, args) -> int:
    api.call("DELETE", f"/targets/{_q(args.name)}")
    return 0


def cmd_targets_members(api: Api, args) -> int:
    members = api.call("GET", f"/targets/{_q(args.name)}/members")["members"]
    _print_members(members, args.csv, args.json)
    return 0


def cmd_select(api: Api, args) -> int:
    members = api.call("POST", "/selection", _selection(args))["members"]
    _print_members(members, args.csv, args.json)
    return 0


def _print_group(group: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _dump(group)
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
        _dump(groups)
        return 0
    rows = [[g["name"], str(g["members"]), g["description"]] for g in groups]
    print(_table(rows, ["NAME", "MEMBERS", "DESCRIPTION"]))
    return 0


def cmd_groups_show(api: Api, args) -> int:
    _print_group(api.call("GET", f"/groups/{_q(args.name)}"), args.json)
    return 0


def cmd_groups_delete(api: Api, args) -> int:
    api.call("DELETE", f"/groups/{_q(args.name)}")
    return 0


def cmd_groups_add(api: Api, args) -> int:
    group = api.call("POST", f"/groups/{_q(args.name)}/members", {"add": args.agents})
    _print_group(group, args.json)
    return 0


def cmd_groups_remove(api: Api, args) -> int:
    group = api.call("POST", f"/groups/{_q(args.name)}/members", {"remove": args.agents})
    _print_group(group, args.json)
    return 0


# -- inventory ------------------------------------------------------------------------------


def cmd_inventory_show(api: Api, args) -> int:
    inv = api.call("GET", f"/agents/{_q(args.agent)}/inventory")
    if args.json:
        _dump(inv)
        return 0
    for name in sorted(inv["classes"]):
        c = inv["classes"][name]
        print(f"[{name}]  collected {_ts(c['collected_at'])}  changed {_ts(c['changed_at'])}")
        print(json.dumps(c["data"], indent=2, sort_keys=True))
    return 0


def cmd_inventory_stale(api: Api, args) -> int:
    query = [("older_than", str(args.older_than))]
    if args.target:
        query.append(("target", args.target))
    for cls in args.cls or []:
        query.append(("class", cls))
    stale = api.call("GET", "/inventory/stale?" + urllib.parse.urlencode(query))["stale"]
    if args.json:
        _dump(stale)
        return 0
    rows = [
        [s["agent"], s["class"], _ts(s["collected_at"]) if s["collected_at"] else "never"]
        for s in stale
    ]
    print(_table(rows, ["AGENT", "CLASS", "COLLECTED"]))
    return 0


def cmd_inventory_refresh(api: Api, args) -> int:
    body: dict[str, Any] = {"older_than": args.older_than if args.stale else 0}
    if args.target:
        body["target"] = args.target
    if args.cls:
        body["classes"] = args.cls
    if args.ttl is not None:
        body["ttl"] = args.ttl
    jobs = api.call("POST", "/inventory/refresh", body)["jobs"]
    if args.wait:
        jobs = [
            {**j, "counts": wait_for(api, j["job"], args.wait_timeout, quiet=True)["counts"]}
            for j in jobs
        ]
    if args.json:
        _dump(jobs)
        return 0
    if not jobs:
        print("nothing to refresh")
    for j in jobs:
        line = f"job {j['job']}: {','.join(j['classes'])} from {len(j['agents'])} agents"
        if "counts" in j:
            line += f" ({j['counts']['succeeded']}/{j['counts']['total']} succeeded)"
        print(line)
    if args.wait:
        return 0 if all(j["counts"]["succeeded"] == j["counts"]["total"] for j in jobs) else 1
    return 0


# -- API tokens and the audit log -----------------------------------------------------------


def cmd_apitoken_create(api: Api, args) -> int:
    body: dict[str, Any] = {"name": args.name, "role": args.role}
    if args.target:
        body["target"] = args.target
    if args.ttl is not None:
        body["ttl"] = args.ttl
    result = api.call("POST", "/apitokens", body)
    if args.json:
        _dump(result)
    else:
        print(result["token"])
    return 0


def cmd_apitoken_list(api: Api, args) -> int:
    tokens = api.call("GET", "/apitokens")["tokens"]
    if args.json:
        _dump(tokens)
        return 0
    rows = [
        [
            t["name"],
            t["id"],
            t["role"],
            t["target"] or "-",
            _ts(t["created_at"]),
            _ts(t["expires_at"]),
            "revoked " + _ts(t["revoked_at"]) if t["revoked_at"] else "active",
        ]
        for t in tokens
    ]
    print(_table(rows, ["NAME", "ID", "ROLE", "TARGET", "CREATED", "EXPIRES", "STATE"]))
    return 0


def cmd_apitoken_revoke(api: Api, args) -> int:
    api.call("DELETE", f"/apitokens/{_q(args.name)}")
    return 0


def cmd_audit(api: Api, args) -> int:
    query = [("limit", str(args.limit))]
    if args.since is not None:
        query.append(("since", str(time.time() - args.since)))
    entries = api.call("GET", "/audit?" + urllib.parse.urlencode(query))["entries"]
    if args.json:
        _dump(entries)
        return 0
    rows = [
        [_ts(e["at"]), e["actor"], e["action"], e["object"], json.dumps(e["details"])[:60]]
        for e in entries
    ]
    print(_table(rows, ["WHEN", "WHO", "WHAT", "ON", "DETAILS"]))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tcm", description="Administer a tcm server.")
    p.add_argument("--state-dir", help="server state directory (on the server machine)")
    p.add_argument("--url", help="server URL, https://HOST:PORT")
    p.add_argument("--ca-cert", help="CA certificate to trust for the server")
    p.add_argument("--token", help="admin API token")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("status", help="server status")
    s.set_defaults(func=cmd_status)

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

    s = sub.add_parser("run", help="run an action on agents")
    s.add_argument("action")
    s.add_argument(
        "--arg",
        action="append",
        metavar="KEY=VALUE",
        help="an argument; VALUE is JSON if it parses, else a string",
    )
    s.add_argument("--args-json", help="all arguments as one JSON object")
    s.add_argument("--targets", help="'all' or agent ids separated by commas")
    s.add_argument("--target", help="a saved target: its members when the job is created")
    s.add_argument("--ttl", type=float, help="seconds the job may wait for offline agents")
    s.add_argument("--timeout", type=float, help="seconds the action may run on an agent")
    s.add_argument("--wait", action="store_true", help="wait for every target to finish")
    s.add_argument("--wait-timeout", type=float, help="stop waiting after this many seconds")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_run)

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

    inv = sub.add_parser("inventory", help="inventory per agent and data class")
    invsub = inv.add_subparsers(dest="inventory_command", required=True)
    s = invsub.add_parser("show", help="an agent's stored inventory")
    s.add_argument("agent")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inventory_show)
    for verb in ("stale", "refresh"):
        s = invsub.add_parser(
            verb,
            help="list (agent, class) collected before --older-than, or never"
            if verb == "stale"
            else "collect classes now (with --stale: only the stale ones)",
        )
        s.add_argument(
            "--older-than", type=duration, default=3600.0, help="e.g. 30m, 1h, 2d (default 1h)"
        )
        s.add_argument("--target", help="only this target's members")
        s.add_argument("--class", dest="cls", action="append", help="only this class")
        s.add_argument("--json", action="store_true")
        if verb == "stale":
            s.set_defaults(func=cmd_inventory_stale)
        else:
            s.add_argument("--stale", action="store_true", help="only what is stale")
            s.add_argument("--ttl", type=float, help="seconds the jobs wait for offline agents")
            s.add_argument("--wait", action="store_true", help="wait for the jobs to finish")
            s.add_argument("--wait-timeout", type=float)
            s.set_defaults(func=cmd_inventory_refresh)

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

    s = sub.add_parser("audit", help="the audit log: who changed what, when")
    s.add_argument("--since", type=duration, help="only the last ... (e.g. 1h, 7d)")
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_audit)

    jobs = sub.add_parser("jobs", help="jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    s = jsub.add_parser("list")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_jobs_list)
    s = jsub.add_parser("show")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_jobs_show)
    s = jsub.add_parser("follow", help="print a job's output as it arrives")
    s.add_argument("id")
    s.add_argument("--raw", action="store_true", help="no agent prefix")
    s.set_defaults(func=cmd_jobs_follow)

    from tcm.cli.config import add_commands

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(connect(args), args)
    except CliError as e:
        print(f"tcm: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run as the importable module, not as __main__: the command modules it loads
    # (tcm.cli.config, tcm.cli.package) raise tcm.cli.admin.CliError, which main() catches.
    from tcm.cli.admin import main as _main

    sys.exit(_main())
