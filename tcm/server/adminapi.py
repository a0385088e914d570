"""The admin REST API (/api/v1/...): agents, enrollment tokens, jobs, settings, targets,
groups, inventory freshness, API tokens and the audit log.

Every request carries `Authorization: Bearer <token>`: the bootstrap admin token (in
`admin.token` in the server's state directory) or a named API token (`tcm apitoken create`).
Every route needs one permission of the token's role (tcm/server/roles.py): a refusal is a
403 naming the role and what it lacks. Every change is written to the audit log.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from tcm.server import apischema, inventory, openapi
from tcm.server.roles import ROLES, Refused, Unauthenticated
from tcm.server.targets import NAME, FilterError, UnknownTarget, parse
from tcm.server.web import ApiError, JsonRouter, Reply, json_object
from tcm.store.store import Conflict

if TYPE_CHECKING:
    from tcm.server.service import ServerCore

ACTION_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
JOB_STATES = ("pending", "delivered", "running", "succeeded", "failed", "expired")
SELECTORS = ("filter", "agents", "from_job", "target")


def filter_error(e: FilterError) -> ApiError:
    return ApiError(400, f"bad filter: {e}", position=e.position)


def _name(body: dict[str, Any], what: str) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ApiError(
            400,
            f"'name' of a {what} must be 1-64 letters, digits, '_', '.', '-' (first a "
            "letter or digit)",
        )
    return name


def _id_list(value: Any, what: str) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(a, str) for a in value)):
        raise ApiError(400, f"'{what}' must be a list of agent ids")
    return list(dict.fromkeys(value))


def _seconds(request, arg: str, default: float | None = None) -> float | None:
    raw = request.args.get(arg.encode(), [None])[0]
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"'{arg}' must be a number of seconds") from None
    if value != value or value < 0:
        raise ApiError(400, f"'{arg}' must be a number of seconds >= 0")
    return value


class AdminAPI(JsonRouter):
    """/api/v1."""

    def __init__(self, core: ServerCore):
        super().__init__("/api/v1", apischema.OPERATIONS)
        self.core = core
        self._permissions: dict[Any, tuple[str, str]] = {}
        self.route("GET", "/status", self.status)
        self.route("GET", "/openapi.json", openapi.serve)
        self.route("GET", "/agents", self.agents)
        self.route("GET", "/agents/{agent}", self.agent)
        self.route("GET", "/agents/{agent}/inventory", self.agent_inventory)
        self.route("POST", "/agents/{agent}/revoke", self.revoke_agent, "admin", "revoke agents")
        self.route("POST", "/agents/{agent}/approve", self.approve_agent, "admin", "approve agents")
        self.route("POST", "/tokens", self.create_token, "admin", "create enrollment tokens")
        self.route("GET", "/tokens", self.tokens)
        self.route("POST", "/jobs", self.create_job, "run", "create jobs")
        self.route("GET", "/jobs", self.jobs)
        self.route("GET", "/jobs/{job}", self.job)
        self.route("GET", "/jobs/{job}/output", self.job_output)
        self.route("GET", "/settings", self.settings)
        self.route("PUT", "/settings", self.change_settings, "admin", "change settings")
        self.route("GET", "/targets", self.targets)
        self.route("POST", "/targets", self.create_target, "admin", "create targets")
        self.route("GET", "/targets/{name}", self.target)
        self.route("DELETE", "/targets/{name}", self.delete_target, "admin", "delete targets")
        self.route("GET", "/targets/{name}/members", self.target_members)
        self.route("POST", "/selection", self.selection, "read", "read")
        self.route("GET", "/groups", self.groups)
        self.route("POST", "/groups", self.create_group, "admin", "create groups")
        self.route("GET", "/groups/{name}", self.group)
        self.route("DELETE", "/groups/{name}", self.delete_group, "admin", "delete groups")
        self.route("POST", "/groups/{name}/members", self.change_group, "admin", "change groups")
        self.route("GET", "/inventory/stale", self.inventory_stale)
        self.route("POST", "/inventory/refresh", self.inventory_refresh, "run", "create jobs")
        self.route("GET", "/apitokens", self.api_tokens)
        self.route("POST", "/apitokens", self.create_api_token, "admin", "create API tokens")
        self.route(
            "DELETE", "/apitokens/{name}", self.revoke_api_token, "admin", "revoke API tokens"
        )
        self.route("GET", "/audit", self.audit)
        self.route("GET", "/ca", self.ca)
        self.route("GET", "/policies", self.policies)
        self.route("POST", "/policies", self.create_policy, "admin", "create policies")
        self.route("GET", "/policies/{name}", self.policy)
        self.route("PUT", "/policies/{name}", self.update_policy, "admin", "change policies")
        self.route("DELETE", "/policies/{name}", self.delete_policy, "admin", "delete policies")
        self.route("POST", "/policies/{name}/push", self.push_policy, "policy", "push policies")
        self.route("GET", "/profiles", self.profiles)
        self.route("POST", "/profiles", self.create_profile, "admin", "create profiles")
        self.route("GET", "/profiles/{name}", self.profile)
        self.route("PUT", "/profiles/{name}", self.update_profile, "admin", "change profiles")
        self.route("DELETE", "/profiles/{name}", self.delete_profile, "admin", "delete profiles")

        self.route("GET", "/taskservers", self.taskservers)
        self.route(
            "POST", "/taskservers", self.register_taskserver, "admin", "register task servers"
        )
        self.route("GET", "/gateways", self.gateways)
        self.route("POST", "/gateways", self.register_gateway, "admin", "register gateways")

    def route(
        self, method: str, pattern: str, handler, permission: str | None = None, doing=None
    ) -> None:
        """Add a route needing `permission` (default: "read" for GET, else "admin");
        `doing` names the act in a refusal ("create jobs")."""
        super().route(method, pattern, handler)
        if permission is None:
            permission = "read" if method == "GET" else "admin"
        self._permissions[handler] = (permission, doing or f"{method} {pattern}")

    def authorize(self, request, handler) -> None:
        raw = request.getHeader(b"authorization") or b""
        header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
        try:
            who = self.core.tokens.authenticate(token.strip(), self.core.clock.seconds())
        except Unauthenticated as e:
            raise ApiError(401, str(e)) from None
        permission, doing = self._permissions.get(handler, ("admin", "do this"))
        try:
            who.require(permission, doing)
        except Refused as e:
            raise self.refusal(e) from None
        request.who = who  # the Principal
        request.principal = who.name

    @staticmethod
    def refusal(e: Refused) -> ApiError:
        return ApiError(403, e.reason, role=e.role, lacks=e.lacks)

    def status(self, request):
        return {
            "version": self.core.version,
            "name": self.core.name,
            "sessions": len(self.core.registry),
            "agents": len(self.core.directory),
            "active_jobs": len(self.core.jobs.book.jobs),
        }

    def _agent_view(self, row: dict[str, Any]) -> dict[str, Any]:
        session = self.core.registry.get(row["id"])
        return {
            "id": row["id"],
            "hostname": row["hostname"],
            "platform": row["platform"],
            "online": session is not None,
            "mode": "persistent" if session else self.core.http_mode_of(row["id"]),
            "via": session.via if session else None,
            "connected_since": session.connected_at if session else None,
            "tls": session.tls if session else None,
            "last_seen": self.core.clock.seconds()
            if session
            else max(row["last_seen"] or 0, self.core.last_poll.get(row["id"], 0)) or None,
            "enrolled_at": row["enrolled_at"],
            "revoked": bool(row["revoked"]),
            "approved": bool(row.get("approved", True)),
            "capabilities": [c["name"] for c in row["capabilities"] or []],
            **self.core.agent_config.running(row["id"]),
        }

    @inlineCallbacks
    def agents(self, request):
        rows = yield self.core.store.list_agents()
        return {"agents": [self._agent_view(r) for r in rows]}

    @inlineCallbacks
    def agent(self, request, agent: str):
        row = yield self.core.store.get_agent(agent)
        if row is None:
            raise ApiError(404, f"no such agent: {agent}")
        return self._agent_view(row)

    @inlineCallbacks
    def create_token(self, request):
        body = json_object(request)
        ttl, uses = body.get("ttl"), body.get("uses")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0
        ):
            raise ApiError(400, "'ttl' must be a positive number of seconds")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 1):
            raise ApiError(400, "'uses' must be a positive integer")
        description = str(body.get("description", ""))
        profile = body.get("profile")
        if profile is not None and profile not in self.core.agent_config.profiles:
            raise ApiError(400, f"no such profile: {profile!r}")
        token = yield self.core.store.create_token(ttl, uses, description, profile)
        yield self.core.audit(
            request.who,
            "token.create",
            token.partition(".")[0],
            {"ttl": ttl, "uses": uses, "description": description, "profile": profile},
        )
        return Reply({"token": token, "ttl": ttl, "uses": uses, "profile": profile}, status=201)

    @inlineCallbacks
    def tokens(self, request):
        return {"tokens": (yield self.core.store.list_tokens())}

    @inlineCallbacks
    def create_job(self, request):
        body = json_object(request)
        action = body.get("action")
        if not isinstance(action, str) or not ACTION_NAME.match(action):
            raise ApiError(400, "'action' must be an action name like 'inventory.collect'")
        args = body.get("args", {})
        if not isinstance(args, dict):
            raise ApiError(400, "'args' must be a JSON object")
        targets, target = body.get("targets"), body.get("target")
        if (targets is None) == (target is None):
            raise ApiError(
                400, "give either 'targets' (\"all\" or agent ids) or 'target' (a target name)"
            )
        if target is not None:
            if not isinstance(target, str):
                raise ApiError(400, "'target' must be a target name")
            recipients = sorted((yield self._members(target)))
            if not recipients:
                raise ApiError(400, f"target {target!r} has no members now")
        elif targets != "all" and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
        ):
            raise ApiError(400, "'targets' must be \"all\" or a non-empty list of agent ids")
        else:
            recipients = targets
        ttl, timeout = body.get("ttl"), body.get("timeout")
        for name, value in (("ttl", ttl), ("timeout", timeout)):
            if value is not None and not isinstance(value, (int, float)):
                raise ApiError(400, f"'{name}' must be a number of seconds")
        yield self._check_scope(request, recipients)
        job_id = yield self.core.jobs.create(
            action, args, recipients, ttl, timeout, created_by=request.principal
        )
        yield self.core.audit(
            request.who,
            "job.create",
            job_id,
            {
                "action": action,
                "target": target,
                "agents": len(recipients) if recipients != "all" else "all",
            },
        )
        return Reply({"job": job_id}, status=201)

    @inlineCallbacks
    def jobs(self, request):
        rows = yield self.core.store.list_jobs()
        return {"jobs": rows}

    def job(self, request, job: str):
        """A job; `?results=false` gives its counts only (cheap to poll for big jobs)."""
        results = request.args.get(b"results", [b"true"])[0].lower() not in (b"false", b"0")
        return self.core.jobs.status(job, results=results)

    def settings(self, request):
        return dict(self.core.settings)

    @inlineCallbacks
    def change_settings(self, request):
        body = json_object(request)
        if not body:
            raise ApiError(400, "give at least one setting to change")
        settings = yield self.core.change_settings(body)
        yield self.core.audit(request.who, "settings.change", ",".join(sorted(body)), body)
        return settings

    @inlineCallbacks
    def job_output(self, request, job: str):
        after = request.args.get(b"after", [b"0"])[0]
        try:
            after_id = int(after)
        except ValueError:
            raise ApiError(400, "'after' must be an integer") from None
        try:
            wait = float(request.args.get(b"wait", [b"0"])[0])
        except ValueError:
            raise ApiError(400, "'wait' must be a number of seconds") from None
        if not 0 <= wait <= 60:
            raise ApiError(400, "'wait' must be 0..60 seconds")
        rows = yield self.core.store.get_output(job, after_id)
        if not rows and wait > 0:
            # Follow live: answered as soon as the job's next output is stored (or its
            # targets finish), at the latest after `wait` seconds.
            yield self.core.jobs.output_waiter(job, wait)
            rows = yield self.core.store.get_output(job, after_id)
        return {"output": rows}

    # -- task servers --------------------------------------------------------------------
    def taskservers(self, request):
        """Registered task servers with their state and client counts."""
        core = self.core
        out = []
        for name in sorted(core.nodes.task_servers()):
            record = core.nodes.records[name]
            node = core.nodes.links.get(name)
            assignments = core.assignments
            connected = node is not None and node.ready
            if record.get("revoked"):
                state = "revoked"
            elif record.get("fingerprint") is None:
                state = "awaiting enrollment"
            elif not connected:
                state = "down"
            elif assignments.full(name):
                state = "full"
            else:
                state = "up"
            out.append(
                {
                    "name": name,
                    "url": node.url if connected else record.get("url"),
                    "state": state,
                    "clients": node.open_sessions() if connected else 0,
                    # of those, task sessions a gateway carries here (agents outside)
                    "via_gateways": sum(
                        1 for s in node.sessions.values() if " via gateway:" in s.via
                    )
                    if connected
                    else 0,
                    "assigned": assignments.counts.get(name, 0),
                    "max_clients": assignments.capacity(name)
                    if connected
                    else record.get("max_clients") or assignments.default_max,
                    "registered_at": record["registered_at"],
                    "enrolled_at": record.get("enrolled_at"),
                    "link": {
                        "frames_in": node.frames_in,
                        "frames_out": node.frames_out,
                        "pushes": node.pushes,
                    }
                    if connected
                    else None,
                }
            )
        return {"policy": core.assignments.policy, "taskservers": out}

    @inlineCallbacks
    def approve_agent(self, request, agent: str):
        """Approve an agent that enrolled while require_approval was on."""
        changed = yield self.core.approve_agent(agent)
        if changed:
            yield self.core.audit(request.who, "agent.approve", agent, {})
        return {"agent_id": agent, "approved": True, "changed": changed}

    @inlineCallbacks
    def revoke_agent(self, request, agent: str):
        """Revoke an agent: refused everywhere from now on, its sessions closed (4007)."""
        changed = yield self.core.revoke_agent(agent)
        if changed:
            yield self.core.audit(request.who, "agent.revoke", agent, {})
        return {"agent_id": agent, "revoked": True, "changed": changed}

    # -- gateways ------------------------------------------------------------------------
    def gateways(self, request):
        """Registered gateways, each with its live links (one per worker process)."""
        core = self.core
        out = []
        for name in sorted(core.nodes.gateways()):
            record = core.nodes.records[name]
            links = [n for n in core.nodes.links.values() if n.name == name and n.ready]
            if record.get("revoked"):
                state = "revoked"
            elif record.get("fingerprint") is None:
                state = "awaiting enrollment"
            else:
                state = "up" if links else "down"
            out.append(
                {
                    "name": name,
                    "state": state,
                    "url": links[0].url if links else record.get("url"),
                    "sessions": sum(n.open_sessions("core") for n in links),
                    "task_sessions": sum(n.open_sessions("task") for n in links),
                    # task servers it links to: its agents' task sessions go there through it
                    "task_servers": sorted({t for n in links for t in n.reach}),
                    "registered_at": record["registered_at"],
                    "enrolled_at": record.get("enrolled_at"),
                    "links": [
                        {
                            "worker": n.worker,
                            "sessions": n.open_sessions("core"),
                            "task_sessions": n.open_sessions("task"),
                            "task_servers": list(n.reach),
                            "connections": len(n.sessions),
                            "frames_in": n.frames_in,
                            "frames_out": n.frames_out,
                            "pushes": n.pushes,
                            "requests": n.requests,
                        }
                        for n in sorted(links, key=lambda n: n.worker or 0)
                    ],
                }
            )
        return {"server": core.name, "gateways": out}

    def register_gateway(self, request):
        """Register a gateway; the answer holds its one-time enrollment token."""
        return self._register_node(request, "gateway")

    def register_taskserver(self, request):
        """Register a task server; the answer holds its one-time enrollment token."""
        return self._register_node(request, "taskserver")

    @inlineCallbacks
    def _register_node(self, request, role: str):
        from tcm.server.nodeapi import NODE_NAME
        from tcm.store.store import TokenRefused

        body = json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not NODE_NAME.match(name):
            raise ApiError(400, "'name' must be a node name like 'ts1' (a-z, 0-9, _ . -)")
        if role == "gateway" and body.get("max_clients") is not None:
            raise ApiError(400, "'max_clients' is for task servers; a gateway sets its own")
        max_clients = body.get("max_clients")
        if max_clients is not None and (
            isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1
        ):
            raise ApiError(400, "'max_clients' must be a positive integer")
        ttl = body.get("ttl", 3600)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= 30 * 86400:
            raise ApiError(400, "'ttl' must be a number of seconds up to 30 days")
        try:
            secret = yield self.core.store.register_node(
                name, role, max_clients, float(ttl), self.core.clock.seconds()
            )
        except TokenRefused as e:
            raise ApiError(409, str(e)) from None
        yield self.core.reload_nodes()
        yield self.core.audit(
            request.who, f"{role}.register", name, {"max_clients": max_clients, "ttl": ttl}
        )
        return Reply(
            {"name": name, "token": f"{name}.{secret}", "ttl": ttl, "max_clients": max_clients},
            status=201,
        )

    # -- selections and targets ----------------------------------------------------------
    @inlineCallbacks
    def _members(self, name: str):
        """A saved target's members now (404 unknown, 400 a stored filter that broke)."""
        try:
            return (yield self.core.resolve_target(name))
        except UnknownTarget:
            raise ApiError(404, f"no such target: {name}") from None
        except FilterError as e:
            raise filter_error(e) from None

    @inlineCallbacks
    def _check_scope(self, request, recipients: list[str] | str):
        """403 when a token scoped to a target addresses agents outside it."""
        who = request.who
        if who.target is None:
            return
        agents = set(self.core.directory.ids()) if recipients == "all" else set(recipients)
        try:
            scope = yield self.core.resolve_target(who.target)
        except (UnknownTarget, FilterError):
            scope = set()
        try:
            who.require_recipients(agents, scope)
        except Refused as e:
            raise self.refusal(e) from None

    @inlineCallbacks
    def _select(self, body: dict[str, Any]):
        """The agents a selection names: ("filter", text) or ("agents", sorted ids).

        One of: `filter` (an expression), `agents` (ids), `from_job` (a job id, with
        `state`: a state or a list of states, default every state), `target` (a saved
        target's members now)."""
        given = [k for k in SELECTORS if body.get(k) is not None]
        if len(given) != 1:
            raise ApiError(400, f"give exactly one of {', '.join(SELECTORS)}")
        kind = given[0]
        if kind != "from_job" and body.get("state") is not None:
            raise ApiError(400, "'state' goes with 'from_job'")
        if kind == "filter":
            text = body["filter"]
            if not isinstance(text, str):
                raise ApiError(400, "'filter' must be a string")
            try:
                parse(text)
            except FilterError as e:
                raise filter_error(e) from None
            return "filter", text
        if kind == "agents":
            ids = _id_list(body["agents"], "agents")
            unknown = sorted(set(ids) - set(self.core.directory.ids()))
            if unknown:
                raise ApiError(400, "unknown agent ids", unknown=unknown[:50])
            return "agents", sorted(ids)
        if kind == "target":
            if not isinstance(body["target"], str):
                raise ApiError(400, "'target' must be a target name")
            return "agents", sorted((yield self._members(body["target"])))
        job_id = body["from_job"]
        states = body.get("state")
        if isinstance(states, str):
            states = [states]
        if states is not None and not (
            isinstance(states, list) and states and all(s in JOB_STATES for s in states)
        ):
            raise ApiError(400, f"'state' must be one or more of {', '.join(JOB_STATES)}")
        if not isinstance(job_id, str):
            raise ApiError(400, "'from_job' must be a job id")
        agents = yield self.core.store.job_agents(job_id, states)
        if agents is None:
            raise ApiError(404, f"no such job: {job_id}")
        return "agents", agents

    def _member_rows(self, views: list[dict[str, Any]], ids: set[str]) -> list[dict[str, Any]]:
        return [
            {
                "id": v["id"],
                "name": v["name"],
                "platform": v["platform"],
                "online": v["online"],
                "mode": v["mode"],
                "group": v["group"],
            }
            for v in sorted(views, key=lambda v: v["id"])
            if v["id"] in ids
        ]

    @inlineCallbacks
    def selection(self, request):
        """The members of a selection (as for a target), without saving it."""
        kind, value = yield self._select(json_object(request))
        if kind == "filter":
            f = parse(value)
            views = yield self.core.agent_views(f.roots)
            ids = f.select(views)
        else:
            views = yield self.core.agent_views()
            ids = set(value)
        return {"members": self._member_rows(views, ids)}

    @inlineCallbacks
    def create_target(self, request):
        body = json_object(request)
        name = _name(body, "target")
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > 255:
            raise ApiError(400, "'description' must be a string of at most 255 characters")
        kind, value = yield self._select(body)
        row = {
            "name": name,
            "filter": value if kind == "filter" else None,
            "agents": value if kind == "agents" else None,
            "description": description,
            "created_at": self.core.clock.seconds(),
            "created_by": request.principal,
        }
        try:
            yield self.core.store.create_target(row)
        except Conflict as e:
            raise ApiError(409, str(e)) from None
        details = {k: body[k] for k in (*SELECTORS, "state") if body.get(k) is not None}
        if kind == "agents":
            details["agents"] = value
        yield self.core.audit(request.who, "target.create", name, details)
        return Reply(self._target_view(row), status=201)

    @staticmethod
    def _target_view(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": row["name"],
            "kind": "filter" if row["filter"] is not None else "static",
            "filter": row["filter"],
            "agents": row["agents"],
            "description": row["description"],
            "created_at": row["created_at"],
            "created_by": row["created_by"],
        }

    @inlineCallbacks
    def targets(self, request):
        rows = yield self.core.store.list_targets()
        return {"targets": [self._target_view(r) for r in rows]}

    @inlineCallbacks
    def target(self, request, name: str):
        row = yield self.core.store.get_target(name)
        if row is None:
            raise ApiError(404, f"no such target: {name}")
        members = yield self._members(name)
        return {**self._target_view(row), "members": len(members)}

    @inlineCallbacks
    def target_members(self, request, name: str):
        ids = yield self._members(name)
        views = yield self.core.agent_views()
        return {"target": name, "members": self._member_rows(views, ids)}

    @inlineCallbacks
    def delete_target(self, request, name: str):
        if not (yield self.core.store.delete_target(name)):
            raise ApiError(404, f"no such target: {name}")
        yield self.core.audit(request.who, "target.delete", name)
        return Reply(None, status=204)

    # -- groups ----------------------------------------------------------------------------
    def _known(self, ids: list[str]) -> None:
        unknown = sorted(set(ids) - set(self.core.directory.ids()))
        if unknown:
            raise ApiError(400, "unknown agent ids", unknown=unknown[:50])

    @inlineCallbacks
    def create_group(self, request):
        body = json_object(request)
        name = _name(body, "group")
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > 255:
            raise ApiError(400, "'description' must be a string of at most 255 characters")
        agents = _id_list(body.get("agents", []), "agents")
        self._known(agents)
        try:
            yield self.core.store.create_group(name, description, self.core.clock.seconds(), agents)
        except Conflict as e:
            raise ApiError(409, str(e)) from None
        yield self.core.audit(request.who, "group.create", name, {"agents": agents})
        return Reply((yield self.core.store.get_group(name)), status=201)

    @inlineCallbacks
    def groups(self, request):
        return {"groups": (yield self.core.store.list_groups())}

    @inlineCallbacks
    def group(self, request, name: str):
        row = yield self.core.store.get_group(name)
        if row is None:
            raise ApiError(404, f"no such group: {name}")
        return row

    @inlineCallbacks
    def delete_group(self, request, name: str):
        if not (yield self.core.store.delete_group(name)):
            raise ApiError(404, f"no such group: {name}")
        yield self.core.audit(request.who, "group.delete", name)
        return Reply(None, status=204)

    @inlineCallbacks
    def change_group(self, request, name: str):
        """Body {"add": [ids], "remove": [ids]} (either may be absent)."""
        body = json_object(request)
        add = _id_list(body.get("add", []), "add")
        remove = _id_list(body.get("remove", []), "remove")
        if not add and not remove:
            raise ApiError(400, "give agent ids to 'add' or 'remove'")
        self._known(add)
        if not (yield self.core.store.change_group(name, add, remove)):
            raise ApiError(404, f"no such group: {name}")
        yield self.core.audit(request.who, "group.change", name, {"add": add, "remove": remove})
        return (yield self.core.store.get_group(name))

    # -- inventory -------------------------------------------------------------------------
    @inlineCallbacks
    def agent_inventory(self, request, agent: str):
        row = yield self.core.store.get_agent(agent)
        if row is None:
            raise ApiError(404, f"no such agent: {agent}")
        return {"agent": agent, "classes": (yield self.core.store.get_inventory(agent))}

    @inlineCallbacks
    def _stale(self, older_than: float, target: Any, classes: Any):
        if classes is None:
            classes = list(inventory.CLASSES)
        elif not (
            isinstance(classes, list)
            and classes
            and all(isinstance(c, str) and 0 < len(c) <= 64 for c in classes)
        ):
            raise ApiError(400, "'classes' must be a non-empty list of inventory class names")
        if target is None:
            agents = set(self.core.directory.ids())
        elif isinstance(target, str):
            agents = yield self._members(target)
        else:
            raise ApiError(400, "'target' must be a target name")
        times = yield self.core.store.inventory_times()
        now = self.core.clock.seconds()
        items = inventory.stale(
            {k: v[0] for k, v in times.items()}, agents, classes, now, older_than
        )
        return items, {k: v[1] for k, v in times.items()}

    @inlineCallbacks
    def inventory_stale(self, request):
        """?older_than=S (default 3600), &target=NAME, &class=C (repeatable)."""
        older_than = _seconds(request, "older_than", 3600.0)
        target = request.args.get(b"target", [None])[0]
        classes = [c.decode("utf-8", "replace") for c in request.args.get(b"class", [])]
        items, _ = yield self._stale(
            older_than,
            target.decode("utf-8", "replace") if target is not None else None,
            classes or None,
        )
        return {"older_than": older_than, "stale": [i.to_dict() for i in items]}

    @inlineCallbacks
    def inventory_refresh(self, request):
        """Collect just the stale classes from just those agents: one job per class set."""
        body = json_object(request)
        older_than = body.get("older_than", 3600)
        if isinstance(older_than, bool) or not isinstance(older_than, int | float):
            raise ApiError(400, "'older_than' must be a number of seconds")
        if older_than < 0:
            raise ApiError(400, "'older_than' must be a number of seconds >= 0")
        ttl = body.get("ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
            raise ApiError(400, "'ttl' must be a number of seconds")
        items, digests = yield self._stale(
            float(older_than), body.get("target"), body.get("classes")
        )
        plan = inventory.refresh_plan(items, digests)
        yield self._check_scope(request, sorted({a for job in plan for a in job.agents}))
        created = []
        for job in plan:
            job_id = yield self.core.jobs.create(
                inventory.ACTION,
                job.args(),
                list(job.agents),
                ttl,
                None,
                created_by=request.principal,
            )
            created.append({"job": job_id, "classes": list(job.classes), "agents": job.agents})
        if not created:
            return {"jobs": []}  # nothing stale: nothing changed, nothing to audit
        yield self.core.audit(
            request.who,
            "inventory.refresh",
            body.get("target") or "",
            {"older_than": older_than, "jobs": [c["job"] for c in created]},
        )
        return Reply({"jobs": created}, status=201)

    # -- API tokens and the audit log ------------------------------------------------------
    @inlineCallbacks
    def create_api_token(self, request):
        body = json_object(request)
        name = _name(body, "API token")
        if name == "admin":
            raise ApiError(400, "'admin' is the bootstrap token's name; choose another")
        role = body.get("role")
        if role not in ROLES:
            raise ApiError(400, f"'role' must be one of {', '.join(ROLES)}")
        target = body.get("target")
        if target is not None:
            if not isinstance(target, str):
                raise ApiError(400, "'target' must be a target name")
            if (yield self.core.store.get_target(target)) is None:
                raise ApiError(400, f"no such target: {target}")
        ttl = body.get("ttl")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0
        ):
            raise ApiError(400, "'ttl' must be a positive number of seconds")
        now = self.core.clock.seconds()
        try:
            token, row = yield self.core.store.create_api_token(
                name, role, target, now + ttl if ttl else None, request.principal, now
            )
        except Conflict as e:
            raise ApiError(409, str(e)) from None
        self.core.tokens.add(row)
        yield self.core.audit(
            request.who,
            "apitoken.create",
            name,
            {"id": row["id"], "role": role, "target": target, "ttl": ttl},
        )
        view = {k: v for k, v in row.items() if k != "secret_hash"}
        return Reply({**view, "token": token}, status=201)

    @inlineCallbacks
    def api_tokens(self, request):
        return {"tokens": (yield self.core.store.list_api_tokens())}

    @inlineCallbacks
    def revoke_api_token(self, request, name: str):
        ids = yield self.core.store.revoke_api_token(name, self.core.clock.seconds())
        if not ids:
            raise ApiError(404, f"no active API token named {name!r}")
        self.core.tokens.remove(ids)
        yield self.core.audit(request.who, "apitoken.revoke", name, {"ids": ids})
        return Reply(None, status=204)

    @inlineCallbacks
    def audit(self, request):
        """?since=EPOCH_SECONDS, &limit=N (default 1000, newest N, oldest first)."""
        since = _seconds(request, "since")
        try:
            limit = int(request.args.get(b"limit", [b"1000"])[0])
        except ValueError:
            raise ApiError(400, "'limit' must be an integer") from None
        if not 1 <= limit <= 100000:
            raise ApiError(400, "'limit' must be 1..100000")
        return {"entries": (yield self.core.store.list_audit(since, limit))}

    def ca(self, request):
        """The CA certificate agents trust (PEM), for install packages."""
        return {"ca": self.core.ca.cert_pem.decode()}

    # -- policies ------------------------------------------------------------------------
    def policies(self, request):
        cfg = self.core.agent_config
        return {
            "policies": [cfg.policy_view(p) for _, p in sorted(cfg.policies.items())],
            "types": sorted(cfg.known_policy_types()),
        }

    @inlineCallbacks
    def policy(self, request, name: str):
        """A policy, with what each of its agents reports running."""
        cfg = self.core.agent_config
        view = cfg.policy_view(cfg.get_policy(name))
        agents = yield cfg.members(view["targets"])
        view["agents"] = {a: cfg.running(a)["policies"].get(name) for a in sorted(agents)}
        return view

    @inlineCallbacks
    def create_policy(self, request):
        view = yield self.core.agent_config.create_policy(json_object(request))
        yield self._audit_policy(request, "policy.create", view)
        return Reply(view, status=201)

    @inlineCallbacks
    def update_policy(self, request, name: str):
        view = yield self.core.agent_config.update_policy(name, json_object(request))
        yield self._audit_policy(request, "policy.update", view)
        return view

    @inlineCallbacks
    def delete_policy(self, request, name: str):
        result = yield self.core.agent_config.delete_policy(name)
        yield self.core.audit(request.who, "policy.delete", name)
        return result

    def _audit_policy(self, request, action: str, view: dict[str, Any]):
        details = {k: view[k] for k in ("type", "version", "targets", "document")}
        return self.core.audit(request.who, action, view["name"], details)

    @inlineCallbacks
    def push_policy(self, request, name: str):
        """PushPolicy: {"agents": {id: {"status": pushed|not connected|empty policy|failed}}}.
        `?wait=S`: how long to wait for each connected agent's report (default 10 s)."""
        try:
            wait = float(request.args.get(b"wait", [b"10"])[0])
        except ValueError:
            raise ApiError(400, "'wait' must be a number of seconds") from None
        if not 0 < wait <= 120:
            raise ApiError(400, "'wait' must be 0..120 seconds")
        policy = self.core.agent_config.get_policy(name)  # 404 before anything is written
        # a token scoped to a target may push only to agents inside it, as for jobs
        yield self._check_scope(
            request, sorted((yield self.core.agent_config.members(policy["targets"])))
        )
        result = yield self.core.agent_config.push(name, wait)
        statuses: dict[str, int] = {}
        for entry in result["agents"].values():
            statuses[entry["status"]] = statuses.get(entry["status"], 0) + 1
        yield self.core.audit(
            request.who, "policy.push", name, {"version": result["version"], "statuses": statuses}
        )
        return result

    # -- connection profiles -------------------------------------------------------------
    def profiles(self, request):
        cfg = self.core.agent_config
        return {"profiles": [cfg.profile_view(p) for _, p in sorted(cfg.profiles.items())]}

    def profile(self, request, name: str):
        cfg = self.core.agent_config
        return cfg.profile_view(cfg.get_profile(name))

    @inlineCallbacks
    def create_profile(self, request):
        view = yield self.core.agent_config.create_profile(json_object(request))
        yield self._audit_profile(request, "profile.create", view)
        return Reply(view, status=201)

    @inlineCallbacks
    def update_profile(self, request, name: str):
        view = yield self.core.agent_config.update_profile(name, json_object(request))
        yield self._audit_profile(request, "profile.update", view)
        return view

    @inlineCallbacks
    def delete_profile(self, request, name: str):
        result = yield self.core.agent_config.delete_profile(name)
        yield self.core.audit(request.who, "profile.delete", name)
        return result

    def _audit_profile(self, request, action: str, view: dict[str, Any]):
        details = {k: view[k] for k in ("version", "settings", "assignments")}
        return self.core.audit(request.who, action, view["name"], details)
