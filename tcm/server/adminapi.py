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
        self.route("POST", "/tokens", self.create_token)
        self.route("GET", "/tokens", self.tokens)
        self.route("POST", "/jobs", self.create_job)
        self.route("GET", "/jobs", self.jobs)
        self.route("GET", "/jobs/{job}", self.job)
        self.route("GET", "/jobs/{job}/output", self.job_output)
        self.route("GET", "/settings", self.settings)
        self.route("PUT", "/settings", self.change_settings)
        self.route("GET", "/ca", self.ca)
        self.route("GET", "/policies", self.policies)
        self.route("POST", "/policies", self.create_policy)
        self.route("GET", "/policies/{name}", self.policy)
        self.route("PUT", "/policies/{name}", self.update_policy)
        self.route("DELETE", "/policies/{name}", self.delete_policy)
        self.route("POST", "/policies/{name}/push", self.push_policy)
        self.route("GET", "/profiles", self.profiles)
        self.route("POST", "/profiles", self.create_profile)
        self.route("GET", "/profiles/{name}", self.profile)
        self.route("PUT", "/profiles/{name}", self.update_profile)
        self.route("DELETE", "/profiles/{name}", self.delete_profile)

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
        profile = body.get("profile")
        if profile is not None:
            self.core.agent_config.get_profile(str(profile))  # 404 when there is none
        token = yield self.core.store.create_token(
            ttl, uses, str(body.get("description", "")), profile
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
        return {"output": (yield self.core.store.get_output(job, after_id))}

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

    def create_policy(self, request):
        body = json_object(request)
        d = self.core.agent_config.create_policy(body)
        return d.addCallback(lambda view: Reply(view, status=201))

    def update_policy(self, request, name: str):
        return self.core.agent_config.update_policy(name, json_object(request))

    def delete_policy(self, request, name: str):
        return self.core.agent_config.delete_policy(name)

    def push_policy(self, request, name: str):
        """PushPolicy: {"agents": {id: {"status": pushed|not connected|empty policy|failed}}}.
        `?wait=S`: how long to wait for each connected agent's report (default 10 s)."""
        try:
            wait = float(request.args.get(b"wait", [b"10"])[0])
        except ValueError:
            raise ApiError(400, "'wait' must be a number of seconds") from None
        if not 0 < wait <= 120:
            raise ApiError(400, "'wait' must be 0..120 seconds")
        return self.core.agent_config.push(name, wait)

    # -- connection profiles -------------------------------------------------------------
    def profiles(self, request):
        cfg = self.core.agent_config
        return {"profiles": [cfg.profile_view(p) for _, p in sorted(cfg.profiles.items())]}

    def profile(self, request, name: str):
        cfg = self.core.agent_config
        return cfg.profile_view(cfg.get_profile(name))

    def create_profile(self, request):
        d = self.core.agent_config.create_profile(json_object(request))
        return d.addCallback(lambda view: Reply(view, status=201))

    def update_profile(self, request, name: str):
        return self.core.agent_config.update_profile(name, json_object(request))

    def delete_profile(self, request, name: str):
        return self.core.agent_config.delete_profile(name)
