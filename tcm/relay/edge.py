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

from tcm.protocol import codes
from tcm.tls import pki
from tcm.wsbase import LeanWebSocketMixin, bind_options, settle_upgrade

UPSTREAM_PREFIX = "/upstream/"  # /upstream/NAME/...: the agent names its server's upstream
TASK_SERVER_PREFIX = "/taskserver/"  # /taskserver/NAME/task/v1/ws: through to task server NAME


class RequestLost(Exception):
    """The link carrying an agent's HTTPS call went down before the answer came."""


class Relay:
    """The node's table of agent connections, between the edge and its upstream links.

    A task server has one upstream (its management server); a gateway has several, one per
    `--upstream NAME=URL`, and routes each agent to the upstream of the server named in its
    certificate. Connection numbers are unique across upstreams.

    A gateway's upstreams may also be task servers (`task_server_upstreams`): an agent's task
    session at /taskserver/NAME/task/v1/ws goes over the link to task server NAME, which
    relays it to its management server; the gateway tells each server which of its task
    servers it links to (`reach`), and applies that server's revoked and pending lists to
    the task sessions too. A task server accepts such links from the gateways its server
    names (`nodes`), each gateway connection an entry of `conns` like an agent's.
    """

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        max_clients: int,
        channel: str = "task",
        upstream_names: tuple[str, ...] | list[str] = ("server",),
        task_server_upstreams: tuple[str, ...] | list[str] = (),
    ):
        self.clock = clock
        self.max_clients = max_clients
        self.channel = channel
        self.names = list(upstream_names)  # configured upstreams, the first is the default
        self.ts_names = set(task_server_upstreams)  # those of them that are task servers
        self.upstreams: dict[str, Any] = {}  # upstream name -> its link, once welcomed
        self.servers: dict[str, str] = {}  # server name (from its welcome) -> upstream name
        self.task_servers: dict[str, str] = {}  # task server (its welcome) -> upstream name
        self.ts_server: dict[str, str | None] = {}  # task server upstream -> its server
        # at a task server: the node's and its server's names, and the gateways it accepts
        self.node_name: str | None = None
        self.server_name: str | None = None
        self.gateways: dict[str, str] | None = None  # name -> fingerprint; None: not known yet
        self.downlinks: dict[str, Any] = {}  # gateway (name or name/worker) -> its DownLink
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

    def link_up(
        self,
        name: str,
        link: Any,
        server: str | None = None,
        role: str = "server",
        node: str | None = None,
    ) -> str | None:
        """An upstream link was welcomed; why it cannot be used, or None."""
        if role == "taskserver":
            if name not in self.ts_names:
                return (
                    f"upstream {name!r} is task server {node!r}, not a management server: "
                    "give the management server's URL"
                )
            if not node:
                return f"task server upstream {name!r} did not say its name"
            other = self.task_servers.get(node)
            if other is not None and other != name and other in self.upstreams:
                return f"upstreams {other!r} and {name!r} both lead to task server {node!r}"
            self.task_servers[node] = name
            self.ts_server[name] = server
            self.upstreams[name] = link
            self.announce_reach()
            return None
        if name in self.ts_names:
            return (
                f"upstream {name!r} is a management server, not a task server: enroll with "
                f"it (--upstream-token {name}=TOKEN from `tcm gateways enroll`)"
            )
        if server is not None:
            other = self.servers.get(server)
            if other is not None and other != name and other in self.upstreams:
                return f"upstreams {other!r} and {name!r} both lead to server {server!r}"
            self.servers[server] = name
        self.server_name = server
        self.upstreams[name] = link
        self.announce_reach(name)
        return None

    def announce_reach(self, only: str | None = None) -> None:
        """Tell each management server which of its task servers this gateway links to."""
        if not self.ts_names:
            return
        for server, name in self.servers.items():
            link = self.upstreams.get(name)
            if link is None or (only is not None and name != only):
                continue
            reach = sorted(
                node
                for node, up in self.task_servers.items()
                if up in self.upstreams and self.ts_server.get(up) == server
            )
            link.send({"t": "reach", "task_servers": reach})

    def lists_of(self, upstream: str) -> str:
        """Whose revoked/pending lists apply on an upstream: a task server's server's."""
        if upstream in self.ts_names:
            return self.servers.get(self.ts_server.get(upstream) or "", upstream)
        return upstream

    def link_lost(self, name: str, link: Any = None) -> None:
        """No link: that server has forgotten these sessions; the agents must come again."""
        if link is not None and self.upstreams.get(name) is not link:
            return
        self.upstreams.pop(name, None)
        if name in self.ts_names:
            for node in [n for n, up in self.task_servers.items() if up == name]:
                del self.task_servers[node]
            self.announce_reach()
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
            if wanted in self.ts_names:
                return None, (404, f"upstream {wanted!r} is a task server, not a server")
            belongs = self.servers.get(server) if server is not None else None
            if belongs is not None and belongs != wanted:
                return None, (
                    403,
                    f"this agent belongs to server {server!r} (upstream {belongs!r}), "
                    f"not to upstream {wanted!r}",
                )
            return wanted, None
        if len(self.names) - len(self.ts_names) == 1:
            return next(n for n in self.names if n not in self.ts_names), None
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

    def route_task_server(self, server: str | None, node: str) -> tuple[str | None, Any]:
        """The upstream of task server `node` for an agent of `server`, or why not."""
        name = self.task_servers.get(node)
        if name is None or name not in self.upstreams:
            return None, (503, f"task server {node!r} is not reachable from here now")
        belongs = self.ts_server.get(name)
        if server is not None and belongs is not None and server != belongs:
            return None, (
                403,
                f"task server {node!r} serves server {belongs!r}, not this agent's {server!r}",
            )
        if server is None and len(self.names) - len(self.ts_names) > 1:
            return None, (403, "the agent's certificate names no server: re-enroll")
        return name, None

    def refusal(
        self, agent_id: str | None = None, upstream: str | None = None, new_session: bool = True
    ) -> Any:
        """Why a new agent connection (or, not `new_session`, an agent's HTTPS call) is
        refused now (HTTP status, reason), or None."""
        name = self.names[0] if upstream is None else upstream
        lists = self.lists_of(name)
        if self.draining:
            return 503, "this node is draining; reconnect elsewhere"
        if agent_id is not None and agent_id in self.revoked.get(lists, ()):
            return 403, f"agent {agent_id} is revoked"
        if agent_id is not None and agent_id in self.pending.get(lists, ()):
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
        gateway: str | None = None,
    ) -> int:
        name = self.names[0] if upstream is None else upstream
        self._next += 1
        conn = self._next
        self.conns[conn] = proto
        proto.relay_upstream = name
        self.accepted += 1
        header = {
            "t": "open",
            "c": conn,
            "agent": agent_id,
            "peer": peer,
            "tls": tls,
            "channel": channel or self.channel,
        }
        if gateway is not None:
            header["gateway"] = gateway  # a task server: the gateway this session came by
        self.upstreams[name].send(header)
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
            onward: dict[Any, list[int]] | None = None  # gateway links -> their connections
            for conn in header["c"]:
                proto = self._conn_of(conn, name)
                if proto is None:
                    continue
                n += 1
                if proto.down is not None:  # a gateway's: one push per gateway link
                    if onward is None:
                        onward = {}
                    onward.setdefault(proto.down, []).append(proto.c)
                elif prepared is not None:
                    proto.sendPreparedMessage(prepared)
                else:
                    proto.sendMessage(payload, isBinary=False)
            if onward is not None:
                for down, conns in onward.items():
                    down.push(conns, payload)
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
        elif kind == "nodes":
            self.set_gateways(header["gateways"])

    def set_gateways(self, gateways: dict[str, str]) -> None:
        """The gateways this task server may accept (from its server); links of others go."""
        self.gateways = dict(gateways)
        for down in list(self.downlinks.values()):
            if self.gateways.get(down.name) != down.fingerprint:
                down.close(codes.CLOSE_UNAUTHORIZED, f"gateway {down.name} is not registered now")

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
            if proto.agent_id in ids and self.lists_of(_upstream_of(proto, self.names)) == upstream:
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


def wanted_upstream(path: str | bytes, prefix: str = UPSTREAM_PREFIX) -> str | None:
    """The upstream an agent names in its URL (/upstream/NAME/...), or None."""
    if isinstance(path, bytes):
        path = path.decode("ascii", "replace")
    if not path.startswith(prefix):
        return None
    return path[len(prefix) :].split("/", 1)[0] or None


def wanted_task_server(path: str | bytes) -> str | None:
    """The task server an agent's task session names (/taskserver/NAME/task/v1/ws), or None."""
    return wanted_upstream(path, TASK_SERVER_PREFIX)


class EdgeProtocol(LeanWebSocketMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """One agent connection at the node."""

    _log = Logger()
    relay_conn: int | None = None
    relay_upstream: str | None = None
    agent_id: str | None = None
    last_rx = 0.0
    down = None  # an agent's own connection (a gateway's carried ones have their link)
    tls_buffers_released = False

    def onConnect(self, request):
        relay: Relay = self.factory.relay
        if codes.SUBPROTOCOL not in request.protocols:
            relay.refused_for("subprotocol")
            raise ConnectionDeny(400, f"this node speaks {codes.SUBPROTOCOL}")
        agent_id, server = pki.peer_subject(self.transport)
        if agent_id is None or ":" in agent_id:
            relay.refused_for("certificate")
            raise ConnectionDeny(403, "an agent certificate is required: enroll first")
        task_server = wanted_task_server(request.path)
        if task_server is not None:
            upstream, refusal = relay.route_task_server(server, task_server)
        else:
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
        settle_upgrade(self, relay.clock)  # nothing of the upgrade kept (as on the server)
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
