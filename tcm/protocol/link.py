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
from typing import Any

SUBPROTOCOL = "tcm.link.v1"
WS_PATH = "/link/v1/ws"
ENROLL_PATH = "/link/v1/enroll"
NODE_PREFIX = "node:"  # the CN of a node's certificate; agent ids never contain ':'

NODE_SENDS = frozenset({"hello", "open", "frame", "closed", "request", "reach", "batch"})
SERVER_SENDS = frozenset(
    {"welcome", "frame", "push", "close", "response", "revoked", "pending", "nodes", "batch"}
)
MAX_BATCH = 256 * 1024  # bytes of messages gathered before a batch goes out anyway
ROLES = frozenset({"taskserver", "gateway"})
CHANNELS = frozenset({"core", "task"})  # an agent's own session, or its task-client session

_INT_FIELDS = {
    "open": ("c",),
    "frame": ("c",),
    "closed": ("c",),
    "close": ("c", "code"),
    "request": ("r",),
    "response": ("r",),
}


class LinkError(ValueError):
    """A link message that cannot be taken; the link is closed with the reason."""


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def decode(message: bytes, allowed: frozenset[str]) -> tuple[dict[str, Any], bytes]:
    """Split and check one link message; LinkError says what is wrong."""
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
    if kind not in allowed:
        raise LinkError(f"unexpected link message type {kind!r}")
    for field in _INT_FIELDS.get(kind, ()):
        value = header.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise LinkError(f"link message {kind!r} needs a non-negative integer {field!r}")
    if kind == "push":
        conns = header.get("c")
        if not isinstance(conns, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in conns
        ):
            raise LinkError("link message 'push' needs a list of connection numbers 'c'")
    if kind == "batch":
        sizes = header.get("n")
        if (
            not isinstance(sizes, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes)
            or sum(sizes) != len(payload)
        ):
            raise LinkError("link message 'batch' needs sizes 'n' that add up to its payload")
    if kind == "open":
        if not isinstance(header.get("agent"), str):
            raise LinkError("link message 'open' needs the agent id")
        if header.get("channel", "task") not in CHANNELS:
            raise LinkError(f"link message 'open': channel must be one of {sorted(CHANNELS)}")
    if kind == "request" and not isinstance(header.get("agent"), (str, type(None))):
        raise LinkError("link message 'request': 'agent' must be an agent id or null")
    if kind in ("revoked", "pending"):
        for field in ("agents", "approved") if kind == "pending" else ("agents",):
            agents = header.get(field, [])
            if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
                raise LinkError(f"link message {kind!r} needs a list of agent ids {field!r}")
    if kind == "reach":
        names = header.get("task_servers")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LinkError("link message 'reach' needs a list of task server names")
    if kind == "nodes":
        gateways = header.get("gateways")
        if not isinstance(gateways, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in gateways.items()
        ):
            raise LinkError("link message 'nodes' needs gateways as {name: fingerprint}")
    if kind == "hello":
        if header.get("role") not in ROLES:
            raise LinkError(f"node role must be one of {sorted(ROLES)}")
        if not isinstance(header.get("url"), str):
            raise LinkError("node hello needs the url agents use to reach it")
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


def receive(end: Any, message: bytes) -> None:
    """Hand one message from a node (a batch: each of its parts) to the accepting end of
    the link, `end._on_TYPE(header, payload)`; hello comes first. LinkError says what is
    wrong; the caller closes the link with it."""
    outer, body = decode(message, NODE_SENDS)
    for header, payload in unbatch(outer, body, NODE_SENDS):
        if not end.ready and header["t"] != "hello":
            raise LinkError("the first link message must be hello")
        getattr(end, "_on_" + header["t"])(header, payload)


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
