"""The agents' side of a relay node: accept agent sessions and move their frames.

The node runs no session logic of its own: it checks the agent's client certificate (the
TLS layer verified it against the tcm CA), numbers the connection, and from then on passes
frames between the agent and the server's session for it over the node link. A `push` from
the server (one frame, many connections) is framed once here and sent to each connection.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tcm import pki
from tcm.protocol import codes
from tcm.wsbase import LeanWebSocketMixin, bind_options

UPSTREAM_PREFIX = "/upstream/"  # /upstream/NAME/...: the agent names its server's upstream


class RequestLost(Exception):
    """The link carrying an agent's HTTPS call went down before the answer came."""


class Relay:
    """The node's table of agent connections, between the edge and its upstream links.

    A task server has one upstream (its management server); a gateway has several, one per
    `--upstream NAME=URL`, and routes each agent to the upstream of the server named in its
    certificate. Connection numbers are unique across upstreams.
    """

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        max_clients: int,
        channel: str = "task",
        upstream_names: tuple[str, ...] | list[str] = ("server",),
    ):
        self.clock = clock
        self.max_clients = max_clients
        self.channel = channel
        self.names = list(upstream_names)  # configured upstreams, the first is the default
        self.upstreams: dict[str, Any] = {}  # upstream name -> its link, once welcomed
        self.servers: dict[str, str] = {}  # server name (from its welcome) -> upstream name
        self.revoked: dict[str, set[str]] = {}  # upstream name -> agents it revoked
        self.pending: dict[str, set[str]] = {}  # upstream name -> agents awaiting approval
        self.conns: dict[int, Any] = {}  # connection number -> edge protocol
        self._next = 0
        self.prepare: Any = None  # the edge factory's prepareMessage
        self.draining = False
        self.accepted = 0
        self.refused: dict[str, int] = {}
        # traffic counters (read by the metrics collector at scrape time)
        self.frames_in = 0  # agent -> server
        self.frames_out = 0  # server -> agents, each fanned-out copy counted
        self.bytes_in = 0
        self.bytes_out = 0
        self.pushes = 0
        self.fanout: Any = None  # called with each push's number of connections
        self._requests: dict[int, tuple[str, Deferred]] = {}
        self._next_request = 0

    # -- upstream links ------------------------------------------------------------------
    @property
    def upstream(self) -> Any:
        """The default upstream's link (a task server's only one), or None."""
        return self.upstreams.get(self.names[0])

    @upstream.setter
    def upstream(self, link: Any) -> None:
        if link is None:
            self.upstreams.pop(self.names[0], None)
        else:
            self.upstreams[self.names[0]] = link

    def link_up(self, name: str, link: Any, server: str | None = None) -> str | None:
        """An upstream link was welcomed; why it cannot be used, or None."""
        if server is not None:
            other = self.servers.get(server)
            if other is not None and other != name and other in self.upstreams:
                return f"upstreams {other!r} and {name!r} both lead to server {server!r}"
            self.servers[server] = name
        self.upstreams[name] = link
        return None

    def link_lost(self, name: str, link: Any = None) -> None:
        """No link: that server has forgotten these sessions; the agents must come again."""
        if link is not None and self.upstreams.get(name) is not link:
            return
        self.upstreams.pop(name, None)
        lost = [c for c, p in self.conns.items() if _upstream_of(p, self.names) == name]
        if lost:
            self._log.warn(
                "link {name} lost: closing {n} agent connections", name=name, n=len(lost)
            )
        for conn in lost:
            proto = self.conns.pop(conn)
            proto.relay_conn = None
            proto.sendClose(
                codes.CLOSE_UPSTREAM_LOST, codes.CLOSE_REASONS[codes.CLOSE_UPSTREAM_LOST]
            )
        for r, (upstream, d) in list(self._requests.items()):
            if upstream == name:
                del self._requests[r]
                d.errback(RequestLost(f"the link to {name} went down"))

    def upstream_lost(self) -> None:
        self.link_lost(self.names[0])

    # -- edge side -----------------------------------------------------------------------
    def route(self, server: str | None, wanted: str | None = None) -> tuple[str | None, Any]:
        """Which upstream an agent goes to: (name, None), or (None, (status, reason)).

        `server` is the server named in the agent's certificate; `wanted` the upstream named
        in the URL (/upstream/NAME/...), the only way for an agent not enrolled yet."""
        if wanted is not None:
            if wanted not in self.names:
                return None, (404, f"no upstream {wanted!r} at this gateway")
            belongs = self.servers.get(server) if server is not None else None
            if belongs is not None and belongs != wanted:
                return None, (
                    403,
                    f"this agent belongs to server {server!r} (upstream {belongs!r}), "
                    f"not to upstream {wanted!r}",
                )
            return wanted, None
        if len(self.names) == 1:
            return self.names[0], None
        if server is None:
            return None, (
                403,
                "the agent's certificate names no server: re-enroll, or use "
                f"{UPSTREAM_PREFIX}NAME/ in the URL",
            )
        name = self.servers.get(server)
        if name is None:
            down = [n for n in self.names if n not in self.upstreams]
            if down:
                return None, (503, f"server {server!r} is not reachable now; try again later")
            return None, (403, f"no upstream of this gateway leads to server {server!r}")
        return name, None

    def refusal(
        self, agent_id: str | None = None, upstream: str | None = None, new_session: bool = True
    ) -> Any:
        """Why a new agent connection (or, not `new_session`, an agent's HTTPS call) is
        refused now (HTTP status, reason), or None."""
        name = self.names[0] if upstream is None else upstream
        if self.draining:
            return 503, "this node is draining; reconnect elsewhere"
        if agent_id is not None and agent_id in self.revoked.get(name, ()):
            return 403, f"agent {agent_id} is revoked"
        if agent_id is not None and agent_id in self.pending.get(name, ()):
            return 403, f"agent {agent_id} is awaiting approval"
        if name not in self.upstreams:
            return 503, "this node has no link to its server now; try again later"
        if new_session and len(self.conns) >= self.max_clients:
            return 503, f"this node is full ({self.max_clients} clients)"
        return None

    def opened(
        self,
        proto: Any,
        agent_id: str,
        peer: str,
        tls: dict[str, Any],
        upstream: str | None = None,
        channel: str | None = None,
    ) -> int:
        name = self.names[0] if upstream is None else upstream
        self._next += 1
        conn = self._next
        self.conns[conn] = proto
        proto.relay_upstream = name
        self.accepted += 1
        self.upstreams[name].send(
            {
                "t": "open",
                "c": conn,
                "agent": agent_id,
                "peer": peer,
                "tls": tls,
                "channel": channel or self.channel,
            }
        )
        return conn

    def from_agent(self, conn: int, payload: bytes) -> None:
        proto = self.conns.get(conn)
        if proto is None:
            return
        link = self.upstreams.get(_upstream_of(proto, self.names))
        if link is not None:
            self.frames_in += 1
            self.bytes_in += len(payload)
            link.send({"t": "frame", "c": conn}, payload)

    def closed(self, conn: int) -> None:
        proto = self.conns.pop(conn, None)
        if proto is not None:
            link = self.upstreams.get(_upstream_of(proto, self.names))
            if link is not None:
                link.send({"t": "closed", "c": conn})

    def refused_for(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def request(self, upstream: str, agent_id: str | None, peer: str, envelope: bytes):
        """Carry an agent's HTTPS call to its server; fires with the response envelope."""
        self._next_request += 1
        r = self._next_request
        d: Deferred = Deferred(lambda _: self._forget_request(r))
        self._requests[r] = (upstream, d)
        self.frames_in += 1
        self.bytes_in += len(envelope)
        self.upstreams[upstream].send(
            {"t": "request", "r": r, "agent": agent_id, "peer": peer}, envelope
        )
        return d

    def _forget_request(self, r: int) -> None:
        self._requests.pop(r, None)  # cancelled: the agent went away; a late answer is dropped

    # -- server side ---------------------------------------------------------------------
    def from_server(self, header: dict[str, Any], payload: bytes, upstream: str | None = None):
        kind = header["t"]
        name = self.names[0] if upstream is None else upstream
        if kind == "frame":
            proto = self._conn_of(header["c"], name)
            if proto is not None:
                self.frames_out += 1
                self.bytes_out += len(payload)
                proto.sendMessage(payload, isBinary=False)
        elif kind == "push":
            prepared = self.prepare(payload) if self.prepare is not None else None
            n = 0
            for conn in header["c"]:
                proto = self._conn_of(conn, name)
                if proto is None:
                    continue
                n += 1
                if prepared is not None:
                    proto.sendPreparedMessage(prepared)
                else:
                    proto.sendMessage(payload, isBinary=False)
            self.pushes += 1
            self.frames_out += n
            self.bytes_out += n * len(payload)
            if self.fanout is not None:
                self.fanout(n)
        elif kind == "close":
            proto = self._conn_of(header["c"], name)
            if proto is not None:
                proto.sendClose(header["code"], str(header.get("reason", ""))[:120])
        elif kind == "response":
            pending = self._requests.pop(header["r"], None)
            if pending is not None and pending[0] == name:
                self.frames_out += 1
                self.bytes_out += len(payload)
                pending[1].callback(payload)
        elif kind == "revoked":
            self.revoke(name, header["agents"], bool(header.get("full")))
        elif kind == "pending":
            self.set_pending(
                name, header["agents"], header.get("approved", []), bool(header.get("full"))
            )

    def _conn_of(self, conn: int, upstream: str) -> Any:
        proto = self.conns.get(conn)
        if proto is None or _upstream_of(proto, self.names) != upstream:
            return None  # gone, or not this server's agent: a server speaks for its own
        return proto

    def set_pending(
        self, upstream: str, agent_ids: list[str], approved: list[str], full: bool = False
    ) -> None:
        """Agents that server has not approved yet: refused until it says they are."""
        if full:
            self.pending[upstream] = set(agent_ids)
        else:
            self.pending.setdefault(upstream, set()).update(agent_ids)
        self.pending[upstream].difference_update(approved)

    def revoke(self, upstream: str, agent_ids: list[str], full: bool = False) -> int:
        """Agents that server revoked: refused from now on, their live sessions closed."""
        ids = set(agent_ids)
        if full:
            self.revoked[upstream] = ids
        else:
            self.revoked.setdefault(upstream, set()).update(ids)
        n = 0
        for proto in list(self.conns.values()):
            if proto.agent_id in ids and _upstream_of(proto, self.names) == upstream:
                proto.sendClose(codes.CLOSE_REVOKED, codes.CLOSE_REASONS[codes.CLOSE_REVOKED])
                n += 1
        if ids:
            self._log.info(
                "{upstream}: {n} agents revoked, {c} sessions closed",
                upstream=upstream,
                n=len(ids),
                c=n,
            )
        return n

    def close_all(self, code: int) -> int:
        """Close every agent connection with `code` (draining at shutdown)."""
        n = 0
        for proto in list(self.conns.values()):
            proto.sendClose(code, codes.CLOSE_REASONS.get(code, ""))
            n += 1
        return n

    def drain(self) -> int:
        """Refuse new agents and tell every connected one to reconnect elsewhere (4006)."""
        self.draining = True
        return self.close_all(codes.CLOSE_DRAIN)

    def sweep(self, deadline: float) -> None:
        """Close agent connections silent since `deadline` (no ping, no frame)."""
        for proto in list(self.conns.values()):
            if proto.last_rx < deadline:
                proto.sendClose(codes.CLOSE_KEEPALIVE, codes.CLOSE_REASONS[codes.CLOSE_KEEPALIVE])

    def sessions_per_upstream(self) -> dict[str, int]:
        counts = dict.fromkeys(self.names, 0)
        for proto in self.conns.values():
            name = _upstream_of(proto, self.names)
            counts[name] = counts.get(name, 0) + 1
        return counts


def _upstream_of(proto: Any, names: list[str]) -> str:
    return getattr(proto, "relay_upstream", None) or names[0]


def wanted_upstream(path: str | bytes) -> str | None:
    """The upstream an agent names in its URL (/upstream/NAME/...), or None."""
    if isinstance(path, bytes):
        path = path.decode("ascii", "replace")
    if not path.startswith(UPSTREAM_PREFIX):
        return None
    return path[len(UPSTREAM_PREFIX) :].split("/", 1)[0] or None


class EdgeProtocol(LeanWebSocketMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """One agent connection at the node."""

    _log = Logger()
    relay_conn: int | None = None
    relay_upstream: str | None = None
    agent_id: str | None = None
    last_rx = 0.0

    def onConnect(self, request):
        relay: Relay = self.factory.relay
        if codes.SUBPROTOCOL not in request.protocols:
            relay.refused_for("subprotocol")
            raise ConnectionDeny(400, f"this node speaks {codes.SUBPROTOCOL}")
        agent_id, server = pki.peer_subject(self.transport)
        if agent_id is None or ":" in agent_id:
            relay.refused_for("certificate")
            raise ConnectionDeny(403, "an agent certificate is required: enroll first")
        upstream, refusal = relay.route(server, wanted_upstream(request.path))
        if refusal is None:
            refusal = relay.refusal(agent_id, upstream)
        if refusal is not None:
            relay.refused_for(_reason_label(refusal))
            self._log.info(
                "agent {agent} refused: {status} {why}",
                agent=agent_id,
                status=refusal[0],
                why=refusal[1],
            )
            raise ConnectionDeny(*refusal)
        self.agent_id = agent_id
        self.relay_upstream = upstream
        return codes.SUBPROTOCOL

    def onOpen(self):
        relay: Relay = self.factory.relay
        self.last_rx = relay.clock.seconds()
        if relay.upstreams.get(self.relay_upstream) is None:  # lost since the upgrade
            self.sendClose(
                codes.CLOSE_UPSTREAM_LOST, codes.CLOSE_REASONS[codes.CLOSE_UPSTREAM_LOST]
            )
            return
        peer = self.transport.getPeer()
        peer_text = f"tcp{'6' if ':' in peer.host else '4'}:{peer.host}:{peer.port}"
        self.relay_conn = relay.opened(
            self,
            self.agent_id,
            peer_text,
            pki.negotiated_tls(self.transport),
            self.relay_upstream,
            self.factory.channel,
        )

    def onPing(self, payload: bytes) -> None:
        self.last_rx = self.factory.relay.clock.seconds()
        super().onPing(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.relay_conn is None:
            return
        if isBinary:
            self.sendClose(codes.CLOSE_PROTOCOL_ERROR, "tcm.v1 uses text frames")
            return
        relay: Relay = self.factory.relay
        self.last_rx = relay.clock.seconds()
        relay.from_agent(self.relay_conn, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.relay_conn is not None:
            self.factory.relay.closed(self.relay_conn)
            self.relay_conn = None


class EdgeFactory(WebSocketServerFactory):
    protocol = EdgeProtocol

    def __init__(
        self,
        relay: Relay,
        url: str,
        max_message_size: int = 1024 * 1024,
        channel: str | None = None,
    ):
        super().__init__(url, protocols=[codes.SUBPROTOCOL])
        self.relay = relay
        self.channel = channel or relay.channel
        relay.prepare = self.prepareMessage
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            failByDrop=False,
            autoPingInterval=0,  # agents ping; the node sweeps silent connections
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            perMessageCompressionAccept=lambda offers: None,
        )
        bind_options(self)


def _reason_label(refusal: tuple[int, str]) -> str:
    """A short, bounded label of a refusal for counters (metrics by reason)."""
    status, why = refusal
    for word in ("revoked", "draining", "full", "no link", "not reachable", "names no server"):
        if word in why:
            return word.replace(" ", "_")
    return f"http_{status}"
