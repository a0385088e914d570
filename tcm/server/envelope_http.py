"""Serve a `request` envelope with the same twisted.web resource tree that serves HTTPS.

A real `twisted.web.server.Request` is built on an in-memory channel whose transport is the
session's own connection, so resources see the same peer certificate, the same peer address and
the same code path as for a request that came over HTTPS. Their response becomes a `response`
envelope. Nothing above the transport can tell which one carried the request.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from tcm.protocol.envelope import Envelope
from tcm.server.web import DirectCall, JsonRouter

CARRIED_BY_HEADER = b"x-tcm-transport"


class PeerView:
    """What a resource may learn of the connection under a session (who and how), without
    access to the connection itself: no resource can write to it or take it over."""

    __slots__ = ("_transport", "_peer", "_host", "tcm_agent_id")
    negotiatedProtocol = None
    disconnecting = False

    def __init__(self, transport: Any, agent_id: str | None = None):
        self._transport = transport
        self._peer = transport.getPeer()  # a session's addresses do not change: ask once
        self._host = transport.getHost()
        self.tcm_agent_id = agent_id  # verified when the session's connection was accepted

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def getPeerCertificate(self):
        return self._transport.getPeerCertificate()

    def getHandle(self):
        return self._transport.getHandle()


class EnvelopeChannel:
    """The part of an HTTP channel a Request uses, collecting the response in memory."""

    factory = None

    def __init__(self, site: Site, transport: Any, done: Deferred):
        self.site = site
        self.transport = transport
        self._done = done
        self.code = 500
        self.headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return True

    def writeHeaders(self, version, code, reason, headers) -> None:
        self.code = int(code)
        if isinstance(headers, Headers):
            pairs = headers.getAllRawHeaders()
        else:
            pairs = ((k, [v]) for k, v in headers)
        for name, values in pairs:
            self.headers[name.decode("latin-1").lower()] = b", ".join(values).decode("latin-1")

    def write(self, data: bytes) -> None:
        self._body.append(data)

    def writeSequence(self, seq) -> None:
        self._body.extend(seq)

    def registerProducer(self, producer, streaming) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def requestDone(self, request: Request) -> None:
        self._done.callback((self.code, self.headers, b"".join(self._body)))


WEBSOCKET_PATH = "/agent/v1/ws"


def _refuse(data: dict[str, Any]) -> str | None:
    """Why a request envelope cannot be rendered as an HTTP request, or None."""
    if data["path"].split("?", 1)[0].rstrip("/") == WEBSOCKET_PATH:
        return "the WebSocket endpoint cannot be requested over a session"
    for name, value in (data.get("headers") or {}).items():
        try:
            name.encode("latin-1")
            value.encode("latin-1")
        except UnicodeEncodeError:
            return f"header {name!r}: HTTP header names and values must be Latin-1"
    try:
        data["path"].encode("ascii")
    except UnicodeEncodeError:
        return "the path must be ASCII (percent-encode the rest)"
    return None


def render_envelope(
    site: Site, transport: Any, env: Envelope, carried_by: bytes = b"websocket"
) -> Deferred[Envelope]:
    """Render a `request` envelope on `site`; fires with the `response` envelope.

    `carried_by` is what the agent used: its session, or HTTPS relayed by a gateway."""
    data = env.data
    refusal = _refuse(data)
    if refusal is not None:
        return succeed(env.reply("response", {"status": 400, "body": {"error": refusal}}))
    # The parsed body leaves the envelope (which is held until the answer): what the
    # resource reads is `raw`, a fraction of the parsed objects' memory (issue 18).
    body = data.pop("body", None)
    raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    del body
    done: Deferred = Deferred()
    view = transport if isinstance(transport, PeerView) else PeerView(transport)
    channel = EnvelopeChannel(site, view, done)
    request = site.requestFactory(channel)
    request.clientproto = b"HTTP/1.0"  # no chunked encoding: the body is one envelope field
    request.content = BytesIO(raw)  # type: ignore[assignment]
    headers = request.requestHeaders
    for name, value in (data.get("headers") or {}).items():
        headers.setRawHeaders(name.encode("latin-1"), [value.encode("latin-1")])
    if raw:
        headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [str(len(raw)).encode()])
    headers.setRawHeaders(CARRIED_BY_HEADER, [carried_by])
    request.requestReceived(data["method"].encode(), data["path"].encode(), b"HTTP/1.0")

    def to_envelope(result: tuple[int, dict[str, str], bytes]) -> Envelope:
        code, resp_headers, payload = result
        out: dict[str, Any] = {"status": code}
        if payload:
            if resp_headers.get("content-type", "").startswith("application/json"):
                out["body"] = json.loads(payload)
            else:
                out["body"] = payload.decode("utf-8", "replace")
        return env.reply("response", out)

    return done.addCallback(to_envelope)


def serve_envelope(
    router: JsonRouter | None,
    site: Site,
    transport: Any,
    env: Envelope,
    carried_by: bytes = b"websocket",
) -> Deferred[Envelope]:
    """Serve a `request` envelope from an agent's own session: with its route's handler
    called directly when `router` marks the route `direct` (no HTTP request built, the same
    answer), else rendered on `site` (`render_envelope`).

    Direct only for what a session of the agent itself carries: no headers (a forwarded
    certificate, a relayed HTTPS call go the HTTP way), an ASCII path, and a `PeerView`
    whose agent was verified when the connection was accepted."""
    data = env.data
    if (
        router is not None
        and carried_by == b"websocket"
        and isinstance(transport, PeerView)
        and not data.get("headers")
        and data["path"].isascii()
    ):
        call = DirectCall(
            data["method"], data["path"], data.get("body"), transport, "websocket", env.escapes
        )
        d = router.serve_direct(call)
        if d is not None:
            return d.addCallback(_response_envelope, env)
    return render_envelope(site, transport, env, carried_by)


def _response_envelope(answer: tuple[int, Any], env: Envelope) -> Envelope:
    status, body = answer
    out: dict[str, Any] = {"status": status}
    if body is not None:
        out["body"] = body
    return env.reply("response", out)
