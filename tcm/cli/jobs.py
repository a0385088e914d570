"""`tcm run`, `tcm jobs`, `tcm inventory`: work sent to agents and what came back."""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from typing import Any

from tcm.cli.api import Api, CliError, arg_value, dump, duration, parse_args_kv, quote, table, ts

# Target states that end a job without success: `tcm run --wait` and `tcm jobs follow` exit 1.
UNSUCCESSFUL = ("failed", "expired", "canceled", "unsupported")


def job_args(pairs: list[str]) -> dict[str, Any]:
    """`--arg KEY=VALUE` pairs: VALUE is JSON if it parses, else a string; a VALUE that looks
    like JSON (starts with `[`, `{` or `"`) but does not parse is an error, not a string."""
    for pair in pairs:
        value = pair.partition("=")[2]
        if value.lstrip()[:1] in ("[", "{", '"'):
            try:
                json.loads(value)
            except ValueError as e:
                key = pair.partition("=")[0]
                raise CliError(
                    f"--arg {key}: {value!r} looks like JSON but does not parse ({e}); "
                    "quote it as a JSON string to send it as text"
                ) from None
    return parse_args_kv(pairs)


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "job": job["id"],
        "action": job["action"],
        "counts": job["counts"],
        "results": [
            {
                "agent": r["agent"],
                "state": r["state"],
                "result": r["result"],
                "error": r["error"],
                "reason": r.get("reason"),  # "not connected" for a pending target
            }
            for r in job["results"]
        ],
    }


def _progress_line(job: dict[str, Any]) -> str:
    c = job["counts"]
    return (
        f"job {job['id']}: {c['completed']}/{c['total']} completed "
        f"(succeeded {c['succeeded']}, failed {c['failed']}, expired {c['expired']}, "
        f"canceled {c.get('canceled', 0)}, unsupported {c.get('unsupported', 0)}, "
        f"in progress {c['in_progress']}, not started {c['pending']}, "
        f"not connected {c.get('not_connected', 0)})"
    )


def _print_job(job: dict[str, Any]) -> None:
    print(f"job {job['id']}  action {job['action']}  args {json.dumps(job['args'])}")
    print(
        f"created {ts(job['created_at'])}  expires {ts(job['expires_at'])}  by {job['created_by']}"
    )
    print(_progress_line(job))
    rows = []
    for r in job["results"]:
        detail = r["error"] or ""
        if not detail and r["result"] is not None:
            detail = json.dumps(r["result"])
        if len(detail) > 80:
            detail = detail[:77] + "..."
        state = r["state"]
        if r.get("reason"):
            state = f"{state} ({r['reason']})"
        rows.append([r["agent"], state, detail])
    print(table(rows, ["AGENT", "STATE", "RESULT / ERROR"]))


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
    body: dict[str, Any] = {"action": args.action, "args": job_args(args.arg or [])}
    if args.args_json:
        extra = arg_value(args.args_json)
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
            dump({"job": job_id})
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
    if args.csv:  # agent, name, state, times, exit code, error (the server writes it)
        sys.stdout.write(api.call("GET", f"/jobs/{quote(args.id)}/results.csv", text=True))
        return 0
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
    query = [("limit", str(args.limit))]
    for key in ("state", "action", "before"):
        if getattr(args, key) is not None:
            query.append((key, getattr(args, key)))
    if args.since is not None:
        query.append(("since", str(time.time() - args.since)))
    page = api.call("GET", "/jobs?" + urllib.parse.urlencode(query))
    jobs = page["jobs"]
    if page.get("next"):
        print(f"more: tcm jobs list --before {page['next']} ...", file=sys.stderr)
    if args.json:
        dump(jobs)
        return 0
    rows = []
    for j in jobs:
        states = j["states"]
        done = sum(states.get(s, 0) for s in ("succeeded", *UNSUCCESSFUL))
        rows.append(
            [
                j["id"],
                j["action"],
                ts(j["created_at"]),
                f"{done}/{sum(states.values())}",
                str(states.get("failed", 0)),
            ]
        )
    print(table(rows, ["JOB", "ACTION", "CREATED", "DONE", "FAILED"]))
    return 0


def cmd_jobs_follow(api: Api, args) -> int:
    """Print a job's output as it arrives, until every target has finished; exit 1 when any
    target failed, expired, was canceled or is unsupported."""
    after = 0
    while True:
        # The state first: once it says finished, all output is stored, and what is left is
        # read without waiting, so a finished job returns at once.
        job = api.call("GET", f"/jobs/{quote(args.id)}?results=false")
        counts = job["counts"]
        done = counts["completed"] >= counts["total"]
        wait = 0 if done else 10
        chunks = api.call("GET", f"/jobs/{quote(args.id)}/output?after={after}&wait={wait}")[
            "output"
        ]
        for c in chunks:
            after = max(after, c["id"])
            prefix = f"[{c['agent_id']}] " if not args.raw else ""
            stream = sys.stderr if c["stream"] == "stderr" else sys.stdout
            for line in c["text"].splitlines(keepends=True):
                stream.write(prefix + line)
            stream.flush()
        if done and not chunks:
            print(_progress_line(job), file=sys.stderr)
            return 1 if any(counts.get(s, 0) for s in UNSUCCESSFUL) else 0


def cmd_jobs_cancel(api: Api, args) -> int:
    """Cancel a job (or its targets on --agents): not started ones end at once, running
    ones are told to stop."""
    body: dict[str, Any] = {}
    if args.agents:
        body["agents"] = [a for a in args.agents.split(",") if a]
        if not body["agents"]:
            raise CliError("--agents needs agent ids separated by commas")
    out = api.call("POST", f"/jobs/{quote(args.id)}/cancel", body)
    if args.json:
        dump(out)
        return 0
    print(
        f"job {out['job']}: {len(out['canceled'])} targets canceled, "
        f"{len(out['stopping'])} running told to stop"
    )
    return 0


def _argument_summary(schema: dict[str, Any] | None) -> str:
    """The arguments a schema names, required ones marked: "argv*, cwd, env"."""
    if not schema:
        return "-"
    required = set(schema.get("required", []))
    names = sorted(schema.get("properties", {}))
    return ", ".join(f"{n}*" if n in required else n for n in names) or "-"


def cmd_actions(api: Api, args) -> int:
    """What the enrolled agents advertise, and how many have each action."""
    actions = api.call("GET", "/actions")["actions"]
    if args.json:
        dump(actions)
        return 0
    rows = [
        [
            a["name"],
            str(a["agents"]),
            "task" if a["task"] else "quick",
            _argument_summary(a.get("schema")),
        ]
        for a in actions
    ]
    print(table(rows, ["ACTION", "AGENTS", "KIND", "ARGUMENTS (* required)"]))
    return 0


def cmd_inventory_show(api: Api, args) -> int:
    agent = quote(args.agent)
    if args.history:
        query = "?" + urllib.parse.urlencode({"class": args.cls}) if args.cls else ""
        versions = api.call("GET", f"/agents/{agent}/inventory/history{query}")["versions"]
        if args.json:
            dump(versions)
            return 0
        rows = [
            [
                v["class"],
                str(v["version"]) + (" (current)" if v["current"] else ""),
                v["digest"][:16],
                ts(v["collected_at"]),
                ts(v["changed_at"]),
                ts(v["replaced_at"]) if v["replaced_at"] else "-",
            ]
            for v in versions
        ]
        print(table(rows, ["CLASS", "VERSION", "DIGEST", "COLLECTED", "CHANGED", "REPLACED"]))
        return 0
    if args.cls:
        query = f"?version={args.version}" if args.version else ""
        c = api.call("GET", f"/agents/{agent}/inventory/classes/{quote(args.cls)}{query}")
        if args.json:
            dump(c)
            return 0
        _print_class(args.cls, c)
        return 0
    inv = api.call("GET", f"/agents/{agent}/inventory")
    if args.json:
        dump(inv)
        return 0
    for name in sorted(inv["classes"]):
        _print_class(name, inv["classes"][name])
    return 0


def _print_class(name: str, c: dict[str, Any]) -> None:
    version = f"  version {c['version']}" if "version" in c else ""
    print(f"[{name}]{version}  collected {ts(c['collected_at'])}  changed {ts(c['changed_at'])}")
    print(json.dumps(c["data"], indent=2, sort_keys=True))


def cmd_inventory_diff(api: Api, args) -> int:
    query = {k: v for k, v in (("from", args.old), ("to", args.new)) if v is not None}
    path = f"/agents/{quote(args.agent)}/inventory/classes/{quote(args.cls)}/diff"
    d = api.call("GET", path + ("?" + urllib.parse.urlencode(query) if query else ""))
    if args.json:
        dump(d)
        return 0
    print(f"{d['class']} of {d['agent']}: version {d['from']} -> {d['to']}")
    for key, value in d["added"].items():
        print(f"+ {key} = {json.dumps(value)}")
    for key, value in d["removed"].items():
        print(f"- {key} = {json.dumps(value)}")
    for key, (old, new) in d["changed"].items():
        print(f"~ {key}: {json.dumps(old)} -> {json.dumps(new)}")
    if not (d["added"] or d["removed"] or d["changed"]):
        print("(no difference)")
    return 0


def cmd_inventory_stale(api: Api, args) -> int:
    query = [("older_than", str(args.older_than))]
    if args.target:
        query.append(("target", args.target))
    for cls in args.cls or []:
        query.append(("class", cls))
    stale = api.call("GET", "/inventory/stale?" + urllib.parse.urlencode(query))["stale"]
    if args.json:
        dump(stale)
        return 0
    rows = [
        [s["agent"], s["class"], ts(s["collected_at"]) if s["collected_at"] else "never"]
        for s in stale
    ]
    print(table(rows, ["AGENT", "CLASS", "COLLECTED"]))
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
        dump(jobs)
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


def add_commands(sub: Any) -> None:
    """Add this module's commands to the `tcm` parser's subcommands."""
    s = sub.add_parser("run", help="run an action on agents")
    s.add_argument("action")
    s.add_argument(
        "--arg",
        action="append",
        metavar="KEY=VALUE",
        help="an argument; VALUE is JSON if it parses, else a string (a VALUE starting "
        'with [, { or " must be valid JSON)',
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

    jobs = sub.add_parser(
        "jobs",
        help="list, show, follow and cancel jobs",
        description="Jobs: an action sent to agents (created by `tcm run`).",
    )
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    s = jsub.add_parser("list", help="jobs, newest first, filtered, a page at a time")
    s.add_argument(
        "--state",
        help="jobs with a target in this state (pending, running, failed, ...), or active / "
        "finished",
    )
    s.add_argument("--action", help="only jobs of this action")
    s.add_argument("--since", type=duration, help="only jobs created in the last ... (e.g. 1h)")
    s.add_argument("--limit", type=int, default=100, help="at most this many (1..1000)")
    s.add_argument("--before", metavar="JOB", help="the page after this job (printed as 'more')")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_jobs_list)
    s = jsub.add_parser("show", help="a job's counts and every target's state and result")
    s.add_argument("id")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument(
        "--csv",
        action="store_true",
        help="agent, name, state, delivered/started/finished times, exit code, error",
    )
    s.set_defaults(func=cmd_jobs_show)
    s = jsub.add_parser(
        "follow",
        help="print a job's output as it arrives until it finishes "
        "(exit 1 if a target failed, expired, was canceled or is unsupported)",
    )
    s.add_argument("id")
    s.add_argument("--raw", action="store_true", help="no agent prefix")
    s.set_defaults(func=cmd_jobs_follow)
    s = jsub.add_parser(
        "cancel",
        help="cancel a job: targets not started end at once, running ones are stopped",
    )
    s.add_argument("id")
    s.add_argument("--agents", help="only these agents' targets (ids separated by commas)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_jobs_cancel)

    s = sub.add_parser(
        "actions", help="the actions enrolled agents advertise, and how many have each"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_actions)

    inv = sub.add_parser("inventory", help="inventory per agent and data class")
    invsub = inv.add_subparsers(dest="inventory_command", required=True)
    s = invsub.add_parser("show", help="an agent's stored inventory")
    s.add_argument("agent")
    s.add_argument("--class", dest="cls", help="only this class")
    s.add_argument("--version", type=int, help="with --class: this version (default: current)")
    s.add_argument(
        "--history", action="store_true", help="the versions kept (of --class, or of all)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inventory_show)
    s = invsub.add_parser("diff", help="what changed in a class between two versions")
    s.add_argument("agent")
    s.add_argument("--class", dest="cls", required=True, help="the inventory class")
    s.add_argument("--from", dest="old", type=int, help="version (default: the one before --to)")
    s.add_argument("--to", dest="new", type=int, help="version (default: the current one)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inventory_diff)
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
