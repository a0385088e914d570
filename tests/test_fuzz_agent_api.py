"""Fuzzing the agent API and the node link against a real in-process server (issue 16.9).

Arbitrary bodies on every /agent/v1 route, over HTTPS and over a session's request
envelopes, arbitrary frames on an agent session and on a live node link: each gets a 4xx
or a protocol error (an `error` envelope, a 4002/1007/1009 close of that connection only),
never a 500 or an `internal` error, and a bystander agent's session lives on throughout.

Hypothesis runs in a thread and calls the reactor with blockingCallFromThread; example
counts are bounded so the suite stays fast.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

import pytest_twisted
from autobahn.exception import Disconnected
from autobahn.twisted.websocket import WebSocketClientFactory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.logger import formatEvent, globalLogPublisher

from tcm.protocol import codes, link
from tcm.server.apischema import OPERATIONS
from tcm.tls import pki
from tests.inproc import HOST, TIMEOUT, WsClient, start_server, within

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)

JSON: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.text(st.characters(exclude_categories=()), max_size=5),  # lone surrogates too
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)

AGENT_ROUTES = sorted(
    (method, pattern) for method, pattern in OPERATIONS if pattern.startswith("/agent/v1/")
)


def _fields(method: str, pattern: str) -> list[str]:
    body = OPERATIONS[(method, pattern)].body or {}
    return sorted(body.get("properties", {})) or ["x"]


@st.composite
def agent_calls(draw) -> tuple[str, str, Any]:
    """(method, path, body): a declared agent route, any path parameters, a body of any
    JSON or (more often) an object of the route's own fields with any values."""
    method, pattern = draw(st.sampled_from(AGENT_ROUTES))
    path = pattern
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        value = draw(st.text(min_size=1, max_size=20) | st.just("0123456789abcdef"))
        path = path[:start] + quote(value, safe="") + path[end + 1 :]
    fields = st.sampled_from(_fields(method, pattern)) | st.text(max_size=8)
    body = draw(st.dictionaries(fields, JSON, max_size=5) | JSON)
    return method, path, body


class ServerFailures:
    """The failures (tracebacks) the server logs while fuzzed: there must be none."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is None:
            return
        # the server's own, not a timer another test's in-memory fake left on the reactor
        trace = failure.getTraceback()
        ours = str(event.get("log_namespace", "")).startswith("tcm") or "/tcm/" in trace
        if ours and "internet/testing.py" not in trace:
            self.events.append(event)

    def __enter__(self) -> ServerFailures:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)

    def check(self) -> None:
        assert not self.events, [
            (formatEvent(e), e["log_failure"].getTraceback()) for e in self.events[:3]
        ]


def _no_server_error(where: str, status: int, body: Any) -> None:
    assert status < 500, f"{where}: {status} {body!r}"


async def _bystander(server):
    """An agent with an open session that must live through all of it."""
    client, _welcome, identity = await server.session()
    return client, identity


async def _still_serving(server, bystander) -> None:
    assert bystander.close_info is None, bystander.close_info
    reply = await bystander.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200, reply
    await server.check_serving()


@pytest_twisted.ensureDeferred
async def test_agent_api_bodies_over_https_and_over_a_session(tmp_path):
    server = await start_server(str(tmp_path / "server"))
    try:
        bystander, _ = await _bystander(server)
        client, _welcome, identity = await server.session()

        def call(fn, *args):
            return threads.blockingCallFromThread(reactor, fn, *args)

        @FUZZ
        @given(agent_calls(), st.binary(max_size=300) | st.none())
        def over_https(call_, raw):
            method, path, body = call_
            if raw is not None and method == "POST":
                reply = call(server.agent_https, method, path, None, identity, raw)
            else:
                reply = call(server.agent_https, method, path, body, identity)
            _no_server_error(f"HTTPS {method} {path}", reply.status, reply.body)

        @FUZZ
        @given(agent_calls())
        def over_the_session(call_):
            method, path, body = call_
            reply = call(client.request, method, path, body)
            if reply["type"] == "error":
                assert reply["data"]["code"] != codes.ERR_INTERNAL, reply
            else:
                assert reply["type"] == "response", reply
                _no_server_error(f"session {method} {path}", reply["data"]["status"], reply)

        with ServerFailures() as failures:
            await threads.deferToThread(over_https)
            await threads.deferToThread(over_the_session)
        failures.check()
        assert client.close_info is None, client.close_info
        await _still_serving(server, bystander)
    finally:
        await server.stop()


# -- arbitrary frames on an agent session ------------------------------------------------

TYPES = ["hello", "request", "response", "error", "result", "ping", "welcome", "bogus"]
ENVELOPES = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=12) | JSON,
        "type": st.sampled_from(TYPES) | JSON,
        "data": st.dictionaries(
            st.sampled_from(["method", "path", "body", "headers", "code", "message"])
            | st.text(max_size=6),
            JSON,
            max_size=4,
        )
        | JSON,
        "expires": JSON,
        "in_reply_to": JSON,
    },
)
FRAMES = (
    ENVELOPES.map(lambda e: ("text", json.dumps(e).encode()))
    | JSON.map(lambda v: ("text", json.dumps(v).encode()))
    | st.binary(max_size=200).map(lambda b: ("text", b))
    | st.binary(max_size=50).map(lambda b: ("binary", b))
)
PROTOCOL_CLOSES = {codes.CLOSE_PROTOCOL_ERROR, codes.CLOSE_TOO_BIG, 1007}


@pytest_twisted.ensureDeferred
async def test_arbitrary_frames_on_a_session_harm_no_other_agent(tmp_path):
    server = await start_server(str(tmp_path / "server"))
    try:
        bystander, _ = await _bystander(server)
        identity = await server.enroll_identity()
        session = {"client": (await server.session(identity))[0]}

        def call(fn, *args):
            return threads.blockingCallFromThread(reactor, fn, *args)

        def reopen_if_closed(client) -> None:
            """A session the server closed: by the protocol's rules only; open another."""
            if client.close_info is None and client.state == client.STATE_OPEN:
                return
            call(client.wait_closed)
            _was_clean, code, _reason = client.close_info
            assert code in PROTOCOL_CLOSES, client.close_info
            session["client"] = call(server.session, identity)[0]

        @FUZZ
        @given(FRAMES)
        def frames(frame):
            kind, payload = frame
            reopen_if_closed(session["client"])
            client = session["client"]
            call(client.send_raw, payload, kind == "binary")
            probe = os.urandom(6).hex()
            try:
                reply = call(client.request, "GET", "/agent/v1/whoami", None, probe)
            except (AssertionError, Disconnected):  # closed before the answer
                reopen_if_closed(client)
                return
            assert reply["data"]["status"] == 200, reply
            for m in client.messages:
                if m.get("type") == "error":
                    assert m["data"]["code"] != codes.ERR_INTERNAL, m
                if m.get("type") == "response":
                    _no_server_error("session", m["data"]["status"], m)
            client.messages.clear()

        with ServerFailures() as failures:
            await threads.deferToThread(frames)
        failures.check()
        await _still_serving(server, bystander)
    finally:
        await server.stop()


# -- arbitrary frames on a live node link --------------------------------------------------


async def _gateway_identity(server, name: str = "gw1") -> tuple[bytes, bytes]:
    reply = await server.admin("POST", "/api/v1/gateways", {"name": name})
    assert reply.status == 201, reply
    key = pki.generate_key()
    csr = pki.make_csr(key, common_name=f"node:{name}").decode()
    secret = reply.body["token"].split(".", 1)[1]
    enrolled = await server.https(
        "POST", "/link/v1/enroll", {"name": name, "token": secret, "csr": csr}
    )
    assert enrolled.status == 201, enrolled
    return enrolled.body["certificate"].encode(), pki.key_to_pem(key)


async def _link(server, cert: tuple[bytes, bytes]) -> WsClient:
    """A node link to the server, said hello on."""
    creator = pki.client_tls_options(HOST, server.ca_pem, cert[0], cert[1])
    endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, HOST, server.port))
    factory = WebSocketClientFactory(
        f"wss://{HOST}:{server.port}/link/v1/ws", protocols=[link.SUBPROTOCOL]
    )
    factory.protocol = WsClient
    factory.setProtocolOptions(failByDrop=False, openHandshakeTimeout=TIMEOUT, autoPingInterval=0)
    client = await within(endpoint.connect(factory))
    await within(client.settled)
    assert client.opened_ok, client.close_info
    hello = {"t": "hello", "name": "gw1", "role": "gateway", "url": "wss://gw1.example:8443"}
    client.send_raw(link.encode(hello), binary=True)
    return client


LINK_TYPES = sorted(link.HEADERS) + ["bogus"]


def _carried(r: int, call_: tuple[str, str, Any]) -> bytes:
    """An agent API call as a gateway carries it on its link."""
    method, path, body = call_
    data = {"method": method, "path": path, "body": body}
    envelope = {"id": f"r{r}", "type": "request", "data": data}
    return link.encode({"t": "request", "r": r, "agent": "a-0000"}, json.dumps(envelope).encode())


LINK_FRAMES = (
    st.builds(
        lambda t, fields, payload: link.encode({"t": t, **fields}, payload),
        st.sampled_from(LINK_TYPES),
        st.dictionaries(
            st.sampled_from(["c", "agent", "agents", "code", "reason", "n", "channel", "r"]),
            JSON,
            max_size=4,
        ),
        st.binary(max_size=20),
    )
    | st.binary(max_size=200)
    | JSON.map(lambda v: json.dumps(v).encode() + b"\n")
    | st.builds(_carried, st.integers(10**6, 2 * 10**6), agent_calls())
)


def _parts(message: Any) -> list[tuple[dict[str, Any], bytes]]:
    """The link messages in one frame from the server: itself, or a batch's parts (the
    server batches what is ready in one reactor turn: a probe's answer may be one of them)."""
    if not isinstance(message, bytes):
        return []
    try:
        header, payload = link.decode(message, link.SERVER_SENDS)
        return list(link.unbatch(header, payload, link.SERVER_SENDS))
    except link.LinkError:
        return []


@pytest_twisted.ensureDeferred
async def test_arbitrary_frames_on_a_live_node_link_harm_no_agent(tmp_path):
    server = await start_server(str(tmp_path / "server"))
    try:
        bystander, _ = await _bystander(server)
        cert = await _gateway_identity(server)
        state = {"link": await _link(server, cert), "r": 0}

        def call(fn, *args):
            return threads.blockingCallFromThread(reactor, fn, *args)

        def reopen_if_closed(node) -> None:
            """A link the server closed: by the protocol's rules only; open another."""
            if node.close_info is None and node.state == node.STATE_OPEN:
                return
            call(node.wait_closed)
            _was_clean, code, _reason = node.close_info
            assert code in PROTOCOL_CLOSES, node.close_info
            state["link"] = call(_link_d, server, cert)

        @FUZZ
        @given(LINK_FRAMES, st.booleans())
        def frames(payload, binary):
            reopen_if_closed(state["link"])
            node = state["link"]
            call(node.send_raw, payload, binary)
            # a carried whoami as a probe: answered, the link took the frame; else closed
            state["r"] += 1
            r = state["r"]
            probe = _carried(r, ("GET", "/agent/v1/whoami", None))
            try:
                call(node.send_raw, probe, True)
                # its answer may come in a batch with the fuzzed frame's; generous on time: a
                # loaded machine answers late
                probed = call(
                    node.wait_message,
                    lambda m: any(h.get("r") == r for h, _ in _parts(m)),
                    12 * TIMEOUT,
                )
            except (AssertionError, Disconnected):
                reopen_if_closed(node)
                return
            for m in [probed, *node.messages]:
                for header, body in _parts(m):
                    if header.get("t") == "response":
                        answer = json.loads(body)
                        _no_server_error("carried request", answer["data"]["status"], answer)
            node.messages.clear()
            # the bystander agent is served throughout
            reply = call(bystander.request, "GET", "/agent/v1/whoami")
            assert reply["data"]["status"] == 200, reply

        with ServerFailures() as failures:
            await threads.deferToThread(frames)
        failures.check()
        await _still_serving(server, bystander)
    finally:
        await server.stop()


def _link_d(server, cert):
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(_link(server, cert))
