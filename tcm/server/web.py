"""JSON resources with a route table, for the admin API and the agent API.

A handler gets (request, **path_params) and returns a JSON-able value, a `Reply`, or a
Deferred of either. `ApiError` becomes a JSON error body with its status, and so does a domain
error of the services (`tcm.server.errors`), with the status `http_status` maps it to (the one
place that does); anything else unexpected becomes a 500 with a logged traceback, never a hung
request.

A route whose (method, full pattern) is declared in `tcm.server.apischema` is checked
against its declaration after the request is authorized and before the handler runs: path
parameters, query parameters and body; a request that breaks it is a 400 naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tcm import compat
from tcm.httplimits import MAX_BODY as MAX_BODY
from tcm.server import errors
from tcm.server.apicheck import CheckedOperation, InvalidRequest
from tcm.server.apischema import Operation
from tcm.store.errors import StoreUnavailable


class ApiError(Exception):
    """An error answered to the client with `status` and a JSON body naming the reason."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


# The HTTP status of each domain error (the one mapping; close codes: errors.close_code).
HTTP_STATUS: dict[type[errors.DomainError], int] = {
    errors.Invalid: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.Unavailable: 503,
}


def http_status(error: errors.DomainError) -> int:
    """The HTTP status that answers a request a service refused with `error`."""
    for kind in type(error).__mro__:
        status = HTTP_STATUS.get(kind)  # type: ignore[call-overload]
        if status is not None:
            return status
    return 400


def api_error(error: errors.DomainError) -> ApiError:
    """A domain error as the JSON error answer (status, message, details)."""
    return ApiError(http_status(error), error.message, **error.details)


@attrs.frozen
class Reply:
    body: Any
    status: int = 200
    headers: dict[str, str] = attrs.field(factory=dict)


Handler = Callable[..., Any]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_body(request, required: bool = True) -> Any:
    """The request's JSON body; ApiError(400) when it is not JSON."""
    if type(request) is DirectCall:
        return request.json(required)
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    if not raw:
        if required:
            raise ApiError(400, "request body must be a JSON object")
        return {}
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if (b"\\ud" in raw or b"\\uD" in raw) and _has_lone_surrogate(body):
        # JSON lets \ud800 stand alone; no store (nor UTF-8) can hold it: refused here
        raise ApiError(400, "request body is not valid JSON: a lone surrogate is not text")
    return body


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string that is not valid Unicode text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def json_object(request) -> dict[str, Any]:
    body = json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


class DirectCall:
    """A route called without an HTTP request: a `request` envelope that came over an
    agent's session, its body already decoded with the envelope.

    What a handler reads of the request it serves, and nothing else: the method, the path
    and its query (`args`, bytes as twisted.web gives them), the JSON body (through
    `json_body`, which asks `json`), `peer` (the session's `PeerView`: who is calling) and
    what `authorize` sets (`agent_id`). The same handler serves both; the answer of a call
    is the one an HTTP request would get (`JsonRouter.serve_direct`), without the
    request's objects, headers and bytes (issue 17: most of the server's CPU per result)."""

    __slots__ = ("method", "path", "args", "body", "peer", "carried_by", "agent_id", "escapes")

    def __init__(
        self,
        method: str,
        path: str,
        body: Any,
        peer: Any,
        carried_by: str,
        escapes: bool = True,
    ):
        self.method = method
        self.path, _, query = path.partition("?")
        self.args: dict[bytes, list[bytes]] = (
            parse_qs(query.encode("ascii"), keep_blank_values=True) if query else {}
        )
        self.body = body
        self.peer = peer
        self.carried_by = carried_by
        self.agent_id: str | None = None
        # whether the body may hold a lone surrogate (its text had \ud escapes): once
        # checked, or when there were none, it is not walked (a 100 KB inventory is ~40,000
        # strings: walking them was a fifth of the server's CPU per result)
        self.escapes = escapes

    def json(self, required: bool) -> Any:
        """The body as `json_body` answers it for an HTTP request whose body this
        envelope's body would be: absent (null) is {} or a 400, a lone surrogate a 400."""
        body = self.body
        if body is None:
            if required:
                raise ApiError(400, "request body must be a JSON object")
            return {}
        if self.escapes:
            if _has_lone_surrogate(body):
                raise ApiError(400, "request body is not valid JSON: a lone surrogate is not text")
            self.escapes = False
        return body


@attrs.frozen
class Route:
    """One route as `JsonRouter.routes()` lists it; `check`: its declaration, compiled."""

    method: str
    pattern: str  # the full pattern, prefix included: "/api/v1/jobs/{job}"
    handler: Handler
    check: CheckedOperation | None


DIRECT_PATHS_KEPT = 1024  # routed paths a router keeps for `serve_direct`


class JsonRouter(Resource):
    """A leaf resource that routes (method, path pattern) to handlers."""

    isLeaf = True
    _log = Logger()

    def __init__(self, prefix: str, operations: Mapping[tuple[str, str], Operation] | None = None):
        """`operations`: the declarations (apischema.OPERATIONS) routes are checked against,
        keyed by (method, full pattern); None: no checks (a router of tests)."""
        super().__init__()
        self._prefix = prefix.rstrip("/")
        self._operations = operations
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        # (method, regex source) -> (full pattern, compiled declaration or None)
        self._declared: dict[tuple[str, str], tuple[str, CheckedOperation | None]] = {}
        self._direct: set[tuple[str, str]] = set()  # (method, regex source) callable directly
        # (method, path) -> what `_find_direct` found: the results of a job's ten thousand
        # agents are calls to one path, routed once (issue 17); bounded
        self._direct_paths: dict[
            tuple[str, str], tuple[Handler, CheckedOperation | None, dict[str, str]]
        ] = {}
        # told (method, path below the prefix) of each write answered with success: the
        # cluster tells the other nodes (tcm/server/cluster)
        self.written: Callable[[str, str], None] | None = None

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        """Add a route; `{name}` in the pattern captures one path segment."""
        self._add_route(method, pattern, handler, direct=False)

    def direct_route(self, method: str, pattern: str, handler: Handler) -> None:
        """Add a route whose handler may also be called with a `DirectCall`
        (`serve_direct`): it reads of its request only what a `DirectCall` has."""
        self._add_route(method, pattern, handler, direct=True)

    def _add_route(self, method: str, pattern: str, handler: Handler, direct: bool) -> None:
        regex = "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "/?$"
        full = self._prefix + pattern
        operation = None if self._operations is None else self._operations.get((method, full))
        check = None if operation is None else CheckedOperation(method, full, operation)
        self._routes.append((method, re.compile(regex), handler))
        self._direct_paths.clear()  # routed before this route was there
        self._declared[(method, regex)] = (full, check)
        if direct:
            self._direct.add((method, regex))

    def routes(self) -> list[Route]:
        """The route table, in the order routes were added."""
        out = []
        for method, regex, handler in self._routes:
            pattern, check = self._declared[(method, regex.pattern)]
            out.append(Route(method, pattern, handler, check))
        return out

    def authorize(self, request, handler: Handler) -> None:
        """Raise ApiError unless the request may call this handler (subclasses decide)."""

    def refused(self, request, status: int, reason: str) -> None:
        """A request was refused with 401 or 403 (subclasses audit it)."""

    def render(self, request):
        path = request.path.decode("utf-8", "replace")
        if not path.startswith(self._prefix):
            self._finish(request, ApiError(404, "not found"))
            return NOT_DONE_YET
        sub = path[len(self._prefix) :] or "/"
        method = request.method.decode("ascii", "replace")
        allowed = []
        for m, regex, handler in self._routes:
            match = regex.match(sub)
            if match is None:
                continue
            if m != method:
                allowed.append(m)
                continue
            check = self._declared[(m, regex.pattern)][1]
            d = maybeDeferred(self._call, request, handler, check, match.groupdict())
            d.addCallbacks(lambda r: self._finish(request, r), lambda f: self._fail(request, f))
            return NOT_DONE_YET
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(set(allowed))).encode())
            self._finish(request, ApiError(405, f"method {method} not allowed here; use {allowed}"))
        else:
            self._finish(request, ApiError(404, f"no such resource: {path}"))
        return NOT_DONE_YET

    def serve_direct(self, call: DirectCall) -> Deferred[tuple[int, Any]] | None:
        """Serve `call` with the handler of its route, without an HTTP request: fires with
        (status, JSON body or None), the status and body `render` would answer. None when
        the call is not for a route marked `direct` (the caller renders it instead: the same
        answer, 404 and 405 included, the HTTP way)."""
        path = call.path
        if not path.startswith(self._prefix):
            return None
        key = (call.method, path)
        found = self._direct_paths.get(key)
        if found is None:
            found = self._find_direct(call.method, path[len(self._prefix) :] or "/")
            if found is None:
                return None
            if len(self._direct_paths) >= DIRECT_PATHS_KEPT:
                self._direct_paths.clear()
            self._direct_paths[key] = found
        handler, check, params = found
        d = maybeDeferred(self._call, call, handler, check, params)
        return d.addCallbacks(self._status_body, lambda f: self._status_body(self._error(call, f)))

    def _find_direct(
        self, method: str, sub: str
    ) -> tuple[Handler, CheckedOperation | None, dict[str, str]] | None:
        """The handler, declaration and path parameters of a direct route for `sub`, or None
        (no route, or the first route that matches is not direct)."""
        for m, regex, handler in self._routes:
            if m != method:
                continue
            match = regex.match(sub)
            if match is None:
                continue
            if (m, regex.pattern) not in self._direct:
                return None
            return handler, self._declared[(m, regex.pattern)][1], match.groupdict()
        return None

    @staticmethod
    def _status_body(result: Any) -> tuple[int, Any]:
        status, _headers, body = _response(result)
        return status, (None if status == 204 else body)

    def _call(
        self, request, handler: Handler, check: CheckedOperation | None, params: dict[str, str]
    ) -> Any:
        self.authorize(request, handler)
        if check is not None:
            try:
                self._check(request, check, params)
            except InvalidRequest as e:
                raise errors.Invalid(None, e.message, **e.extra) from None
        return handler(request, **params)

    @staticmethod
    def _check(request, check: CheckedOperation, params: dict[str, str]) -> None:
        """Check a request against its declaration; the body is left for the handler to
        read again."""
        check.check_path(params)
        check.check_query(request.args or {})
        if check.reads_body and type(request) is DirectCall:
            check.check_body(request.json(check.operation.body_required), request.body is not None)
        elif check.reads_body:
            content = request.content
            present = content is not None and content.read(1) != b""
            if content is not None:
                content.seek(0)
            body = json_body(request, required=check.operation.body_required)
            if content is not None:
                content.seek(0)
            check.check_body(body, present)

    def _fail(self, request, failure: Failure) -> None:
        return self._finish(request, self._error(request, failure))

    def _error(self, request, failure: Failure) -> ApiError:
        """The answer to a handler's failure (a domain error's status, or a logged 500)."""
        if failure.check(ApiError):
            return failure.value  # type: ignore[return-value]
        if failure.check(StoreUnavailable):  # nothing written: try again when it is back
            return ApiError(503, str(failure.value))
        if isinstance(failure.value, errors.DomainError):
            error = api_error(failure.value)
            if error.status in (401, 403):
                self.refused(request, error.status, error.message)
            return error
        self._log.failure(
            "error serving {method} {path}", failure, method=request.method, path=request.path
        )
        return ApiError(500, "internal server error")

    def _finish(self, request, result: Any):
        if compat.request_disconnected(request) or request.finished:
            return None
        status, headers, body = _response(result)
        request.setResponseCode(status)
        if self.written is not None and status < 400 and request.method not in (b"GET", b"HEAD"):
            path = request.path.decode("utf-8", "replace")[len(self._prefix) :]
            self.written(request.method.decode("ascii", "replace"), path)
        for k, v in headers.items():
            request.setHeader(k, v)
        if status == 204 or body is None:
            request.finish()
            return None
        if isinstance(body, bytes):  # a Reply of another media type (its content-type set)
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            request.finish()
            return None
        payload = json.dumps(body, separators=(",", ":"), default=str).encode()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", str(len(payload)).encode())
        request.write(payload)
        request.finish()
        return None


def _response(result: Any) -> tuple[int, dict[str, str], Any]:
    """A handler's result (a value, a `Reply`, an `ApiError`) as (status, headers, body)."""
    if isinstance(result, ApiError):
        return result.status, {}, {"error": result.message, **result.extra}
    if isinstance(result, Reply):
        return result.status, result.headers, result.body
    return 200, {}, result


class ApiWithWebSocket(Resource):
    """A JSON API whose child `ws` is a WebSocket endpoint (/agent/v1, /link/v1)."""

    def __init__(self, api: Resource, ws: Any):  # ws: an Autobahn WebSocketResource
        super().__init__()
        self._api = api
        self._ws = ws

    def getChild(self, path, request):
        if path == b"ws":
            # The WebSocket takes this connection over: the HTTP channel's idle timer would
            # keep the channel (and its request) alive for another minute per session.
            set_timeout = getattr(request.channel, "setTimeout", None)
            if set_timeout is not None:
                set_timeout(None)
            return self._ws
        request.postpath.insert(0, path)
        request.prepath.pop()
        return self._api

    def render(self, request):
        return self._api.render(request)
