"""JsonRouter: routes, JSON answers and errors, over real HTTP bytes on a real Site."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from tcm.server import web
from tcm.server.web import MAX_BODY, ApiError, JsonRouter, Reply, json_body, json_object

PEER = IPv4Address("TCP", "192.0.2.10", 40000)


class Exchange:
    """One HTTP/1.1 request as bytes into the site's protocol; the answer parsed."""

    def __init__(
        self,
        site: Site,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.transport = StringTransport(peerAddress=PEER)
        self.protocol = site.buildProtocol(PEER)
        self.protocol.makeConnection(self.transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.protocol.dataReceived("\r\n".join(lines).encode() + b"\r\n\r\n" + body)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        raw = self.transport.value()
        assert raw, "no response yet"
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                if int(size, 16) == 0:
                    break
                body, rest = body + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
        else:
            body = rest[: int(headers.get("content-length", 0))]
            assert rest == body  # nothing after the body
        self.protocol.connectionLost(Failure(ConnectionError("test over")))
        return int(status_line.split(" ")[1]), headers, body

    def json(self) -> tuple[int, Any]:
        status, headers, body = self.response()
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(body)
        return status, json.loads(body)


class Handlers:
    def __init__(self) -> None:
        self.waiting: list[Deferred] = []
        self.calls: list[tuple[str, dict[str, str]]] = []

    def record(self, name):
        def handler(request, **params):
            self.calls.append((name, params))
            return {"handler": name, "params": params}

        return handler


@pytest.fixture
def handlers():
    return Handlers()


@pytest.fixture
def router(handlers):
    r = JsonRouter("/api/v1/")
    r.route("GET", "/jobs", handlers.record("list"))
    r.route("GET", "/jobs/{job}", handlers.record("get"))
    r.route("GET", "/jobs/{job}/targets/{agent}", handlers.record("target"))
    r.route("POST", "/jobs/{job}/cancel", handlers.record("cancel"))
    r.route("DELETE", "/jobs/{job}", handlers.record("delete"))
    return r


@pytest.fixture
def site(router):
    root = Resource()
    api = Resource()
    root.putChild(b"api", api)
    api.putChild(b"v1", router)
    root.putChild(b"elsewhere", router)  # mounted where its prefix does not match
    return Site(root, reactor=Clock())


def call(site, method, path, body: bytes = b"", **kw) -> tuple[int, Any]:
    return Exchange(site, method, path, body, **kw).json()


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "handler", "params"),
    [
        ("/api/v1/jobs", "list", {}),
        ("/api/v1/jobs/", "list", {}),
        ("/api/v1/jobs?state=running", "list", {}),
        ("/api/v1/jobs/9c1d", "get", {"job": "9c1d"}),
        ("/api/v1/jobs/9c1d/", "get", {"job": "9c1d"}),
        ("/api/v1/jobs/9c1d/targets/a-17", "target", {"job": "9c1d", "agent": "a-17"}),
    ],
)
def test_route_params(site, path, handler, params):
    assert call(site, "GET", path) == (200, {"handler": handler, "params": params})


def test_params_are_one_segment(site, handlers):
    status, body = call(site, "GET", "/api/v1/jobs/a/b")
    assert status == 404
    assert handlers.calls == []


def test_first_matching_route_wins(site, router, handlers):
    router.route("GET", "/jobs/special", handlers.record("special"))  # after /jobs/{job}
    assert call(site, "GET", "/api/v1/jobs/special")[1]["handler"] == "get"


def test_unknown_path_is_404_naming_it(site):
    assert call(site, "GET", "/api/v1/nope") == (404, {"error": "no such resource: /api/v1/nope"})


def test_outside_the_prefix_is_404(site):
    assert call(site, "GET", "/elsewhere/jobs") == (404, {"error": "not found"})


def test_wrong_method_is_405_naming_the_allowed_ones(site, handlers):
    status, body = call(site, "POST", "/api/v1/jobs/9c1d")
    assert status == 405
    assert body == {"error": "method POST not allowed here; use ['GET', 'DELETE']"}
    assert handlers.calls == []
    status, body = call(site, "PUT", "/api/v1/jobs/9c1d/cancel")
    assert status == 405 and "POST" in body["error"]


# -- answers ----------------------------------------------------------------------------------


def test_reply_with_status_and_headers(site, router):
    router.route(
        "POST",
        "/things",
        lambda request: Reply(
            {"id": "t1"}, status=201, headers={"Location": "/api/v1/things/t1", "X-Count": "1"}
        ),
    )
    exchange = Exchange(site, "POST", "/api/v1/things")
    status, headers, body = exchange.response()
    assert status == 201
    assert headers["location"] == "/api/v1/things/t1"
    assert headers["x-count"] == "1"
    assert json.loads(body) == {"id": "t1"}


@pytest.mark.parametrize(
    "reply", [Reply(None, status=204), Reply({"ignored": 1}, status=204), None]
)
def test_no_body(site, router, reply):
    router.route("DELETE", "/things/{name}", lambda request, name: reply)
    status, headers, body = Exchange(site, "DELETE", "/api/v1/things/x").response()
    assert status == (204 if reply is not None else 200)
    assert body == b""
    assert headers.get("content-type") != "application/json"


def test_values_json_cannot_hold_become_strings(site, router):
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    router.route("GET", "/when", lambda request: {"at": when})
    assert call(site, "GET", "/api/v1/when") == (200, {"at": "2026-01-02 03:04:05"})


def test_deferred_answer(site, router, handlers):
    d: Deferred = Deferred()
    router.route("GET", "/slow", lambda request: d)
    exchange = Exchange(site, "GET", "/api/v1/slow")
    assert exchange.transport.value() == b""
    d.callback(Reply({"done": True}, status=202))
    assert exchange.json() == (202, {"done": True})


def test_api_error_with_extra_fields(site, router):
    def refuse(request):
        raise ApiError(400, "unknown agent ids", unknown=["a-1", "a-2"])

    router.route("POST", "/refuse", refuse)
    assert call(site, "POST", "/api/v1/refuse") == (
        400,
        {"error": "unknown agent ids", "unknown": ["a-1", "a-2"]},
    )


def test_deferred_api_error(site, router):
    router.route("GET", "/later", lambda request: fail(ApiError(409, "already running")))
    assert call(site, "GET", "/api/v1/later") == (409, {"error": "already running"})


@pytest.mark.parametrize("how", ["raise", "deferred"])
def test_unexpected_exception_is_500_logged_not_sent(site, router, how):
    events: list[dict] = []
    router._log = Logger(namespace="test", observer=events.append)

    def broken(request):
        if how == "raise":
            raise ZeroDivisionError("secret detail 42")
        return fail(ZeroDivisionError("secret detail 42"))

    router.route("GET", "/broken", broken)
    status, headers, body = Exchange(site, "GET", "/api/v1/broken").response()
    assert status == 500
    assert json.loads(body) == {"error": "internal server error"}
    assert b"secret" not in body and b"Traceback" not in body
    [event] = events
    assert event["log_failure"].check(ZeroDivisionError)
    assert event["method"] == b"GET" and event["path"] == b"/api/v1/broken"
    assert "Traceback" in event["log_failure"].getTraceback()


def test_authorize_runs_before_the_handler(site, router, handlers):
    def authorize(request, handler):
        if request.getHeader(b"authorization") != b"Bearer good":
            raise ApiError(401, "token required")

    router.authorize = authorize
    assert call(site, "GET", "/api/v1/jobs") == (401, {"error": "token required"})
    assert handlers.calls == []
    assert call(site, "GET", "/api/v1/jobs", headers={"Authorization": "Bearer good"})[0] == 200


def test_no_answer_after_the_client_went_away(site, router):
    d: Deferred = Deferred()
    router.route("GET", "/slow", lambda request: d)
    exchange = Exchange(site, "GET", "/api/v1/slow")
    exchange.protocol.connectionLost(Failure(ConnectionError("client gone")))
    d.callback({"late": True})  # neither an error nor a write to a closed connection
    assert exchange.transport.value() == b""


# -- request bodies ---------------------------------------------------------------------------


def echo_route(router):
    router.route("POST", "/echo", lambda request: {"got": json_object(request)})


def test_json_body(site, router):
    echo_route(router)
    assert call(site, "POST", "/api/v1/echo", b'{"a": [1, 2]}') == (200, {"got": {"a": [1, 2]}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "request body must be a JSON object"),
        (b"[1]", "request body must be a JSON object"),
        (b"{bad", "request body is not valid JSON"),
        (b"\xff\xfe\xfd", "request body is not valid JSON"),
    ],
)
def test_bad_bodies_are_400(site, router, raw, message):
    echo_route(router)
    status, body = call(site, "POST", "/api/v1/echo", raw)
    assert status == 400
    assert body["error"].startswith(message)


def test_optional_body(site, router):
    router.route("POST", "/opt", lambda request: {"got": json_body(request, required=False)})
    assert call(site, "POST", "/api/v1/opt") == (200, {"got": {}})
    assert call(site, "POST", "/api/v1/opt", b"[3]") == (200, {"got": [3]})


def test_body_over_max_body_is_413(site, router):
    echo_route(router)
    too_big = b'{"x": "' + b"a" * (MAX_BODY - 8) + b'"}'
    assert len(too_big) == MAX_BODY + 1
    assert call(site, "POST", "/api/v1/echo", too_big) == (
        413,
        {"error": f"request body over {MAX_BODY} bytes"},
    )


def test_body_at_max_body_is_taken(site, router, monkeypatch):
    monkeypatch.setattr(web, "MAX_BODY", 20)
    echo_route(router)
    exact = b'{"x": "' + b"a" * 11 + b'"}'
    assert len(exact) == 20
    assert call(site, "POST", "/api/v1/echo", exact)[0] == 200
    assert call(site, "POST", "/api/v1/echo", exact[:-1] + b" }")[0] == 413
