"""The admin REST API (/api/v1/...): agents, enrollment tokens, jobs, settings, targets,
groups, inventory freshness, API tokens and the audit log.

Every request carries `Authorization: Bearer <token>`: the bootstrap admin token (in
`admin.token` in the server's state directory) or a named API token (`tcm apitoken create`).
Every route needs one permission of the token's role (tcm/server/roles.py): a refusal is a
403 naming the role and what it lacks. Every change is written to the audit log.

Handlers read the request and call the services they are given (never the store); the
services raise domain errors (tcm/server/errors.py), which the router answers.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from twisted.internet.defer import inlineCallbacks, succeed

import tcm
from tcm.installpackage import PackageError, agent_server, check_server_url, package_name
from tcm.interfaces import (
    IAccessTokens,
    IAgentAdmission,
    IAgentPresence,
    IAudit,
    ICertificates,
    ICluster,
    IEventHub,
    IInstallPackages,
    IInventory,
    IJobHistory,
    IJobs,
    INodeRegistry,
    IPolicies,
    IProfiles,
    IRuntimeSettings,
    ITargets,
)
from tcm.server import apischema, inventory, openapi
from tcm.server.console import EventStream
from tcm.server.errors import Invalid, Unauthenticated, Unavailable
from tcm.server.events import parse_topics
from tcm.server.roles import PERMISSIONS, ROLES
from tcm.server.selection import check_name, id_list
from tcm.server.web import JsonRouter, Reply, json_body, json_object
from tcm.store.errors import StoreUnavailable

ACTION_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


def _seconds(request, arg: str, default: float | None = None) -> float | None:
    raw = request.args.get(arg.encode(), [None])[0]
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise Invalid(arg, f"'{arg}' must be a number of seconds") from None
    if value != value or value < 0:
        raise Invalid(arg, f"'{arg}' must be a number of seconds >= 0")
    return value


def _query(request, arg: str) -> str | None:
    """A query argument as text (the router checked it against its declaration), or None."""
    raw = request.args.get(arg.encode(), [None])[0]
    return None if raw is None else raw.decode("utf-8", "replace")


@attrs.frozen
class AdminServices:
    """The services the admin API calls (each typed by its interface in tcm/interfaces.py)."""

    name: str  # this server's name
    access: IAccessTokens
    admission: IAgentAdmission
    presence: IAgentPresence
    settings: IRuntimeSettings
    jobs: IJobs
    targets: ITargets
    inventory: IInventory
    audit: IAudit
    history: IJobHistory
    policies: IPolicies
    profiles: IProfiles
    nodes: INodeRegistry
    certificates: ICertificates
    events: IEventHub | None = None  # the console's live events (GET /events)
    cluster: ICluster | None = None  # a node of a cluster (tcm/server/cluster); None: alone
    packages: IInstallPackages | None = None  # agent install packages (tcm/server/packages.py)


class AdminAPI(JsonRouter):
    """/api/v1."""

    def __init__(self, services: AdminServices):
        super().__init__("/api/v1", apischema.OPERATIONS)
        s = services
        self.name = s.name
        self.access = s.access
        self.admission = s.admission
        self.presence = s.presence
        self.runtime = s.settings
        self.jobservice = s.jobs
        self.targetservice = s.targets
        self.inventoryservice = s.inventory
        self.auditlog = s.audit
        self.history = s.history
        self.policyservice = s.policies
        self.profileservice = s.profiles
        self.nodes = s.nodes
        self.certificates = s.certificates
        self.eventhub = s.events
        self.cluster = s.cluster
        self.packages = s.packages
        self._permissions: dict[Any, tuple[str, str]] = {}
        self.route("GET", "/status", self.status)
        self.route("GET", "/openapi.json", openapi.serve)
        self.route("GET", "/agents", self.agents)
        self.route("GET", "/agents/{agent}", self.agent)
        self.route("GET", "/agents/{agent}/inventory", self.agent_inventory)
        self.route("GET", "/agents/{agent}/inventory/history", self.inventory_history)
        self.route("GET", "/agents/{agent}/inventory/classes/{name}", self.inventory_version)
        self.route("GET", "/agents/{agent}/inventory/classes/{name}/diff", self.inventory_diff)
        self.route("POST", "/agents/{agent}/revoke", self.revoke_agent, "admin", "revoke agents")
        self.route("POST", "/agents/{agent}/approve", self.approve_agent, "admin", "approve agents")
        self.route("POST", "/tokens", self.create_token, "admin", "create enrollment tokens")
        self.route("GET", "/tokens", self.tokens)
        self.route("POST", "/jobs", self.create_job, "run", "create jobs")
        self.route("GET", "/jobs", self.jobs)
        self.route("GET", "/jobs/{job}", self.job)
        self.route("GET", "/jobs/{job}/output", self.job_output)
        self.route("GET", "/jobs/{job}/results.csv", self.job_results_csv)
        self.route("POST", "/jobs/{job}/cancel", self.cancel_job, "run", "cancel jobs")
        self.route("GET", "/actions", self.actions)
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
        # the console's "install package" download (issue 14): it holds an enrollment token
        self.route(
            "POST",
            "/profiles/{name}/package",
            self.build_package,
            "admin",
            "build install packages (each holds a new enrollment token)",
        )

        self.route("GET", "/taskservers", self.taskservers)
        self.route(
            "POST", "/taskservers", self.register_taskserver, "admin", "register task servers"
        )
        self.route("GET", "/gateways", self.gateways)
        self.route("POST", "/gateways", self.register_gateway, "admin", "register gateways")
        # the fleet's state and removals (issue 15.5)
        self.route("PATCH", "/agents/{agent}", self.label_agent, "admin", "name and tag agents")
        self.route("DELETE", "/agents/{agent}", self.delete_agent, "admin", "delete agents")
        self.route(
            "POST", "/tokens/{token}/revoke", self.revoke_token, "admin", "revoke enrollment tokens"
        )
        self.route(
            "DELETE", "/taskservers/{name}", self.remove_taskserver, "admin", "remove task servers"
        )
        self.route("DELETE", "/gateways/{name}", self.remove_gateway, "admin", "remove gateways")
        self.route("GET", "/whoami", self.whoami)
        self.route("GET", "/events", self.events)  # the console's live events (issue 14)
        self.route("GET", "/cluster", self.cluster_nodes)

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
            raise Unauthenticated("missing bearer token (Authorization: Bearer <token>)")
        who = self.access.authenticate(token.strip())  # errors.Unauthenticated: a 401
        request.who = who  # the Principal (known to the audit of a refusal, too)
        request.principal = who.name
        permission, doing = self._permissions.get(handler, ("admin", "do this"))
        who.require(permission, doing)  # roles.Refused (errors.Forbidden): a 403

    def refused(self, request, status: int, reason: str) -> None:
        """Audit a 401 or 403: who (when known), the route, why."""
        method = request.method.decode("ascii", "replace")
        path = request.path.decode("utf-8", "replace")
        d = self.auditlog.refused(getattr(request, "principal", None), method, path, status, reason)
        d.addErrback(lambda f: self._log.failure("could not audit a refused request", f))

    @inlineCallbacks
    def status(self, request):
        """?store=now: the store's size measured now (else as of the last purge, hourly)."""
        if request.args.get(b"store", [b""])[0] == b"now":
            try:
                yield self.history.measure()
            except StoreUnavailable:  # the store down: its figures as last measured
                pass
        status = {
            "version": tcm.__version__,
            "name": self.name,
            "sessions": len(self.presence.registry),
            "agents": self.admission.count(),
            "active_jobs": self.jobservice.active_count(),
            "store": self.history.store_figures,
            "retention": self.history.retention(),
        }
        if self.cluster is not None:
            status["cluster"] = self.cluster.status()
        return status

    @inlineCallbacks
    def cluster_nodes(self, request):
        """The cluster's nodes (a single server: itself, up, with no bus)."""
        if self.cluster is None:
            return {
                "node": self.name,
                "bus": "none",
                "nodes": [
                    {
                        "node": self.name,
                        "address": "",
                        "sessions": {
                            "core": len(self.presence.registry),
                            "task": len(self.presence.task_registry),
                            "polls": len(self.presence.polls),
                        },
                        "state": "up",
                        "last_heartbeat": None,
                        "this": True,
                    }
                ],
            }
        nodes = yield self.cluster.nodes()
        return {**self.cluster.status(), "nodes": nodes}

    # -- agents --------------------------------------------------------------------------
    def _where(self, agent_ids: list[str]):
        """{agent: node} of agents whose sessions other nodes of the cluster hold."""
        if self.cluster is None:
            return succeed({})
        return self.cluster.where(agent_ids)

    def _agent_view(self, row: dict[str, Any], node: str | None = None) -> dict[str, Any]:
        view = self._agent_fields(row)
        if node is not None and not view["online"]:
            # its session is on another node of the cluster (a held poll counts as one too)
            view.update(online=True, mode="persistent", node=node)
        elif self.cluster is not None and view["online"]:
            view["node"] = self.name
        if self.presence.clones.is_cloned(row["id"]):  # issue 16.5: a state of its own
            view["state"] = "cloned"
            view["cloned"] = self.presence.clones.cloned[row["id"]]
        return view

    def _agent_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        session = self.presence.session(row["id"])
        mode = "persistent" if session else self.presence.http_mode_of(row["id"]) or "offline"
        if row.get("deleted"):
            state = "deleted"
        elif row["revoked"]:
            state = "revoked"
        elif not row.get("approved", True):
            state = "awaiting approval"
        else:
            state = "ok"
        return {
            "id": row["id"],
            "name": row.get("display_name") or row["hostname"],
            "tags": dict(row.get("tags") or {}),
            "hostname": row["hostname"],
            "platform": row["platform"],
            "online": session is not None,
            "mode": mode,
            "state": state,
            "deleted": bool(row.get("deleted", False)),
            "task_server": self.nodes.assignments.of(row["id"]) if session else None,
            "via": session.via if session else None,
            "connected_since": session.connected_at if session else None,
            "tls": session.tls if session else None,
            "last_seen": self.presence.last_seen(row["id"], row["last_seen"]),
            "enrolled_at": row["enrolled_at"],
            "revoked": bool(row["revoked"]),
            "approved": bool(row.get("approved", True)),
            "capabilities": [c["name"] for c in row["capabilities"] or []],
            **self.policyservice.running(row["id"]),
        }

    @inlineCallbacks
    def agents(self, request):
        """Agents (not deleted ones unless ?include=deleted; ?state= picks one state).
        `?limit=N[&after=ID]`: a page of at most N, in agent id order, after agent ID;
        `next` is the `after` of the following page (null: the last one; a page may hold
        fewer than N and still have a next, when cloned agents were left out of a state).
        Without `limit`: every agent, in the order they enrolled (`next` null)."""
        include = request.args.get(b"include", [b""])[0] == b"deleted"
        wanted = request.args.get(b"state", [None])[0]
        state = None
        if wanted is not None:
            state = {b"pending": "awaiting approval"}.get(wanted, wanted.decode())
        limit = _query(request, "limit")
        following = None
        if limit is not None:
            rows, following = yield self.admission.agents_page(
                _query(request, "after"), int(limit), include, state
            )
        else:
            rows = yield self.admission.list_agents()
            rows = [r for r in rows if include or not r.get("deleted")]
        if state is not None:  # (a cloned agent's state is "cloned", which no page is of)
            rows = [r for r in rows if self._row_state(r) == state]
        where = yield self._where([r["id"] for r in rows])
        return {
            "agents": [self._agent_view(r, where.get(r["id"])) for r in rows],
            "next": following,
        }

    def _row_state(self, row: dict[str, Any]) -> str:
        """The `state` an agent's view shows (`_agent_view`), without building the view."""
        if self.presence.clones.is_cloned(row["id"]):
            return "cloned"
        if row.get("deleted"):
            return "deleted"
        if row["revoked"]:
            return "revoked"
        if not row.get("approved", True):
            return "awaiting approval"
        return "ok"

    # -- the fleet's state and removals (issue 15.5) ---------------------------------------
    @inlineCallbacks
    def label_agent(self, request, agent: str):
        """Set an agent's display name (null: back to its hostname) and tags."""
        body = json_object(request)
        row = yield self.admission.label(
            agent,
            name=body.get("name"),
            tags=body.get("tags"),
            untag=body.get("untag"),
            reset_name="name" in body and body["name"] is None,
        )
        yield self.auditlog.record(request.who, "agent.label", agent, body)
        return self._agent_view(row)

    @inlineCallbacks
    def delete_agent(self, request, agent: str):
        """Delete an agent: revoked and hidden; its jobs and audit entries are kept."""
        changed = yield self.admission.delete(agent)
        if changed:
            yield self.auditlog.record(request.who, "agent.delete", agent, {})
        return {"agent_id": agent, "deleted": True, "changed": changed}

    @inlineCallbacks
    def revoke_token(self, request, token: str):
        """Withdraw an enrollment token: an enrollment with it is refused from now on."""
        changed = yield self.access.revoke_enrollment_token(token)
        if changed:
            yield self.auditlog.record(request.who, "token.revoke", token, {})
        return {"token": token, "revoked": True, "changed": changed}

    def events(self, request):
        """The live events of `?topics=` as a text/event-stream, for `?wait=` seconds (then
        the client reconnects): batched deltas, at most a few a second (tcm/server/events.py)."""
        if self.eventhub is None:
            raise Unavailable("this server publishes no live events")
        try:
            topics = parse_topics(_query(request, "topics"))
        except ValueError as e:
            raise Invalid("topics", str(e)) from None
        wait = _seconds(request, "wait", 3600.0)
        stream = EventStream(self.eventhub, self.eventhub.clock, request, topics, wait or 0.0)
        return stream.start()

    def whoami(self, request):
        """The caller's principal: token name, role, its permissions, target scope."""
        who = request.who
        return {
            "name": who.name,
            "role": who.role,
            "permissions": [p for p in PERMISSIONS if who.may(p)],
            "target": who.target,
        }

    def remove_taskserver(self, request, name: str):
        return self._remove_node(request, name, "taskserver")

    def remove_gateway(self, request, name: str):
        return self._remove_node(request, name, "gateway")

    @inlineCallbacks
    def _remove_node(self, request, name: str, role: str):
        """Remove a node: refused from now on, links closed, a task server's agents moved."""
        changed = yield self.nodes.remove(name, role)
        if changed:
            yield self.auditlog.record(request.who, f"{role}.remove", name, {})
        return {"name": name, "removed": True, "changed": changed}

    @inlineCallbacks
    def agent(self, request, agent: str):
        row = yield self.admission.get_agent(agent)
        where = yield self._where([agent])
        return self._agent_view(row, where.get(agent))

    @inlineCallbacks
    def approve_agent(self, request, agent: str):
        """Approve an agent that enrolled while require_approval was on."""
        changed = yield self.admission.approve(agent)
        if changed:
            yield self.auditlog.record(request.who, "agent.approve", agent, {})
        return {"agent_id": agent, "approved": True, "changed": changed}

    @inlineCallbacks
    def revoke_agent(self, request, agent: str):
        """Revoke an agent: refused everywhere from now on, its sessions closed (4007)."""
        changed = yield self.admission.revoke(agent)
        if changed:
            yield self.auditlog.record(request.who, "agent.revoke", agent, {})
        return {"agent_id": agent, "revoked": True, "changed": changed}

    # -- enrollment tokens ---------------------------------------------------------------
    @inlineCallbacks
    def create_token(self, request):
        body = json_object(request)
        ttl, uses = body.get("ttl"), body.get("uses")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0
        ):
            raise Invalid("ttl", "'ttl' must be a positive number of seconds")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 1):
            raise Invalid("uses", "'uses' must be a positive integer")
        description = str(body.get("description", ""))
        profile = body.get("profile")
        if profile is not None and profile not in self.profileservice.profiles:
            raise Invalid("profile", f"no such profile: {profile!r}")
        token = yield self.access.create_enrollment_token(ttl, uses, description, profile)
        yield self.auditlog.record(
            request.who,
            "token.create",
            token.partition(".")[0],
            {"ttl": ttl, "uses": uses, "description": description, "profile": profile},
        )
        return Reply({"token": token, "ttl": ttl, "uses": uses, "profile": profile}, status=201)

    @inlineCallbacks
    def tokens(self, request):
        return {"tokens": (yield self.access.enrollment_tokens())}

    # -- jobs ----------------------------------------------------------------------------
    @inlineCallbacks
    def create_job(self, request):
        body = json_object(request)
        action = body.get("action")
        if not isinstance(action, str) or not ACTION_NAME.match(action):
            raise Invalid("action", "'action' must be an action name like 'inventory.collect'")
        args = body.get("args", {})
        if not isinstance(args, dict):
            raise Invalid("args", "'args' must be a JSON object")
        targets, target = body.get("targets"), body.get("target")
        if (targets is None) == (target is None):
            raise Invalid(
                None, "give either 'targets' (\"all\" or agent ids) or 'target' (a target name)"
            )
        if target is not None:
            if not isinstance(target, str):
                raise Invalid("target", "'target' must be a target name")
            recipients = sorted((yield self.targetservice.members(target)))
            if not recipients:
                raise Invalid("target", f"target {target!r} has no members now")
        elif targets != "all" and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
        ):
            raise Invalid("targets", "'targets' must be \"all\" or a non-empty list of agent ids")
        else:
            recipients = targets
        ttl, timeout = body.get("ttl"), body.get("timeout")
        for name, value in (("ttl", ttl), ("timeout", timeout)):
            if value is not None and not isinstance(value, (int, float)):
                raise Invalid(name, f"'{name}' must be a number of seconds")
        yield self._check_scope(request, recipients)
        job_id = yield self.jobservice.create(
            action, args, recipients, ttl, timeout, created_by=request.principal
        )
        yield self.auditlog.record(
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

    def jobs(self, request):
        """Jobs, newest first: `?state=&action=&since=EPOCH&limit=N&before=JOB` (a page;
        `next` is the `before` of the following one)."""
        limit = _query(request, "limit")
        return self.history.page(
            state=_query(request, "state"),
            action=_query(request, "action"),
            since=_seconds(request, "since"),
            limit=int(limit) if limit is not None else 100,
            before=_query(request, "before"),
        )

    def job(self, request, job: str):
        """A job; `?results=false` gives its counts only (cheap to poll for big jobs);
        `?format=csv` its results as CSV (as /jobs/{job}/results.csv)."""
        if _query(request, "format") == "csv":
            return self.job_results_csv(request, job)
        results = request.args.get(b"results", [b"true"])[0].lower() not in (b"false", b"0")
        return self.jobservice.status(job, results=results)

    @inlineCallbacks
    def job_results_csv(self, request, job: str):
        """A job's results as CSV: agent, name, state, times, exit code, error."""
        text = yield self.history.results_csv(job)
        return Reply(
            text.encode("utf-8"),
            headers={
                "content-type": "text/csv; charset=utf-8",
                "content-disposition": f'attachment; filename="job-{job}.csv"',
            },
        )

    @inlineCallbacks
    def job_output(self, request, job: str):
        after = request.args.get(b"after", [b"0"])[0]
        try:
            after_id = int(after)
        except ValueError:
            raise Invalid("after", "'after' must be an integer") from None
        try:
            wait = float(request.args.get(b"wait", [b"0"])[0])
        except ValueError:
            raise Invalid("wait", "'wait' must be a number of seconds") from None
        if not 0 <= wait <= 60:
            raise Invalid("wait", "'wait' must be 0..60 seconds")
        rows = yield self.jobservice.stored_output(job, after_id)
        if not rows and wait > 0:
            # Follow live: answered as soon as the job's next output is stored (or its
            # targets finish), at the latest after `wait` seconds.
            yield self.jobservice.output_waiter(job, wait)
            rows = yield self.jobservice.stored_output(job, after_id)
        return {"output": rows}

    @inlineCallbacks
    def cancel_job(self, request, job: str):
        """Cancel a job, or its targets on `agents`."""
        body = json_body(request, required=False)
        agents = body.get("agents") if isinstance(body, dict) else None
        if agents is not None:
            yield self._check_scope(request, agents)
        else:
            yield self._check_scope(request, (yield self.jobservice.agents_in_states(job, None)))
        outcome = yield self.jobservice.cancel(job, agents, by=request.principal)
        yield self.auditlog.record(
            request.who,
            "job.cancel",
            job,
            {
                "agents": agents if agents is not None else "all",
                "canceled": len(outcome["canceled"]),
                "stopping": len(outcome["stopping"]),
            },
        )
        return {"job": job, **outcome}

    def actions(self, request):
        """What the enrolled agents advertise."""
        return {"actions": self.jobservice.actions()}

    # -- settings ------------------------------------------------------------------------
    def settings(self, request):
        return self.runtime.as_dict()

    @inlineCallbacks
    def change_settings(self, request):
        body = json_object(request)
        settings = yield self.runtime.change(body)
        yield self.auditlog.record(request.who, "settings.change", ",".join(sorted(body)), body)
        return settings

    # -- task servers and gateways -------------------------------------------------------
    def taskservers(self, request):
        """Registered task servers with their state and client counts."""
        return self.nodes.task_server_views()

    def gateways(self, request):
        """Registered gateways, each with its live links (one per worker process)."""
        return {"server": self.name, "gateways": self.nodes.gateway_views()}

    def register_gateway(self, request):
        """Register a gateway; the answer holds its one-time enrollment token."""
        return self._register_node(request, "gateway")

    def register_taskserver(self, request):
        """Register a task server; the answer holds its one-time enrollment token."""
        return self._register_node(request, "taskserver")

    @inlineCallbacks
    def _register_node(self, request, role: str):
        from tcm.protocol.names import NODE_NAME

        body = json_object(request)
        name = body.get("name")
        if not isinstance(name, str) or not NODE_NAME.match(name):
            raise Invalid("name", "'name' must be a node name like 'ts1' (a-z, 0-9, _ . -)")
        if role == "gateway" and body.get("max_clients") is not None:
            raise Invalid(
                "max_clients", "'max_clients' is for task servers; a gateway sets its own"
            )
        max_clients = body.get("max_clients")
        if max_clients is not None and (
            isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1
        ):
            raise Invalid("max_clients", "'max_clients' must be a positive integer")
        ttl = body.get("ttl", 3600)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= 30 * 86400:
            raise Invalid("ttl", "'ttl' must be a number of seconds up to 30 days")
        secret = yield self.nodes.register(name, role, max_clients, float(ttl))
        yield self.auditlog.record(
            request.who, f"{role}.register", name, {"max_clients": max_clients, "ttl": ttl}
        )
        return Reply(
            {"name": name, "token": f"{name}.{secret}", "ttl": ttl, "max_clients": max_clients},
            status=201,
        )

    # -- selections and targets ----------------------------------------------------------
    @inlineCallbacks
    def _check_scope(self, request, recipients: list[str] | str):
        """403 when a token scoped to a target addresses agents outside it."""
        who = request.who
        if who.target is None:
            return
        agents = set(self.admission.known_ids()) if recipients == "all" else set(recipients)
        scope = yield self.targetservice.scope(who.target)
        who.require_recipients(agents, scope)  # roles.Refused (errors.Forbidden): a 403

    @inlineCallbacks
    def selection(self, request):
        """The members of a selection (as for a target), without saving it."""
        return {"members": (yield self.targetservice.selection(json_object(request)))}

    @inlineCallbacks
    def create_target(self, request):
        body = json_object(request)
        view, details = yield self.targetservice.create_target(body, request.principal)
        yield self.auditlog.record(request.who, "target.create", view["name"], details)
        return Reply(view, status=201)

    @inlineCallbacks
    def targets(self, request):
        return {"targets": (yield self.targetservice.list_targets())}

    def target(self, request, name: str):
        return self.targetservice.get_target(name)

    @inlineCallbacks
    def target_members(self, request, name: str):
        return {"target": name, "members": (yield self.targetservice.member_rows(name))}

    @inlineCallbacks
    def delete_target(self, request, name: str):
        yield self.targetservice.delete_target(name)
        yield self.auditlog.record(request.who, "target.delete", name)
        return Reply(None, status=204)

    # -- groups ----------------------------------------------------------------------------
    @inlineCallbacks
    def create_group(self, request):
        row, agents = yield self.targetservice.create_group(json_object(request))
        yield self.auditlog.record(request.who, "group.create", row["name"], {"agents": agents})
        return Reply(row, status=201)

    @inlineCallbacks
    def groups(self, request):
        return {"groups": (yield self.targetservice.list_groups())}

    def group(self, request, name: str):
        return self.targetservice.get_group(name)

    @inlineCallbacks
    def delete_group(self, request, name: str):
        yield self.targetservice.delete_group(name)
        yield self.auditlog.record(request.who, "group.delete", name)
        return Reply(None, status=204)

    @inlineCallbacks
    def change_group(self, request, name: str):
        """Body {"add": [ids], "remove": [ids]} (either may be absent)."""
        body = json_object(request)
        add = id_list(body.get("add", []), "add")
        remove = id_list(body.get("remove", []), "remove")
        row = yield self.targetservice.change_group(name, add, remove)
        yield self.auditlog.record(
            request.who, "group.change", name, {"add": add, "remove": remove}
        )
        return row

    # -- inventory -------------------------------------------------------------------------
    @inlineCallbacks
    def agent_inventory(self, request, agent: str):
        return {"agent": agent, "classes": (yield self.inventoryservice.of_agent(agent))}

    @inlineCallbacks
    def inventory_history(self, request, agent: str):
        """?class=C: the versions kept (newest first per class), without data."""
        cls = request.args.get(b"class", [None])[0]
        versions = yield self.inventoryservice.history(
            agent, cls.decode("utf-8", "replace") if cls is not None else None
        )
        return {"agent": agent, "versions": versions}

    @inlineCallbacks
    def inventory_version(self, request, agent: str, name: str):
        """?version=V (default: the current one)."""
        row = yield self.inventoryservice.version(agent, name, _int_arg(request, "version"))
        return {"agent": agent, **row}

    def inventory_diff(self, request, agent: str, name: str):
        """?from=V&to=V (default: the one before the current, and the current)."""
        return self.inventoryservice.diff(
            agent, name, _int_arg(request, "from"), _int_arg(request, "to")
        )

    @inlineCallbacks
    def inventory_stale(self, request):
        """?older_than=S (default 3600), &target=NAME, &class=C (repeatable)."""
        older_than = _seconds(request, "older_than", 3600.0)
        target = request.args.get(b"target", [None])[0]
        classes = [c.decode("utf-8", "replace") for c in request.args.get(b"class", [])]
        items, _ = yield self.inventoryservice.stale(
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
            raise Invalid("older_than", "'older_than' must be a number of seconds")
        if older_than < 0:
            raise Invalid("older_than", "'older_than' must be a number of seconds >= 0")
        ttl = body.get("ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
            raise Invalid("ttl", "'ttl' must be a number of seconds")
        items, _ = yield self.inventoryservice.stale(
            float(older_than), body.get("target"), body.get("classes")
        )
        plan = inventory.refresh_plan(items)
        yield self._check_scope(request, sorted({a for job in plan for a in job.agents}))
        created = []
        for job in plan:
            job_id = yield self.jobservice.create(
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
        yield self.auditlog.record(
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
        name = check_name(body, "API token")
        self.access.check_token_name(name)
        role = body.get("role")
        if role not in ROLES:
            raise Invalid("role", f"'role' must be one of {', '.join(ROLES)}")
        target = body.get("target")
        if target is not None:
            if not isinstance(target, str):
                raise Invalid("target", "'target' must be a target name")
            if not (yield self.targetservice.exists(target)):
                raise Invalid("target", f"no such target: {target}")
        ttl = body.get("ttl")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0
        ):
            raise Invalid("ttl", "'ttl' must be a positive number of seconds")
        token, row = yield self.access.create_api_token(name, role, target, ttl, request.principal)
        yield self.auditlog.record(
            request.who,
            "apitoken.create",
            name,
            {"id": row["id"], "role": role, "target": target, "ttl": ttl},
        )
        view = {k: v for k, v in row.items() if k != "secret_hash"}
        return Reply({**view, "token": token}, status=201)

    @inlineCallbacks
    def api_tokens(self, request):
        return {"tokens": (yield self.access.api_tokens())}

    @inlineCallbacks
    def revoke_api_token(self, request, name: str):
        ids = yield self.access.revoke_api_token(name)
        yield self.auditlog.record(request.who, "apitoken.revoke", name, {"ids": ids})
        return Reply(None, status=204)

    @inlineCallbacks
    def audit(self, request):
        """?since=EPOCH_SECONDS, &limit=N (default 1000, newest N, oldest first), &who=NAME,
        &action=NAME (or a prefix ending in '.', e.g. job.)."""
        since = _seconds(request, "since")
        try:
            limit = int(request.args.get(b"limit", [b"1000"])[0])
        except ValueError:
            raise Invalid("limit", "'limit' must be an integer") from None
        who, action = _query(request, "who"), _query(request, "action")
        return {"entries": (yield self.auditlog.entries(since, limit, who, action))}

    def ca(self, request):
        """The CA certificate agents trust (PEM), for install packages."""
        return {"ca": self.certificates.ca_pem.decode()}

    # -- policies ------------------------------------------------------------------------
    def policies(self, request):
        p = self.policyservice
        return {
            "policies": [p.policy_view(x) for _, x in sorted(p.policies.items())],
            "types": sorted(p.known_policy_types()),
        }

    @inlineCallbacks
    def policy(self, request, name: str):
        """A policy, with what each of its agents reports running."""
        p = self.policyservice
        view = p.policy_view(p.get_policy(name))
        agents = yield p.members(view["targets"])
        view["agents"] = {a: p.running(a)["policies"].get(name) for a in sorted(agents)}
        return view

    @inlineCallbacks
    def create_policy(self, request):
        view = yield self.policyservice.create_policy(json_object(request))
        yield self._audit_policy(request, "policy.create", view)
        return Reply(view, status=201)

    @inlineCallbacks
    def update_policy(self, request, name: str):
        view = yield self.policyservice.update_policy(name, json_object(request))
        yield self._audit_policy(request, "policy.update", view)
        return view

    @inlineCallbacks
    def delete_policy(self, request, name: str):
        result = yield self.policyservice.delete_policy(name)
        yield self.auditlog.record(request.who, "policy.delete", name)
        return result

    def _audit_policy(self, request, action: str, view: dict[str, Any]):
        details = {k: view[k] for k in ("type", "version", "targets", "document")}
        return self.auditlog.record(request.who, action, view["name"], details)

    @inlineCallbacks
    def push_policy(self, request, name: str):
        """PushPolicy: {"agents": {id: {"status": pushed|not connected|empty policy|failed}}}.
        `?wait=S`: how long to wait for each connected agent's report (default 10 s; 0: do
        not wait, each notified agent is `sent`)."""
        try:
            wait = float(request.args.get(b"wait", [b"10"])[0])
        except ValueError:
            raise Invalid("wait", "'wait' must be a number of seconds") from None
        if not 0 <= wait <= 120:  # 0: notify, do not wait for reports
            raise Invalid("wait", "'wait' must be 0..120 seconds")
        policy = self.policyservice.get_policy(name)  # 404 before anything is written
        # a token scoped to a target may push only to agents inside it, as for jobs
        yield self._check_scope(
            request, sorted((yield self.policyservice.members(policy["targets"])))
        )
        result = yield self.policyservice.push(name, wait)
        statuses: dict[str, int] = {}
        for entry in result["agents"].values():
            statuses[entry["status"]] = statuses.get(entry["status"], 0) + 1
        yield self.auditlog.record(
            request.who, "policy.push", name, {"version": result["version"], "statuses": statuses}
        )
        return result

    # -- connection profiles -------------------------------------------------------------
    def profiles(self, request):
        p = self.profileservice
        return {"profiles": [p.profile_view(x) for _, x in sorted(p.profiles.items())]}

    def profile(self, request, name: str):
        p = self.profileservice
        return p.profile_view(p.get_profile(name))

    @inlineCallbacks
    def create_profile(self, request):
        view = yield self.profileservice.create_profile(json_object(request))
        yield self._audit_profile(request, "profile.create", view)
        return Reply(view, status=201)

    @inlineCallbacks
    def update_profile(self, request, name: str):
        view = yield self.profileservice.update_profile(name, json_object(request))
        yield self._audit_profile(request, "profile.update", view)
        return view

    @inlineCallbacks
    def delete_profile(self, request, name: str):
        result = yield self.profileservice.delete_profile(name)
        yield self.auditlog.record(request.who, "profile.delete", name)
        return result

    @inlineCallbacks
    def build_package(self, request, name: str):
        """An agent install package for the profile (.tar.gz, tcm/installpackage.py): the
        wheels (cached per tcm version), the CA, the profile, a new enrollment token scoped
        to the profile (`uses`, default 100; `ttl` seconds, default 30 days) and the server
        URL agents use (`server`; default: the profile's first https:// server, else the URL
        this request came to)."""
        if self.packages is None:
            raise Unavailable("this server builds no install packages")
        body = json_body(request, required=False)
        profile = self.profileservice.profile_view(self.profileservice.get_profile(name))
        uses = body.get("uses", PACKAGE_USES)
        ttl = body.get("ttl", PACKAGE_TTL)
        server = body.get("server") or agent_server(profile["settings"], _own_url(request))
        try:
            check_server_url(server)
        except PackageError as e:
            raise Invalid("server", str(e)) from None
        wheels = yield self.packages.wheels()  # Unavailable (503, with the reason)
        # the token only once the wheels are there: a failed build leaves no live token
        description = f"install package for profile {name}"
        token = yield self.access.create_enrollment_token(ttl, uses, description, name)
        token_id = token.partition(".")[0]
        try:
            data = yield self.packages.assemble(
                profile, self.certificates.ca_pem.decode(), server, token, uses, ttl, wheels.paths
            )
        except BaseException:
            yield self.access.revoke_enrollment_token(token_id)
            raise
        yield self.auditlog.record(
            request.who,
            "token.create",
            token_id,
            {"ttl": ttl, "uses": uses, "description": description, "profile": name},
        )
        yield self.auditlog.record(
            request.who,
            "package.build",
            name,
            {
                "profile_version": profile["version"],
                "token": token_id,
                "server": server,
                "wheels": len(wheels.paths),
                "wheels_built": wheels.built,
                "bytes": len(data),
            },
        )
        return Reply(
            data,
            headers={
                "content-type": "application/gzip",
                "content-disposition": f'attachment; filename="{package_name(name)}.tar.gz"',
                "x-tcm-token-id": token_id,
                "x-tcm-wheels": "built" if wheels.built else "cached",
            },
        )

    def _audit_profile(self, request, action: str, view: dict[str, Any]):
        details = {k: view[k] for k in ("version", "settings", "assignments")}
        return self.auditlog.record(request.who, action, view["name"], details)


PACKAGE_USES = 100  # enrollments an install package's token allows (as `tcm package build`)
PACKAGE_TTL = 30 * 86400.0  # seconds it is valid


def _own_url(request) -> str:
    """The https:// URL this request came to (its Host header, else the local address)."""
    raw = request.getHeader(b"host")
    if raw:
        host = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        return f"https://{host}"
    address = request.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"https://{host}:{address.port}"


def _int_arg(request, name: str) -> int | None:
    """An integer query parameter (checked by the operation's schema), or None."""
    raw = request.args.get(name.encode(), [None])[0]
    return None if raw is None else int(raw)
