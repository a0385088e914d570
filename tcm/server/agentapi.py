"""The agent API (/agent/v1/...): one resource tree for both transports.

Over HTTPS the agent calls these resources directly; over a live session it sends a `request`
envelope and the same handler serves it: called directly for the routes marked `direct`
(`JsonRouter.serve_direct`: no HTTP request is built), the others rendered on the resource
tree (envelope_http.py). The agent is identified by the subject of its client certificate in
both cases.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred

from tcm.interfaces import (
    IAgentAdmission,
    IAgentPresence,
    IJobs,
    IPolicies,
    IProfiles,
    IRuntimeSettings,
)
from tcm.server import apischema
from tcm.server.agents import RE_ENROLL_WINDOW, RecentEnrollments
from tcm.server.errors import Invalid
from tcm.server.web import DirectCall, JsonRouter, Reply, json_object

__all__ = ["RE_ENROLL_WINDOW", "AgentAPI", "RecentEnrollments"]

PROXIED_CERT_HEADER = b"x-tcm-client-cert"


class AgentAPI(JsonRouter):
    """/agent/v1: enrollment, job accept/output/result, work for pollers."""

    def __init__(
        self,
        admission: IAgentAdmission,
        presence: IAgentPresence,
        settings: IRuntimeSettings,
        jobs: IJobs,
        policies: IPolicies,
        profiles: IProfiles,
        clock: Any,
        keepalive: float,
    ):
        super().__init__("/agent/v1", apischema.OPERATIONS)
        self.admission = admission
        self.presence = presence
        self.runtime = settings
        self.jobs = jobs
        self.policyservice = policies
        self.profileservice = profiles
        self.clock = clock
        self.keepalive = keepalive
        # Over a session every route but enrollment (no certificate yet) and the poll for
        # work (HTTP mode: it holds the request) is called directly.
        self.route("POST", "/enroll", self.enroll)
        self.direct_route("POST", "/jobs/{job}/accept", self.accept)
        self.direct_route("POST", "/jobs/{job}/output", self.output)
        self.direct_route("POST", "/jobs/{job}/result", self.result)
        self.route("GET", "/work", self.work)
        self.direct_route("GET", "/settings", self.settings)
        self.direct_route("GET", "/whoami", self.whoami)
        self.direct_route("GET", "/policies", self.policies)
        self.direct_route("POST", "/policies/status", self.policy_status)
        self.direct_route("GET", "/profile", self.profile)
        self.direct_route("POST", "/profile/status", self.profile_status)
        self.direct_route("POST", "/renew", self.renew)

    def authorize(self, request, handler) -> None:
        if handler == self.enroll:
            return
        if type(request) is DirectCall:  # the session's connection, verified at its upgrade
            request.agent_id = self.admission.authenticate_transport(request.peer)
            return
        forwarded = request.getHeader(PROXIED_CERT_HEADER)
        transport = request.channel.transport
        if forwarded is not None:
            request.agent_id = self.admission.authenticate_proxied(transport, forwarded)
        else:
            request.agent_id = self.admission.authenticate_transport(transport)

    # -- enrollment ----------------------------------------------------------------------
    @inlineCallbacks
    def enroll(self, request):
        body = json_object(request)
        token, csr = body.get("token"), body.get("csr")
        if not isinstance(token, str) or not isinstance(csr, str):
            raise Invalid(None, "enroll needs 'token' and 'csr' (PEM) strings")
        hostname = str(body.get("hostname", ""))  # at most 255 printable (its schema)
        _again, reply = yield self.admission.enroll(token, csr, hostname)
        return Reply(reply, status=201)

    def renew(self, request):
        """A new certificate for the calling agent's new key: same identity, no token."""
        csr = json_object(request).get("csr")
        if not isinstance(csr, str):
            raise Invalid("csr", "renew needs 'csr' (PEM) string")
        return self.admission.renew(request.agent_id, csr)

    def whoami(self, request):
        return {"agent_id": request.agent_id, "transport": _carried_by(request)}

    # -- jobs ----------------------------------------------------------------------------
    def accept(self, request, job: str):
        # alone the server decides at once; nodes sharing the store decide in SQL (Deferred)
        d = maybeDeferred(self.jobs.accept, request.agent_id, job)
        return d.addCallback(lambda decision: {"decision": decision.value})

    def output(self, request, job: str):
        body = json_object(request)
        seq, stream, text = body.get("seq"), body.get("stream"), body.get("text")
        if (
            not isinstance(seq, int)
            or stream not in ("stdout", "stderr", "log")
            or not isinstance(text, str)
        ):
            raise Invalid(None, "output needs int 'seq', 'stream' (stdout/stderr/log), 'text'")
        # refused (403/404/409) unless this agent's target of `job` may send output now
        d = self.jobs.output(request.agent_id, job, seq, stream, text)
        return d.addCallback(lambda _: Reply(None, status=204))

    def result(self, request, job: str):
        """Acknowledged once committed: {"stored": true}, or false for a duplicate."""
        body = json_object(request)
        state = body.get("state")
        if state not in ("succeeded", "failed", "expired", "canceled"):
            raise Invalid("state", "result 'state' must be succeeded, failed, expired or canceled")
        error = body.get("error")
        if error is not None and not isinstance(error, str):
            raise Invalid("error", "'error' must be a string")
        d = self.jobs.result(
            request.agent_id,
            job,
            state,
            body.pop("result", None),
            error,
            _number(body.get("started")),
            _number(body.get("finished")),
            _number(body.get("received")),
        )
        # returned at once: the parsed result (an inventory: megabytes of objects) is not
        # held by this frame while its commit is awaited (issue 18)
        return d.addCallback(_stored)

    def settings(self, request):
        """What an agent needs to know to reach this server well."""
        s = self.runtime
        return {
            "persistent_connections": s["persistent_connections"],
            "poll_interval": s["poll_interval"],
            "long_poll": s["long_poll"],
            "keepalive": self.keepalive,
        }

    # -- policies and connection profile -------------------------------------------------
    @inlineCallbacks
    def policies(self, request):
        """The policies that apply to this agent, with their versions and documents."""
        return {"policies": (yield self.policyservice.policies_for(request.agent_id))}

    def policy_status(self, request):
        """The agent reports what it runs: {"policies": {name: {version, state, ...}}}."""
        body = json_object(request)
        return self.policyservice.report_policies(request.agent_id, body.get("policies"))

    @inlineCallbacks
    def profile(self, request):
        """The connection profile that applies to this agent (null: none)."""
        return {"profile": (yield self.profileservice.profile_for(request.agent_id))}

    def profile_status(self, request):
        """The agent reports the profile it runs: {"name", "version"} (nulls: none)."""
        return self.profileservice.report_profile(request.agent_id, json_object(request))

    def work(self, request):
        """Jobs for an agent in HTTP mode; with `?wait=S`, a long-poll held up to S seconds
        (at most the server's `long_poll` setting) and answered as soon as work is pushed."""
        agent_id = request.agent_id
        try:
            wait = float(request.args.get(b"wait", [b"0"])[0])
        except ValueError:
            raise Invalid("wait", "'wait' must be a number of seconds") from None
        wait = max(0.0, min(wait, float(self.runtime["long_poll"])))
        self.presence.agent_polled(agent_id)
        jobs = self.jobs.work_for(agent_id)
        notices = self.policyservice.notices_for(agent_id)
        if jobs or notices or wait <= 0:
            cancels = self.jobs.cancels_for(agent_id)  # canceled while running there
            return self._work_answer(notices + [j.request().to_dict() for j in jobs] + cancels)
        polls = self.presence.polls
        waiter = polls.wait(agent_id, wait)
        request.notifyFinish().addErrback(lambda _: polls.cancel(waiter))
        return waiter.deferred.addCallback(self._work_answer)

    def _work_answer(self, requests: list) -> dict[str, Any]:
        s = self.runtime
        return {
            "requests": requests,
            "poll_interval": s["poll_interval"],
            "long_poll": s["long_poll"],
            "persistent_connections": s["persistent_connections"],
            "server_time": self.clock.seconds(),
        }


def _stored(stored: bool) -> dict[str, bool]:
    return {"stored": stored}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _carried_by(request) -> str:
    if type(request) is DirectCall:
        return request.carried_by
    value = request.requestHeaders.getRawHeaders(b"x-tcm-transport")
    return "websocket" if value == [b"websocket"] and hasattr(request.channel, "_done") else "https"
