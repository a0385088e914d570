"""The node link (tcm.link.v1): how a relay node carries many agent sessions to a server.

A relay node (a task server or an internet gateway) terminates the agents' TLS and WebSocket and
holds one persistent mutual-TLS WebSocket to the management server. Over it, every agent
connection at the node is a numbered *connection* (`c`); the server runs each one's tcm.v1
session exactly as if the agent were connected directly, and the node only moves frames.

Each link message is one binary WebSocket frame: a JSON header, a newline, and an optional
payload (an agent's tcm.v1 frame, byte for byte: it is never re-encoded).

Node -> server:
  {"t": "hello", "name", "role", "url", "max_clients"}   first message of the link
  {"t": "open", "c", "agent", "peer", "tls", "channel"}   an agent connection was accepted
      (+ "gateway", "node" from a gateway to a task server: the gateway, and the server node
      holding the agent's own session, which the task server takes the session on to;
      + "resume": the resumption token the node that ended the agent's TLS sealed for it,
      which the server puts in the session's welcome: tcm.tls.resumption)
  {"t": "frame", "c"} + payload                           a frame from that agent
  {"t": "closed", "c"}                                    the agent connection is gone
  {"t": "request", "r", "agent"} + request envelope       an agent's HTTPS call (gateways)
  {"t": "reach", "task_servers": [...]}                   task servers this gateway links to
Server -> node:
  {"t": "welcome", "keepalive", "server", "role", "node"} answer to hello
  {"t": "frame", "c"} + payload                           a frame for one agent
  {"t": "push", "c": [c1, c2, ...]} + payload             one frame for many: fan-out here
  {"t": "close", "c", "code", "reason"}                   close that agent connection
  {"t": "response", "r"} + response envelope              the answer to request r
  {"t": "revoked", "agents": [...], "full"}               agents the node must refuse
  {"t": "pending", "agents": [...], "approved", "full"}   agents awaiting approval (refused)
  {"t": "nodes", "gateways": {name: fingerprint}}         gateways a task server may accept
      (+ "previous": {name: fingerprint}: the certificate each renewed last, until it expires)
  {"t": "cluster", "nodes": [{"node", "url", "state"}]}   a cluster's server nodes (after the
      welcome, and when they change): the relay node links to each node that is up
Either way:
  {"t": "batch", "n": [len1, len2, ...]} + messages       several link messages, back to back

The same link also joins a gateway to a task server: the task server answers the gateway's
hello like a server (its welcome says `"role": "taskserver"` and names the task server and
its management server) and relays each connection the gateway opens up its own link, so an
agent's task session crosses gateway -> task server -> management server, each hop a link.

Messages written in one reactor turn go out as one `batch` (LinkWriter): when many agents
answer at once, the link carries a few large WebSocket frames instead of one per message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import fastjsonschema

from tcm.protocol.schemas import RESUME

SUBPROTOCOL = "tcm.link.v1"
WS_PATH = "/link/v1/ws"
ENROLL_PATH = "/link/v1/enroll"
RENEW_PATH = "/link/v1/renew"  # a new certificate for a node's new key, with its current one
NODE_PREFIX = "node:"  # the CN of a node's certificate; agent ids never contain ':'

NODE_SENDS = frozenset({"hello", "open", "frame", "closed", "request", "reach", "batch"})
SERVER_SENDS = frozenset(
    {
        "welcome",
        "frame",
        "push",
        "close",
        "response",
        "revoked",
        "pending",
        "nodes",
        "cluster",
        "batch",
    }
)
MAX_BATCH = 256 * 1024  # bytes of messages gathered before a batch goes out anyway
ROLES = frozenset({"taskserver", "gateway"})
CHANNELS = frozenset({"core", "task"})  # an agent's own session, or its task-client session


class LinkError(ValueError):
    """A link message that cannot be taken; the link is closed with the reason."""


def _count(kind: str, field: str) -> dict[str, Any]:
    return {
        "type": "integer",
        "minimum": 0,
        "description": f"link message {kind!r} needs a non-negative integer {field!r}",
    }


def _names(kind: str, field: str, what: str = "agent ids") -> dict[str, Any]:
    return {
        "type": "array",
        "items": {"type": "string"},
        "description": f"link message {kind!r} needs a list of {what} {field!r}",
    }


def _text(kind: str, field: str, null: bool = False) -> dict[str, Any]:
    return {
        "type": ["string", "null"] if null else "string",
        "description": f"link message {kind!r}: {field!r} must be a string"
        + (" or null" if null else ""),
    }


def _header(kind: str, required: tuple[str, ...], **fields: dict[str, Any]) -> dict[str, Any]:
    """The schema of one message type's header. Fields not named here are ignored (a newer
    node or server may send more); each field's `description` is the refusal's reason."""
    return {
        "type": "object",
        "required": ["t", *required],
        "properties": {"t": {"const": kind}, **fields},
    }


# The headers of tcm.link.v1, by message type (docs/protocol.md section 5). JSON Schema,
# compiled with fastjsonschema like the tcm.v1 envelope's (tcm/protocol/schemas.py).
HEADERS: dict[str, dict[str, Any]] = {
    # node -> server (and gateway -> task server)
    "hello": _header(
        "hello",
        ("role", "url"),
        name=_text("hello", "name"),
        role={"enum": sorted(ROLES), "description": f"node role must be one of {sorted(ROLES)}"},
        url={"type": "string", "description": "node hello needs the url agents use to reach it"},
        max_clients=_count("hello", "max_clients"),
        worker=_count("hello", "worker"),
    ),
    "open": _header(
        "open",
        ("c", "agent"),
        c=_count("open", "c"),
        agent={"type": "string", "description": "link message 'open' needs the agent id"},
        peer=_text("open", "peer"),
        tls={"type": "object", "description": "link message 'open': 'tls' must be an object"},
        channel={
            "enum": sorted(CHANNELS),
            "description": f"link message 'open': channel must be one of {sorted(CHANNELS)}",
        },
        gateway=_text("open", "gateway"),
        node=_text("open", "node"),
        resume={
            **RESUME,  # the welcome's `resume`, as tcm.v1 states it
            "description": "link message 'open': 'resume' must be a resumption token "
            "{identity, key, lifetime}",
        },
    ),
    "closed": _header("closed", ("c",), c=_count("closed", "c")),
    "request": _header(
        "request",
        ("r",),
        r=_count("request", "r"),
        agent={
            "type": ["string", "null"],
            "description": "link message 'request': 'agent' must be an agent id or null",
        },
        peer=_text("request", "peer"),
    ),
    "reach": _header(
        "reach",
        ("task_servers",),
        task_servers=_names("reach", "task_servers", "task server names"),
    ),
    # server -> node (and task server -> gateway)
    "welcome": _header(
        "welcome",
        (),
        keepalive={
            "type": "number",
            "minimum": 0,
            "description": "link message 'welcome': 'keepalive' must be a number of seconds",
        },
        server=_text("welcome", "server", null=True),
        role={
            "enum": ["server", "taskserver"],
            "description": "link message 'welcome': role must be 'server' or 'taskserver'",
        },
        node=_text("welcome", "node", null=True),
    ),
    "push": _header(
        "push",
        ("c",),
        c={
            "type": "array",
            # no minimum: a push may name thousands; a number not in use is skipped anyway
            "items": {"type": "integer"},
            "description": "link message 'push' needs a list of connection numbers 'c'",
        },
    ),
    "close": _header(
        "close",
        ("c", "code"),
        c=_count("close", "c"),
        code={
            # what a WebSocket close may carry: 1000, or an application's 3000-4999
            "anyOf": [{"const": 1000}, {"type": "integer", "minimum": 3000, "maximum": 4999}],
            "description": "link message 'close' needs a close code 'code' (1000, 3000-4999)",
        },
        reason=_text("close", "reason"),
    ),
    "response": _header("response", ("r",), r=_count("response", "r")),
    "revoked": _header(
        "revoked",
        ("agents",),
        agents=_names("revoked", "agents"),
        full={"type": "boolean", "description": "link message 'revoked': 'full' is true or false"},
    ),
    "pending": _header(
        "pending",
        ("agents",),
        agents=_names("pending", "agents"),
        approved=_names("pending", "approved"),
        full={"type": "boolean", "description": "link message 'pending': 'full' is true or false"},
    ),
    "nodes": _header(
        "nodes",
        ("gateways",),
        gateways={
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "link message 'nodes' needs gateways as {name: fingerprint}",
        },
        previous={
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "link message 'nodes': 'previous' is {name: fingerprint}",
        },
    ),
    "cluster": _header(
        "cluster",
        ("nodes",),
        nodes={
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node", "url"],
                "properties": {
                    "node": {"type": "string"},
                    "url": {"type": "string", "pattern": "^https://"},
                    "state": {"enum": ["up", "down"]},
                },
            },
            "description": "link message 'cluster' needs nodes as [{node, url (https://...), "
            "state (up or down)}]",
        },
    ),
    # either way
    "frame": _header("frame", ("c",), c=_count("frame", "c")),
    "batch": _header(
        "batch",
        ("n",),
        n={
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "description": "link message 'batch' needs sizes 'n' that add up to its payload",
        },
    ),
}
assert set(HEADERS) == NODE_SENDS | SERVER_SENDS

_VALIDATORS = {kind: fastjsonschema.compile(schema) for kind, schema in HEADERS.items()}


def _reason(kind: str, e: fastjsonschema.JsonSchemaValueException, header: dict) -> str:
    """The refusal's reason: the description of the field that failed."""
    schema = HEADERS[kind]
    path = e.path or []
    if len(path) >= 2 and isinstance(path[1], str):
        field: str | None = path[1]
    else:  # a required field is missing
        field = next((f for f in schema["required"] if f not in header), None)
    described = schema["properties"].get(field, {}).get("description")
    return described or f"link message {kind!r}: {e.message}"


# Most link messages are an agent's frame: their header is written and read without the
# JSON codec and the schema (the same bytes, the same checks: `_frame_header`), ten times
# cheaper per message where every result of every agent behind a node passes (issue 17).
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_FRAME_HEAD = b'{"t":"frame","c":'
_FRAME_AT = len(_FRAME_HEAD)
_MAX_DIGITS = 18  # what a connection number needs and JSON's int never exceeds here


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    if len(header) == 2 and header.get("t") == "frame":
        c = header.get("c")
        if type(c) is int and c >= 0:
            return b'{"t":"frame","c":%d}\n' % c + payload
    return _ENCODER.encode(header).encode() + b"\n" + payload


def _frame_header(message: bytes) -> tuple[dict[str, Any], bytes] | None:
    """A `frame` message written as `encode` writes it, split without the JSON codec: its
    header exactly `{"t":"frame","c":N}` (N a JSON non-negative integer). None for anything
    else, which the general path then reads (and refuses, if it must)."""
    end = message.find(b"}\n", _FRAME_AT, _FRAME_AT + _MAX_DIGITS + 1)
    if end < 0:
        return None
    digits = message[_FRAME_AT:end]
    if not digits.isdigit() or (digits[0] == 48 and len(digits) > 1):  # no leading zero
        return None
    return {"t": "frame", "c": int(digits)}, message[end + 2 :]


def decode(message: bytes, allowed: frozenset[str]) -> tuple[dict[str, Any], bytes]:
    """Split and check one link message against its type's schema; LinkError says what is
    wrong."""
    if message.startswith(_FRAME_HEAD) and "frame" in allowed:
        split = _frame_header(message)
        if split is not None:
            return split
    head, sep, payload = message.partition(b"\n")
    if not sep:
        raise LinkError("link message without a header line")
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise LinkError(f"link header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise LinkError("link header must be a JSON object")
    kind = header.get("t")
    if not isinstance(kind, str) or kind not in allowed:
        raise LinkError(f"unexpected link message type {kind!r}")
    try:
        _VALIDATORS[kind](header)
    except fastjsonschema.JsonSchemaValueException as e:
        raise LinkError(_reason(kind, e, header)) from None
    if kind == "batch" and sum(header["n"]) != len(payload):
        raise LinkError(HEADERS["batch"]["properties"]["n"]["description"])
    return header, payload


def unbatch(header: dict[str, Any], payload: bytes, allowed: frozenset[str]):
    """The messages of a decoded link message: itself, or a batch's parts (no nested batch)."""
    if header["t"] != "batch":
        return [(header, payload)]
    parts, at = [], 0
    inner = allowed - {"batch"}
    for size in header["n"]:
        parts.append(decode(payload[at : at + size], inner))
        at += size
    return parts


def dispatch(end: Any, header: dict[str, Any], payload: bytes) -> None:
    """Hand one checked link message to its handler at `end`, found by type in the end's
    table `end._HANDLERS` (type -> method name), as `AgentSession` does for envelopes. A type
    the end does not take is a LinkError: with the reason `end._REFUSED` gives for it, if any.
    """
    kind = header["t"]
    handlers: Mapping[str, str] = end._HANDLERS
    name = handlers.get(kind)
    if name is None:
        refused: Mapping[str, str] = getattr(end, "_REFUSED", {})
        raise LinkError(refused.get(kind) or f"unexpected link message type {kind!r} here")
    getattr(end, name)(header, payload)


def receive(end: Any, message: bytes) -> None:
    """Hand one message from a node (a batch: each of its parts) to the accepting end of
    the link (`dispatch`); hello comes first. LinkError says what is wrong; the caller closes
    the link with it."""
    outer, body = decode(message, NODE_SENDS)
    for header, payload in unbatch(outer, body, NODE_SENDS):
        if not end.ready and header["t"] != "hello":
            raise LinkError("the first link message must be hello")
        dispatch(end, header, payload)


class LinkWriter:
    """Sends link messages; those written in one reactor turn leave together as one batch."""

    def __init__(self, send: Any, clock: Any, max_batch: int = MAX_BATCH):
        self._send = send
        self._clock = clock
        self._max = max_batch
        self._pending: list[bytes] = []
        self._size = 0
        self._call: Any = None
        self.messages = 0
        self.frames = 0

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        message = encode(header, payload)
        self._pending.append(message)
        self._size += len(message)
        self.messages += 1
        if self._size >= self._max:
            self.flush()
        elif self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        pending, self._pending, self._size = self._pending, [], 0
        if not pending:
            return
        self.frames += 1
        if len(pending) == 1:
            self._send(pending[0])
        else:
            self._send(encode({"t": "batch", "n": [len(m) for m in pending]}, b"".join(pending)))

    def discard(self) -> None:
        """The link is gone: drop what was not sent."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        self._pending, self._size = [], 0
