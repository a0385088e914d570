"""The web console: its static files at /console/, and the live event stream's adapter.

The console is plain ES modules shipped in the package (`tcm/console/static/`): nothing to
build, nothing from a CDN. Every answer carries a Content-Security-Policy that allows scripts,
styles and connections from this origin only (no inline script, no `eval`), forbids framing,
and `X-Content-Type-Options: nosniff`. `/console/<anything>` that is not a file is the app's
`index.html`, so deep links (`/console/jobs/JOB_ID`) work; the app routes in the browser.

The browser signs in with an API token kept in `sessionStorage` and sent as
`Authorization: Bearer` on every call (never in a URL, never a cookie: no CSRF to guard).

`EventStream` serves `GET /api/v1/events` (declared in apischema like every route): a
`text/event-stream` response fed by one `Subscription` of the `EventHub`, which is also the
response's streaming producer, so a client that does not read is paused and, past its stall
limit, dropped.
"""

from __future__ import annotations

import json
import mimetypes
from importlib import resources
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from tcm.interfaces import IEventHub
from tcm.server.events import INTERVAL, sse_frame

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    b"content-security-policy": CSP.encode(),
    b"x-content-type-options": b"nosniff",
    b"x-frame-options": b"DENY",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}
HEARTBEAT = 15.0  # seconds between comment lines on an idle stream (proxies, dead peers)


def load_static() -> dict[str, bytes]:
    """The console's files by path ("index.html", "js/app.js"), read once from the package."""
    files: dict[str, bytes] = {}
    root = resources.files("tcm.console").joinpath("static")

    def walk(node: Any, prefix: str) -> None:
        for child in node.iterdir():
            name = prefix + child.name
            if child.is_dir():
                walk(child, name + "/")
            elif not child.name.startswith("."):
                files[name] = child.read_bytes()

    walk(root, "")
    return files


class ConsoleResource(Resource):
    """/console/...: the static files, and index.html for every other path."""

    isLeaf = True

    def __init__(self, files: dict[str, bytes] | None = None):
        super().__init__()
        self.files = load_static() if files is None else files

    def render_GET(self, request: Request) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        postpath = request.postpath or []
        if not postpath:
            # /console without the slash: the app's relative module paths need it
            request.setResponseCode(301)
            request.setHeader(b"location", b"/console/")
            return b""
        path = "/".join(p.decode("utf-8", "replace") for p in postpath)
        body = self.files.get(path) if path and ".." not in path else None
        if body is None:
            if "." in path.rsplit("/", 1)[-1] and path.split("/", 1)[0] in ("js", "css", "img"):
                request.setResponseCode(404)  # a missing asset is missing, not the app
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"not found\n"
            path, body = "index.html", self.files["index.html"]
        suffix = "." + path.rsplit(".", 1)[-1] if "." in path else ""
        kind = TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"
        request.setHeader(b"content-type", kind.encode())
        return body

    render_HEAD = render_GET


class EventStream:
    """One client's `text/event-stream`: a hello event, batches, heartbeats, and a `close`
    event (with the reason) when the server ends it. Fires `done` when the stream ends."""

    _log = Logger()

    def __init__(
        self,
        hub: IEventHub,
        clock: Any,
        request: Request,
        topics: frozenset[str],
        wait: float,
        heartbeat: float = HEARTBEAT,
    ):
        self.hub = hub
        self.clock = clock
        self.request = request
        self.topics = topics
        self.wait = wait
        self.heartbeat = heartbeat
        self.done: Deferred[None] = Deferred()
        self.subscription: Any = None
        self._timers: list[Any] = []

    def start(self) -> Deferred[None]:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        self.subscription = self.hub.subscribe(self.topics, self._batch, self._close)
        request.registerProducer(self.subscription, True)
        request.notifyFinish().addBoth(self._gone)
        hello = {"topics": sorted(self.topics), "interval": INTERVAL, "wait": self.wait}
        self._write(b"event: hello\ndata: " + json.dumps(hello).encode() + b"\n\n")
        self._timers.append(self.clock.callLater(self.wait, self._close, "the stream's time"))
        self._timers.append(self.clock.callLater(self.heartbeat, self._beat))
        return self.done

    def _write(self, data: bytes) -> None:
        if not self.done.called:
            self.request.write(data)

    def _batch(self, batch: dict[str, Any]) -> None:
        self._write(sse_frame(batch))

    def _beat(self) -> None:
        if self.done.called:
            return
        self._write(b": keepalive\n\n")
        self._timers.append(self.clock.callLater(self.heartbeat, self._beat))

    def _close(self, reason: str) -> None:
        """The server ends the stream (its time is up, or the client is too slow)."""
        if self.done.called:
            return
        self._write(b"event: close\ndata: " + json.dumps({"reason": reason}).encode() + b"\n\n")
        self._end()
        self.done.callback(None)

    def _gone(self, _: Any) -> None:
        """The client went away (or the response finished)."""
        if not self.done.called:
            self._end()
            self.done.callback(None)

    def _end(self) -> None:
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers = []
        if self.subscription is not None:
            self.subscription.cancel()
        try:
            self.request.unregisterProducer()
        except (AttributeError, RuntimeError):  # already gone with its channel
            pass
