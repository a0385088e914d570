"""A `request` envelope is answered by the same resource tree, with the same answer, as HTTP.

Every case renders one request twice on one real `twisted.web.server.Site`: once as raw
HTTP/1.1 bytes fed to the site's own protocol over a StringTransport, once as a `request`
envelope through `render_envelope`; the status and the JSON body must be the same.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from tcm.protocol.envelope import Envelope, decode, encode
from tcm.server.envelope_http import CARRIED_BY_HEADER, render_envelope
from tcm.server.web import ApiError, JsonRouter, Reply, json_object

PEER = IPv4Address("TCP", "198.51.100.7", 50123)
HOST = IPv4Address("TCP", "10.0.0.1", 8443)


class Api:
    """A small JSON API on a JsonRouter, like the agent API."""

    def __init__(self) -> None:
        self.router = JsonRouter("/api/v1")
        self.waiting: list[Deferred] = []
        self.router.route("GET", "/things/{name}", self.get_thing)
        self.router.route("DELETE", "/things/{name}", self.delete_thing)
        self.router.route("POST", "/things", self.create_thing)
        self.router.route("GET", "/slow", self.slow)
        self.router.route("GET", "/forbidden", self.forbidden)
        self.router.route("GET", "/whoami", self.whoami)

    def get_thing(self, request, name: str):
        args = {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}
        return {"name": name, "args": args}

    def delete_thing(self, request, name: str):
        return Reply(None, status=204)

    def create_thing(self, request):
        body = json_object(request)
        return Reply({"created": body}, status=201, headers={"location": "/api/v1/things/x"})

    def slow(self, request):
        d: Deferred = Deferred()
        self.waiting.append(d)
        return d

    def forbidden(self, request):
        raise ApiError(403, "agent a-1 is revoked", agent="a-1")

    def whoami(self, request):
        peer = request.getClientAddress()
        return {"host": peer.host, "port": peer.port, "method": request.method.decode()}


@pytest.fixture
def api():
    return Api()


@pytest.fixture
def site(api):
    root = Resource()
    api_node = Resource()
    root.putChild(b"api", api_node)
    api_node.putChild(b"v1", api.router)
    return Site(root, reactor=Clock())


class HttpExchange:
    """One HTTP/1.1 request fed as bytes to the site's protocol; the raw answer parsed."""

    def __init__(
        self,
        site: Site,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
        self.protocol = site.buildProtocol(PEER)
        self.protocol.makeConnection(self.transport)
        lines = [
            f"{method} {path} HTTP/1.1",
            "Host: tcm.example.org",
            f"Content-Length: {len(body)}",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.protocol.dataReceived("\r\n".join(lines).encode() + b"\r\n\r\n" + body)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        raw = self.transport.value()
        head, _, rest = raw.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                body, rest = body + rest[:n], rest[n + 2 :]
        else:
            body = rest[: int(headers.get("content-length", len(rest)))]
        self.protocol.connectionLost(Failure(ConnectionError("test over")))
        return status, headers, body


def json_or_none(headers: dict[str, str], body: bytes) -> Any:
    if not body:
        return None
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


def over_http(site, method, path, body=None, raw: bytes | None = None):
    payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    exchange = HttpExchange(site, method, path, payload)
    status, headers, data = exchange.response()
    return status, json_or_none(headers, data)


def over_envelope(site, method, path, body=None) -> Envelope:
    data: dict[str, Any] = {"method": method, "path": path}
    if body is not None:
        data["body"] = body
    env = Envelope(type="request", id="req-1", data=data)
    transport = StringTransport(hostAddress=HOST, peerAddress=PEER)
    d = render_envelope(site, transport, decode(encode(env)))
    response = d.result  # the router answers synchronously here
    assert transport.value() == b""  # nothing leaks onto the session's own connection
    return response


def as_pair(response: Envelope) -> tuple[int, Any]:
    assert response.type == "response"
    assert response.in_reply_to == "req-1"
    decode(encode(response))  # a valid message
    return response.data["status"], response.data.get("body")


CASES = [
    ("GET", "/api/v1/things/lamp", None),
    ("GET", "/api/v1/things/lamp?color=red&color=blue&size=2", None),
    ("GET", "/api/v1/things/lamp/", None),
    ("POST", "/api/v1/things", {"name": "lamp", "watts": 40, "tags": ["a", "b"]}),
    ("POST", "/api/v1/things", ["not", "an", "object"]),
    ("POST", "/api/v1/things", None),  # no body at all
    ("DELETE", "/api/v1/things/lamp", None),
    ("GET", "/api/v1/forbidden", None),
    ("GET", "/api/v1/nothing/here", None),  # 404
    ("PUT", "/api/v1/things/lamp", None),  # 405
    ("DELETE", "/api/v1/things", None),  # 405
    ("GET", "/api/v1/whoami", None),
]


@pytest.mark.parametrize(("method", "path", "body"), CASES)
def test_same_answer_as_http(site, method, path, body):
    expected = over_http(site, method, path, body)
    assert as_pair(over_envelope(site, method, path, body)) == expected


def test_the_expected_answers(site):
    """What the cases above agree on (so that they are not both wrong)."""
    assert over_http(site, "GET", "/api/v1/things/lamp?color=red&color=blue") == (
        200,
        {"name": "lamp", "args": {"color": ["red", "blue"]}},
    )
    assert over_http(site, "POST", "/api/v1/things", {"a": 1}) == (201, {"created": {"a": 1}})
    assert over_http(site, "DELETE", "/api/v1/things/lamp") == (204, None)
    assert over_http(site, "GET", "/api/v1/forbidden") == (
        403,
        {"error": "agent a-1 is revoked", "agent": "a-1"},
    )
    status, body = over_http(site, "GET", "/api/v1/nothing/here")
    assert status == 404 and "/api/v1/nothing/here" in body["error"]
    status, body = over_http(site, "PUT", "/api/v1/things/lamp")
    assert status == 405 and "PUT" in body["error"] and "GET" in body["error"]
    assert over_http(site, "GET", "/api/v1/whoami") == (
        200,
        {"host": "198.51.100.7", "port": 50123, "method": "GET"},
    )


def test_query_args_reach_the_handler(site):
    response = over_envelope(site, "GET", "/api/v1/things/x?a=1&b=two&a=3")
    assert response.data["body"]["args"] == {"a": ["1", "3"], "b": ["two"]}


def test_the_peer_of_the_session_reaches_the_handler(site):
    response = over_envelope(site, "GET", "/api/v1/whoami")
    assert response.data["body"] == {"host": "198.51.100.7", "port": 50123, "method": "GET"}


@pytest.mark.parametrize("raw", [b"{not json", b'{"a": 1', b"\xff\xfe"])
def test_bad_json_body_is_400_both_ways(site, raw):
    status, body = over_http(site, "POST", "/api/v1/things", raw=raw)
    assert status == 400 and "not valid JSON" in body["error"]
    # an envelope's body is JSON already; the same refusal comes from a body of the wrong shape
    response = over_envelope(site, "POST", "/api/v1/things", "a string")
    assert response.data["status"] == 400


def test_deferred_answer(site, api):
    exchange = HttpExchange(site, "GET", "/api/v1/slow")
    assert exchange.transport.value() == b""
    api.waiting.pop().callback({"waited": True})
    status, headers, data = exchange.response()

    env = Envelope(type="request", id="req-1", data={"method": "GET", "path": "/api/v1/slow"})
    d = render_envelope(site, StringTransport(peerAddress=PEER), env)
    assert not d.called
    api.waiting.pop().callback({"waited": True})
    assert as_pair(d.result) == (status, json.loads(data)) == (200, {"waited": True})


def test_deferred_error(site, api):
    env = Envelope(type="request", id="req-1", data={"method": "GET", "path": "/api/v1/slow"})
    d = render_envelope(site, StringTransport(peerAddress=PEER), env)
    api.waiting.pop().errback(ApiError(409, "conflict"))
    assert as_pair(d.result) == (409, {"error": "conflict"})


def test_envelope_headers_reach_the_request(site, api):
    seen = {}

    def headers(request):
        seen["accept"] = request.getHeader(b"accept")
        seen["carried"] = request.getHeader(CARRIED_BY_HEADER)
        seen["secure"] = request.isSecure()
        seen["content_type"] = request.getHeader(b"content-type")
        return {}

    api.router.route("POST", "/headers", headers)
    env = Envelope(
        type="request",
        id="req-1",
        data={
            "method": "POST",
            "path": "/api/v1/headers",
            "headers": {"Accept": "application/json"},
            "body": {"x": 1},
        },
    )
    render_envelope(site, StringTransport(peerAddress=PEER), env)
    assert seen == {
        "accept": b"application/json",
        "carried": b"websocket",
        "secure": True,
        "content_type": b"application/json",
    }


def test_a_non_json_answer_becomes_text(site):
    class Plain(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return "grüß dich".encode()

    site.resource.putChild(b"plain", Plain())
    response = over_envelope(site, "GET", "/plain")
    assert response.data == {"status": 200, "body": "grüß dich"}
    status, headers, body = HttpExchange(site, "GET", "/plain").response()
    assert (status, body.decode()) == (200, "grüß dich")


def test_a_request_for_the_websocket_resource_does_not_take_over_the_session():
    root = Resource()
    factory = WebSocketServerFactory("wss://127.0.0.1")
    factory.protocol = WebSocketServerProtocol
    factory.setProtocolOptions(openHandshakeTimeout=0)  # no timer on the global reactor
    root.putChild(b"ws", WebSocketResource(factory))
    site = Site(root, reactor=Clock())
    # The session's connection as in the server: a ProtocolWrapper (the TLS-handshake
    # watcher) around the transport, wrapping the live session protocol.
    session_protocol = Protocol()
    connection = ProtocolWrapper(WrappingFactory(site), session_protocol)
    connection.makeConnection(StringTransport(peerAddress=PEER))
    connection.wrappedProtocol = session_protocol
    env = Envelope(type="request", id="req-1", data={"method": "GET", "path": "/ws"})
    d = render_envelope(site, connection, env)
    assert connection.wrappedProtocol is session_protocol
    assert d.called
