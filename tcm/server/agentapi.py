"""The agent API (/agent/v1/...): one resource tree for both transports.

Over HTTPS the agent calls these resources directly; over a live session it sends a `request`
envelope and the server renders the very same resource (envelope_http.py). The agent is
identified by the subject of its client certificate in both cases.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks

from tcm import pki
from tcm.server import apischema
from tcm.server.web import ApiError, JsonRouter, Reply, json_object
from tcm.store.store import TokenRefused

RE_ENROLL_WINDOW = 600.0  # seconds an enrollment can be asked for again with the same key


class RecentEnrollments:
    """Enrollments of the last RE_ENROLL_WINDOW seconds by public key, oldest first, so an
    agent that asks again (its first answer lost) gets the same identity. Bounded: what is
    older than the window goes at each new entry, and at most `limit` are kept."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self._entries: dict[str, tuple[float, Any]] = {}  # insertion order = time order

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def remember(self, key: str, value: Any, now: float) -> None:
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (now, value)
        while True:  # the oldest first: stop at the first one still young, within the limit
            oldest = next(iter(entries))
            if now - entries[oldest][0] < RE_ENROLL_WINDOW and len(entries) <= self.limit:
                break
            del entries[oldest]

    def __len__(self) -> int:
        return len(self._entries)


if TYPE_CHECKING:
    from tcm.server.service import ServerCore


class AgentAPI(JsonRouter):
    """/agent/v1: enrollment, job accept/output/result, work for pollers."""

    def __init__(self, core: ServerCore):
        super().__init__("/agent/v1", apischema.OPERATIONS)
        self.core = core
        self.route("POST", "/enroll", self.enroll)
        self.route("POST", "/jobs/{job}/accept", self.accept)
        self.route("POST", "/jobs/{job}/output", self.output)
        self.route("POST", "/jobs/{job}/result", self.result)
        self.route("GET", "/work", self.work)
        self.route("GET", "/settings", self.settings)
        self.route("GET", "/whoami", self.whoami)
        self.route("GET", "/policies", self.policies)
        self.route("POST", "/policies/status", self.policy_status)
        self.route("GET", "/profile", self.profile)
        self.route("POST", "/profile/status", self.profile_status)

    def authorize(self, request, handler) -> None:
        if handler == self.enroll:
            return
        request.agent_id = self.core.authenticate_agent(request)

    # -- enrollment ----------------------------------------------------------------------
    @inlineCallbacks
    def enroll(self, request):
        body = json_object(request)
        token, csr = body.get("token"), body.get("csr")
        if not isinstance(token, str) or not isinstance(csr, str):
            raise ApiError(400, "enroll needs 'token' and 'csr' (PEM) strings")
        hostname = str(body.get("hostname", ""))[:255]
        now = self.core.clock.seconds()
        # The same key and token again within minutes: an agent that gave up waiting for
        # the answer (a busy server) and asks again gets the same identity, and the token is
        # not used twice. The CSR's signature proves it holds the key.
        key_id = pki.csr_key_id(csr.encode())
        again = self.core.recent_enrollments.get(key_id) if key_id is not None else None
        if again is not None and again[0] == token and now - again[1] < RE_ENROLL_WINDOW:
            self._log.info(
                "agent {agent} asked again for its enrollment", agent=again[2]["agent_id"]
            )
            return Reply(again[2], status=201)
        agent_id = "a-" + os.urandom(10).hex()
        try:  # the CSR is checked first: a refused request does not use up the token
            cert_pem = self.core.ca.sign_csr(
                csr.encode(),
                common_name=agent_id,
                days=self.core.config.cert_days,
                unit=self.core.name,  # which server the agent belongs to (gateways route by it)
            )
        except ValueError as e:
            raise ApiError(400, f"bad certificate request: {e}") from None
        try:
            token_row = yield self.core.store.consume_token_row(token, now)
        except TokenRefused as e:
            self._log.warn("enrollment refused for {host}: {why}", host=hostname, why=str(e))
            raise ApiError(403, str(e)) from None
        fingerprint = pki.fingerprint(pki.load_certificate(cert_pem))
        approved = not self.core.settings["require_approval"]
        yield self.core.store.add_agent(agent_id, hostname, fingerprint, now, approved)
        self.core.agent_enrolled(agent_id, hostname, approved)
        if token_row.get("profile"):
            yield self.core.agent_config.set_enrollment_profile(agent_id, token_row["profile"])
        self._log.info("agent {agent} enrolled ({host})", agent=agent_id, host=hostname)
        reply = {
            "agent_id": agent_id,
            "certificate": cert_pem.decode(),
            "ca": self.core.ca.cert_pem.decode(),
        }
        if key_id is not None:
            self.core.recent_enrollments.remember(key_id, (token, now, reply), now)
        return Reply(reply, status=201)

    def whoami(self, request):
        return {"agent_id": request.agent_id, "transport": _carried_by(request)}

    # -- jobs ----------------------------------------------------------------------------
    def accept(self, request, job: str):
        decision = self.core.jobs.accept(request.agent_id, job)
        return {"decision": decision.value}

    def output(self, request, job: str):
        body = json_object(request)
        seq, stream, text = body.get("seq"), body.get("stream"), body.get("text")
        if (
            not isinstance(seq, int)
            or stream not in ("stdout", "stderr", "log")
            or not isinstance(text, str)
        ):
            raise ApiError(400, "output needs int 'seq', 'stream' (stdout/stderr/log), 'text'")
        self.core.jobs.output(request.agent_id, job, seq, stream, text)
        return Reply(None, status=204)

    @inlineCallbacks
    def result(self, request, job: str):
        body = json_object(request)
        state = body.get("state")
        if state not in ("succeeded", "failed", "expired"):
            raise ApiError(400, "result 'state' must be succeeded, failed or expired")
        error = body.get("error")
        if error is not None and not isinstance(error, str):
            raise ApiError(400, "'error' must be a string")
        stored = yield self.core.jobs.result(
            request.agent_id,
            job,
            state,
            body.get("result"),
            error,
            _number(body.get("started")),
            _number(body.get("finished")),
            _number(body.get("received")),
        )
        return {"stored": stored}

    def settings(self, request):
        """What an agent needs to know to reach this server well."""
        s = self.core.settings
        return {
            "persistent_connections": s["persistent_connections"],
            "poll_interval": s["poll_interval"],
            "long_poll": s["long_poll"],
            "keepalive": self.core.config.keepalive,
        }

    # -- policies and connection profile -------------------------------------------------
    @inlineCallbacks
    def policies(self, request):
        """The policies that apply to this agent, with their versions and documents."""
        return {"policies": (yield self.core.agent_config.policies_for(request.agent_id))}

    def policy_status(self, request):
        """The agent reports what it runs: {"policies": {name: {version, state, ...}}}."""
        body = json_object(request)
        return self.core.agent_config.report_policies(request.agent_id, body.get("policies"))

    @inlineCallbacks
    def profile(self, request):
        """The connection profile that applies to this agent (null: none)."""
        return {"profile": (yield self.core.agent_config.profile_for(request.agent_id))}

    def profile_status(self, request):
        """The agent reports the profile it runs: {"name", "version"} (nulls: none)."""
        return self.core.agent_config.report_profile(request.agent_id, json_object(request))

    def work(self, request):
        """Jobs for an agent in HTTP mode; with `?wait=S`, a long-poll held up to S seconds
        (at most the server's `long_poll` setting) and answered as soon as work is pushed."""
        core = self.core
        agent_id = request.agent_id
        try:
            wait = float(request.args.get(b"wait", [b"0"])[0])
        except ValueError:
            raise ApiError(400, "'wait' must be a number of seconds") from None
        wait = max(0.0, min(wait, float(core.settings["long_poll"])))
        core.agent_polled(agent_id)
        jobs = core.jobs.work_for(agent_id)
        notices = core.agent_config.notices_for(agent_id)
        if jobs or notices or wait <= 0:
            return self._work_answer(notices + [j.request().to_dict() for j in jobs])
        waiter = core.polls.wait(agent_id, wait)
        request.notifyFinish().addErrback(lambda _: core.polls.cancel(waiter))
        return waiter.deferred.addCallback(self._work_answer)

    def _work_answer(self, requests: list) -> dict[str, Any]:
        s = self.core.settings
        return {
            "requests": requests,
            "poll_interval": s["poll_interval"],
            "long_poll": s["long_poll"],
            "persistent_connections": s["persistent_connections"],
            "server_time": self.core.clock.seconds(),
        }


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _carried_by(request) -> str:
    value = request.requestHeaders.getRawHeaders(b"x-tcm-transport")
    return "websocket" if value == [b"websocket"] and hasattr(request.channel, "_done") else "https"
