"""The agents' HTTPS fallback through the gateway: each call crosses the upstream link as a
tcm.v1 `request` envelope and is rendered on the server by the same resource tree as any
agent API call; the `response` envelope becomes the HTTP answer. Long-polls
(`GET /agent/v1/work?wait=S`) are simply requests whose answer comes later.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tcm import compat
from tcm.protocol.envelope import Envelope, ProtocolError, decode, encode
from tcm.relay.relays import GatewayRelay
from tcm.relay.requests import RequestLost, RequestTimedOut
from tcm.tls import pki

METHODS = ("GET", "POST", "PUT", "DELETE")


class AgentApiForwarder(Resource):
    """/agent/v1/... (except ws) and /upstream/NAME/agent/v1/...: relayed to the agent's server."""

    isLeaf = True
    _log = Logger()

    def __init__(self, relay: GatewayRelay, max_body: int = 1024 * 1024, wanted: str | None = None):
        super().__init__()
        self.relay = relay
        self.max_body = max_body
        self.wanted = wanted  # the upstream named in the URL, if any
        self.requests = 0
        self.failures: dict[str, int] = {}

    def render(self, request):
        relay = self.relay
        method = request.method.decode("ascii", "replace")
        if method not in METHODS:
            return self._error(request, 405, f"method {method} is not part of the agent API")
        agent_id, server = pki.peer_subject(request.channel.transport)
        if agent_id is not None and ":" in agent_id:
            return self._error(request, 403, "a node certificate cannot call the agent API")
        upstream, refusal = relay.admit_call(agent_id, server, self.wanted)
        if refusal is not None:
            return self._error(request, *refusal)
        path = request.uri.decode("ascii", "replace")
        if self.wanted is not None:
            path = path[len(f"/upstream/{self.wanted}") :]
        raw = request.content.read(self.max_body + 1) if request.content is not None else b""
        if len(raw) > self.max_body:
            return self._error(request, 413, f"request body over {self.max_body} bytes")
        data: dict[str, Any] = {"method": method, "path": path}
        if raw:
            try:
                data["body"] = json.loads(raw)
            except ValueError as e:
                return self._error(request, 400, f"request body is not JSON: {e}")
        try:
            envelope = encode(Envelope(type="request", data=data))
        except (ProtocolError, ValueError) as e:
            return self._error(request, 400, f"not a valid agent API call: {e}")
        peer = request.getClientAddress()
        host = getattr(peer, "host", "0.0.0.0")
        peer_text = f"tcp{'6' if ':' in host else '4'}:{host}:{getattr(peer, 'port', 0)}"
        self.requests += 1
        d = relay.request(upstream, agent_id, peer_text, envelope)
        d.addCallbacks(self._answer, self._lost, callbackArgs=(request,), errbackArgs=(request,))
        # The agent gave up (a long-poll it abandoned): nothing to write to any more.
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    def _answer(self, payload: bytes, request) -> None:
        if request.finished or compat.request_disconnected(request):
            return
        try:
            reply = decode(payload, 0)
        except ProtocolError as e:
            self._log.warn("server answered a relayed call with a bad envelope: {e}", e=e)
            self._finish(request, 502, {"error": "the server's answer could not be read"})
            return
        status = reply.data.get("status", 502)
        body = reply.data.get("body")
        self._finish(request, status if isinstance(status, int) else 502, body)

    def _lost(self, f, request) -> None:
        if f.check(CancelledError) is not None:
            return  # the agent went away first
        if f.check(RequestLost, RequestTimedOut) is None:
            self._log.failure("relayed call failed", f)
        if not request.finished and not compat.request_disconnected(request):
            status = 504 if f.check(RequestTimedOut) is not None else 502
            self._finish(request, status, {"error": f.getErrorMessage() or "relay failed"})

    def _finish(self, request, status: int, body: Any) -> None:
        request.setResponseCode(status)
        if body is None:
            request.finish()
            return
        if isinstance(body, str):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(body.encode())
        else:
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps(body, separators=(",", ":")).encode())
        request.finish()

    def _error(self, request, status: int, reason: str) -> bytes:
        key = f"http_{status}"
        self.failures[key] = self.failures.get(key, 0) + 1
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": reason}).encode()
