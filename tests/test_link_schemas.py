"""The node link's messages are declared (tcm.protocol.link.HEADERS) and every end that
receives them dispatches by a table: a malformed or unknown message closes the link with
4002 and a reason, never a traceback. The three receiving ends: the server's NodeLink, a task
server's DownLink (a gateway's link), a node's UpstreamProtocol (its link to a server)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from tcm.protocol import codes, link
from tcm.relay.downstream import DownLink
from tcm.relay.relays import GatewayRelay, TaskServerRelay
from tcm.relay.upstream import UpstreamFactory, UpstreamProtocol
from tcm.server.links import NodeLink
from tests.test_relay_units import Hub

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text("utf-8")
SECTION = DOC[DOC.index("**The node link (`tcm.link.v1`).**") : DOC.index("**Gateways.**")]


def test_every_message_type_has_a_schema_and_a_row_in_the_doc():
    assert set(link.HEADERS) == link.NODE_SENDS | link.SERVER_SENDS
    documented = set(re.findall(r'^\| `\{"t":"([a-z]+)"', SECTION, re.MULTILINE))
    assert documented == set(link.HEADERS)


def test_the_doc_examples_that_are_whole_headers_are_valid():
    checked = 0
    for row in re.findall(r"^\| `(\{.*?\})` \|", SECTION, re.MULTILINE):
        try:
            header = __import__("json").loads(row)
        except ValueError:
            continue  # a row that lists field names only
        payload = b"x" * sum(header.get("n", []))
        allowed = link.NODE_SENDS | link.SERVER_SENDS
        assert link.decode(link.encode(header, payload), allowed)[0] == header
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize(
    ("message", "allowed", "why"),
    [
        (b'{"t":"revoked"}\n', link.SERVER_SENDS, "list of agent ids 'agents'"),
        (b'{"t":"close","c":1,"code":5}\n', link.SERVER_SENDS, "close code"),
        (b'{"t":"close","c":1,"code":4000,"reason":7}\n', link.SERVER_SENDS, "'reason'"),
        (b'{"t":"welcome","role":"boss"}\n', link.SERVER_SENDS, "role must be"),
        (b'{"t":"open","c":1,"agent":"a","tls":"x"}\n', link.NODE_SENDS, "'tls'"),
        (b'{"t":"open","c":1,"agent":"a","resume":"x"}\n', link.NODE_SENDS, "resumption token"),
        (b'{"t":"open","c":1,"agent":"a","resume":{}}\n', link.NODE_SENDS, "resumption token"),
        (
            b'{"t":"open","c":1,"agent":"a","resume":{"identity":"i","key":"k","lifetime":0}}\n',
            link.NODE_SENDS,
            "resumption token",
        ),
        (b'{"t":"hello","role":"gateway","url":"u","worker":true}\n', link.NODE_SENDS, "worker"),
        (b'{"t":7}\n', link.NODE_SENDS, "unexpected link message type 7"),
    ],
)
def test_schemas_refuse_with_the_field_that_is_wrong(message, allowed, why):
    with pytest.raises(link.LinkError, match=re.escape(why)):
        link.decode(message, allowed)


def test_unknown_fields_are_ignored():
    header = {"t": "frame", "c": 1, "later": {"a": 1}}
    assert link.decode(link.encode(header), link.NODE_SENDS)[0] == header


# -- every receiving end, with anything a peer may send ----------------------------------------

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5000) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = ["c", "r", "agent", "agents", "approved", "code", "reason", "full", "gateways"]
_FIELDS += ["task_servers", "role", "url", "server", "node", "worker", "tls", "channel", "n"]
_FIELDS += ["resume"]
_HEADERS = st.builds(
    lambda t, fields: {"t": t, **fields},
    st.sampled_from(sorted(link.HEADERS) + ["bogus"]) | st.text(max_size=5),
    st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=4),
)


class Closes:
    def __init__(self) -> None:
        self.closes: list[tuple[int, str]] = []

    def __call__(self, code: int, reason: str = "") -> None:
        assert isinstance(reason, str)
        self.closes.append((code, reason))


def _node_link(role: str = "gateway") -> tuple[NodeLink, Closes]:
    closes = Closes()
    node = NodeLink("n1", lambda data: None, closes, Hub(), Clock(), max_batch=0)
    node.message_received(link.encode({"t": "hello", "name": "n1", "role": role, "url": "u"}))
    return node, closes


def _down_link() -> tuple[DownLink, Closes]:
    closes = Closes()
    relay = TaskServerRelay(Clock(), 5)
    relay.link_up("server", type("Up", (), {"send": lambda self, h, p=b"": None})(), "s1")
    down = DownLink("gw1", "FP", relay, lambda data: None, closes, Clock(), max_batch=0)
    down.message_received(link.encode({"t": "hello", "name": "gw1", "role": "gateway", "url": "u"}))
    return down, closes


def _upstream(relay: Any) -> tuple[UpstreamProtocol, Closes]:
    closes = Closes()
    proto = UpstreamProtocol()
    proto.factory = UpstreamFactory(relay, "https://server:1", "gw1", "gateway", "wss://gw")
    proto.sendClose = closes  # type: ignore[method-assign]
    proto.sendMessage = lambda data, isBinary=False: None  # type: ignore[method-assign]
    proto.connectionMade = lambda: None  # type: ignore[method-assign]
    from twisted.internet.defer import Deferred

    proto.welcomed = Deferred()
    proto.onMessage(link.encode({"t": "welcome", "keepalive": 25, "server": "s1"}), True)
    return proto, closes


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(_HEADERS, st.binary(max_size=20))
def test_any_message_to_any_end_is_taken_or_closes_the_link(header, payload):
    try:
        message = link.encode(header, payload)
    except (TypeError, ValueError):
        return  # not JSON at all: covered by the codec's own property test
    ends = [_node_link("gateway"), _node_link("taskserver"), _down_link()]
    for end, closes in ends:
        end.message_received(message)  # never raises
        assert all(code == codes.CLOSE_PROTOCOL_ERROR for code, _ in closes.closes)
    for relay in (GatewayRelay(Clock(), 5, ["server"]), TaskServerRelay(Clock(), 5)):
        proto, closes = _upstream(relay)
        proto.onMessage(message, True)  # never raises
        assert all(code == codes.CLOSE_PROTOCOL_ERROR for code, _ in closes.closes)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=300) | _VALUES.map(lambda v: __import__("json").dumps(v).encode()))
def test_any_bytes_to_any_end_are_taken_or_close_the_link(message):
    """Not only headers of the right shape: any bytes, any JSON (issue 16.9)."""
    for end, closes in [_node_link("gateway"), _node_link("taskserver"), _down_link()]:
        end.message_received(message)  # never raises
        assert all(code == codes.CLOSE_PROTOCOL_ERROR for code, _ in closes.closes)
    for relay in (GatewayRelay(Clock(), 5, ["server"]), TaskServerRelay(Clock(), 5)):
        proto, closes = _upstream(relay)
        proto.onMessage(message, True)  # never raises
        assert all(code == codes.CLOSE_PROTOCOL_ERROR for code, _ in closes.closes)


def test_each_end_closes_on_a_type_it_does_not_take_with_the_reason():
    node, closes = _node_link("gateway")
    node.message_received(link.encode({"t": "hello", "role": "gateway", "url": "u"}))
    assert closes.closes == [(codes.CLOSE_PROTOCOL_ERROR, "hello already received")]
    down, closes = _down_link()
    down.message_received(link.encode({"t": "reach", "task_servers": []}))
    assert closes.closes == [(codes.CLOSE_PROTOCOL_ERROR, "reach is for management servers")]
    proto, closes = _upstream(TaskServerRelay(Clock(), 5))
    proto.onMessage(link.encode({"t": "pending", "agents": ["a-1"]}), True)
    assert closes.closes == [
        (codes.CLOSE_PROTOCOL_ERROR, "a task server does not take link message 'pending'")
    ]
    proto, closes = _upstream(GatewayRelay(Clock(), 5, ["server"]))
    proto.onMessage(link.encode({"t": "nodes", "gateways": {}}), True)
    assert closes.closes == [
        (codes.CLOSE_PROTOCOL_ERROR, "a gateway does not take link message 'nodes'")
    ]
    assert proto.up  # the welcome was taken; the close came from the relay's table


# -- the frame header's short path (issue 17) ---------------------------------------------


def _general(message: bytes, allowed: frozenset[str]) -> tuple[dict[str, Any], bytes]:
    """What decode answers through the JSON codec and the schema alone."""
    head, _, payload = message.partition(b"\n")
    header = __import__("json").loads(head)
    link._VALIDATORS[header["t"]](header)
    return header, payload


@given(st.integers(0, 10**17), st.binary(max_size=40))
def test_frame_headers_are_written_and_read_as_the_codec_would(c, payload):
    header = {"t": "frame", "c": c}
    message = link.encode(header, payload)
    assert message == __import__("json").dumps(header, separators=(",", ":")).encode() + (
        b"\n" + payload
    )
    assert link.decode(message, link.NODE_SENDS) == (header, payload)
    assert link.decode(message, link.NODE_SENDS) == _general(message, link.NODE_SENDS)


@pytest.mark.parametrize(
    "head, expected",
    [
        (b'{"t":"frame","c":7,"x":1}', {"t": "frame", "c": 7, "x": 1}),  # more fields: read
        (b'{"t":"frame","c":7 }', {"t": "frame", "c": 7}),
        (b'{"t":"frame","c":0}', {"t": "frame", "c": 0}),
        (b'{"t":"frame","c":' + b"1" * 30 + b"}", {"t": "frame", "c": int("1" * 30)}),
    ],
)
def test_frame_headers_written_otherwise_take_the_general_path(head, expected):
    assert link.decode(head + b"\npay", link.NODE_SENDS) == (expected, b"pay")


@pytest.mark.parametrize(
    "message, why",
    [
        (b'{"t":"frame","c":07}\n', "not JSON"),
        (b'{"t":"frame","c":-1}\n', "non-negative integer 'c'"),
        (b'{"t":"frame","c":1.5}\n', "non-negative integer 'c'"),
        (b'{"t":"frame","c":}\n', "not JSON"),
        (b'{"t":"frame","c":1}', "without a header line"),
        (b'{"t":"frame","c":1}x\n', "not JSON"),
    ],
)
def test_bad_frame_headers_are_refused_as_before(message, why):
    with pytest.raises(link.LinkError, match=why):
        link.decode(message, link.NODE_SENDS)


def test_a_frame_where_frames_are_not_taken_is_refused():
    with pytest.raises(link.LinkError, match="unexpected link message type 'frame'"):
        link.decode(link.encode({"t": "frame", "c": 1}, b"x"), frozenset({"hello"}))
