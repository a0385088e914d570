"""The admin REST API (/api/v1/...): agents, enrollment tokens, jobs, settings.

Every request carries `Authorization: Bearer <token>`; the bootstrap admin token lives in
`admin.token` in the server's state directory.
"""

from __future__ import annotations

import hmac
import re
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from tcm.server.web import ApiError, JsonRouter, Reply, json_object

if TYPE_CHECKING:
    from tcm.server.service import ServerCore

ACTION_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")


class AdminAPI(JsonRouter):
    """/api/v1."""

    def __init__(self, core: ServerCore):
        super().__init__("/api/v1")
        self.core = core
        self.route("GET", "/status", self.status)
        self.route("GET", "/agents", self.agents)
        self.route("GET", "/agents/{agent}", self.agent)
        self.route("POST", "/agents/{agent}/revoke", self.revoke_agent)
        self.route("POST", "/tokens", self.create_token)
        self.route("GET", "/tokens", self.tokens)
        self.route("POST", "/jobs", self.create_job)
        self.route("GET", "/jobs", self.jobs)
        self.route("GET", "/jobs/{job}", self.job)
        self.route("GET", "/jobs/{job}/output", self.job_output)
        self.route("GET", "/settings", self.settings)
        self.route("PUT", "/settings", self.change_settings)
        self.route("GET", "/taskservers", self.taskservers)
        self.route("POST", "/taskservers", self.register_taskserver)
        self.route("GET", "/gateways", self.gateways)
        self.route("POST", "/gateways", self.register_gateway)

    def authorize(self, request, handler) -> None:
        raw = request.getHeader(b"authorization") or b""
        header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)")
        if not hmac.compare_digest(token.strip().encode(), self.core.admin_token.encode()):
            raise ApiError(401, "invalid API token")
        request.principal = "admin"

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
            "capabilities": [c["name"] for c in row["capabilities"] or []],
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
        token = yield self.core.store.create_token(ttl, uses, str(body.get("description", "")))
        return Reply({"token": token, "ttl": ttl, "uses": uses}, status=201)

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
        targets = body.get("targets")
        if targets != "all" and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
        ):
            raise ApiError(400, "'targets' must be \"all\" or a non-empty list of agent ids")
        ttl, timeout = body.get("ttl"), body.get("timeout")
        for name, value in (("ttl", ttl), ("timeout", timeout)):
            if value is not None and not isinstance(value, (int, float)):
                raise ApiError(400, f"'{name}' must be a number of seconds")
        job_id = yield self.core.jobs.create(
            action, args, targets, ttl, timeout, created_by=request.principal
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

    def change_settings(self, request):
        body = json_object(request)
        if not body:
            raise ApiError(400, "give at least one setting to change")
        return self.core.change_settings(body)

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
    def revoke_agent(self, request, agent: str):
        """Revoke an agent: refused everywhere from now on, its sessions closed (4007)."""
        changed = yield self.core.revoke_agent(agent)
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
                    "sessions": sum(n.open_sessions() for n in links),
                    "registered_at": record["registered_at"],
                    "enrolled_at": record.get("enrolled_at"),
                    "links": [
                        {
                            "worker": n.worker,
                            "sessions": n.open_sessions(),
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
        return Reply(
            {"name": name, "token": f"{name}.{secret}", "ttl": ttl, "max_clients": max_clients},
            status=201,
        )
