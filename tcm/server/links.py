"""The server's end of node links: agent sessions carried by task servers and gateways.

A `NodeLink` is one connected relay node. Each agent connection at the node becomes an
ordinary `AgentSession` here, with a `RelayedTransport` instead of a WebSocket: the session
rules (hello, supersede, requests, errors) are the same code as for a direct connection. The
link is also the sessions' *route*: the dispatcher hands it every session of a push at once,
and the push crosses the link once and fans out at the node.

A gateway carries agents' core sessions (channel "core") as well as task sessions, and their
HTTPS calls as `request` link messages, rendered here by the same resource tree as any agent
API call (`envelope_http.render_envelope`). It is told which agents are revoked (`revoked`),
at welcome and on each change, so it refuses them before they reach this server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger

from tcm.interfaces import INodeRegistry
from tcm.protocol import codes, link
from tcm.protocol.envelope import ProtocolError, decode, encode
from tcm.server.envelope_http import PeerView
from tcm.server.errors import DomainError, close_code
from tcm.server.sessions import AgentSession, SessionState, intern
from tcm.tls import pki
from tcm.wsbase import LeanWebSocketMixin, LinkEndMixin, link_end_options


class RelayedConnection:
    """What the agent API may learn of an agent connection held by a node."""

    __slots__ = ("_peer", "_host")

    def __init__(self, peer: str | None, host: Any):
        self._peer = _address(peer)
        self._host = host

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def getPeerCertificate(self):
        return None  # verified by the node; the session carries the agent id

    def getHandle(self):
        return None


class RelayedTransport:
    """A session's transport when its agent is connected to a node: frames go over the link."""

    __slots__ = ("link", "conn", "peer_transport")

    def __init__(self, link: NodeLink, conn: int, peer_transport: Any):
        self.link = link
        self.conn = conn
        self.peer_transport = peer_transport

    def send_frame(self, frame: bytes) -> None:
        self.link.send({"t": "frame", "c": self.conn}, frame)

    def send_prepared(self, prepared: Any) -> None:  # the link route never prepares
        self.send_frame(prepared)

    def close(self, code: int, reason: str) -> None:
        self.link.send({"t": "close", "c": self.conn, "code": code, "reason": reason[:120]})

    def dropConnection(self, abort: bool = False) -> None:
        self.close(codes.CLOSE_NORMAL, "closed by the server")


class NodeLink:
    """One connected node and the agent sessions it carries (the link's domain logic)."""

    _log = Logger()
    # the link messages a node sends, by type (checked against tcm.protocol.link's schemas)
    _HANDLERS = {
        "hello": "_on_hello",
        "open": "_on_open",
        "frame": "_on_frame",
        "closed": "_on_closed",
        "request": "_on_request",
        "reach": "_on_reach",
    }

    def __init__(
        self,
        name: str,
        send: Callable[[bytes], None],
        close: Callable[[int, str], None],
        hub: Any,
        clock: Any,
        host: Any = None,
        max_message_size: int = 1024 * 1024,
        channel: str = "task",
        max_batch: int = link.MAX_BATCH,  # 0: every message in a frame of its own
    ):
        self.name = name
        self._writer = link.LinkWriter(send, clock, max_batch)
        self._close = close
        self.hub = hub
        self.clock = clock
        self.host = host
        self.max_message_size = max_message_size
        self.channel = channel
        self.role: str | None = None
        self.url: str | None = None
        self.max_clients: int | None = None
        self.worker: int | None = None  # a gateway's worker process number
        self.reach: tuple[str, ...] = ()  # task servers a gateway links to (its `reach`)
        self.sessions: dict[int, AgentSession] = {}
        # connection -> the resumption token the node sealed for it (its `open`), until the
        # session's welcome takes it (`token_of`): the node ended the agent's TLS
        self._tokens: dict[int, dict[str, Any]] = {}
        self.frames_in = 0
        self.frames_out = 0
        self.pushes = 0
        self.requests = 0
        self.ready = False

    @property
    def key(self) -> str:
        """Which links of a node supersede each other: one per node, or per gateway worker."""
        return self.name if self.worker is None else f"{self.name}/{self.worker}"

    # -- route ---------------------------------------------------------------------------
    def deliver(self, frame: bytes, sessions: list[AgentSession]) -> None:
        """One frame for several sessions on this link: sent once, fanned out by the node."""
        if len(sessions) == 1:
            sessions[0].transport.send_frame(frame)
            return
        conns = [s.transport.conn for s in sessions]  # type: ignore[attr-defined]
        self.pushes += 1
        self.send({"t": "push", "c": conns}, frame)

    # -- link messages -------------------------------------------------------------------
    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.frames_out += 1
        self._writer.send(header, payload)

    def message_received(self, message: bytes) -> None:
        try:
            link.receive(self, message)
        except link.LinkError as e:
            self._log.warn("node {node} sent a bad link message: {e}", node=self.name, e=e)
            self._close(codes.CLOSE_PROTOCOL_ERROR, str(e)[:120])

    def _on_hello(self, header: dict[str, Any], payload: bytes) -> None:
        if self.ready:
            raise link.LinkError("hello already received")
        self.role = header["role"]
        self.url = header["url"]
        max_clients = header.get("max_clients")
        self.max_clients = max_clients if isinstance(max_clients, int) else None
        worker = header.get("worker")
        self.worker = worker if isinstance(worker, int) and not isinstance(worker, bool) else None
        self.ready = True
        self.send(
            {
                "t": "welcome",
                "keepalive": self.hub.link_keepalive,
                "server": self.hub.server_name,
                "role": "server",
            }
        )
        if self.role == "gateway":
            self.send({"t": "revoked", "agents": self.hub.revoked_agents(), "full": True})
            self.send({"t": "pending", "agents": self.hub.pending_agents(), "full": True})
        else:
            self.nodes(self.hub.gateway_fingerprints(), self.hub.gateway_fingerprints(True))
        members = getattr(self.hub, "cluster_members", None)
        if members:
            self.cluster(members)
        self.hub.link_opened(self)

    def _on_open(self, header: dict[str, Any], payload: bytes) -> None:
        conn, agent_id = header["c"], header["agent"]
        if conn in self.sessions:
            raise link.LinkError(f"connection {conn} is already open")
        if not self.hub.persistent_enabled():
            code = codes.CLOSE_PERSISTENT_OFF
            self.send({"t": "close", "c": conn, "code": code, "reason": codes.CLOSE_REASONS[code]})
            return
        try:
            self.hub.authenticate_agent_id(agent_id)
        except DomainError as e:
            self.send({"t": "close", "c": conn, "code": close_code(e), "reason": e.message})
            return
        channel = header.get("channel", self.channel) if self.role == "gateway" else self.channel
        relayed = RelayedConnection(header.get("peer"), self.host)
        transport = RelayedTransport(self, conn, PeerView(relayed, agent_id))
        via = f"{self.role or 'node'}:{self.name}"
        gateway = header.get("gateway")
        if isinstance(gateway, str) and self.role == "taskserver":
            via += f" via gateway:{gateway}"  # a task session the gateway relayed here
        session = AgentSession(
            agent_id,
            transport,
            self.hub,
            self.clock.seconds(),
            route=self,
            via=via,
            max_message_size=self.max_message_size,
        )
        session.channel = channel
        tls = header.get("tls")
        session.tls = intern(tls) if isinstance(tls, dict) else None
        self.sessions[conn] = session
        resume = header.get("resume")
        if resume is not None:
            self._tokens[conn] = resume

    def token_of(self, session: AgentSession) -> dict[str, Any] | None:
        """The resumption token the node sealed for this session's connection (for its
        welcome, once: tcm.tls.resumption), or None when it sent none."""
        return self._tokens.pop(session.transport.conn, None)  # type: ignore[attr-defined]

    def _on_frame(self, header: dict[str, Any], payload: bytes) -> None:
        session = self.sessions.get(header["c"])
        if session is None:
            return  # closed here a moment ago; the node will hear of it
        self.frames_in += 1
        session.frame_received(payload, self.clock.seconds())

    def _on_closed(self, header: dict[str, Any], payload: bytes) -> None:
        self._tokens.pop(header["c"], None)
        session = self.sessions.pop(header["c"], None)
        if session is not None:
            session.connection_lost()

    def _on_request(self, header: dict[str, Any], payload: bytes) -> None:
        """An agent's HTTPS call, carried by a gateway: rendered like any agent API call."""
        r, agent_id = header["r"], header.get("agent")
        if self.role != "gateway":
            raise link.LinkError("only a gateway carries agents' HTTPS calls")
        self.requests += 1
        try:
            env = decode(payload, self.max_message_size)
            if env.type != "request":
                raise ProtocolError(
                    codes.ERR_UNEXPECTED, f"a link request carries a 'request', not {env.type!r}"
                )
        except ProtocolError as e:
            raise link.LinkError(f"link request {r}: {e}") from None
        view = PeerView(RelayedConnection(header.get("peer"), self.host), agent_id)
        d = self.hub.render_relayed(view, env)

        def answer(reply: Any) -> None:
            if self.ready:
                self.send({"t": "response", "r": r}, encode(reply))

        def failed(f: Any) -> None:
            self._log.failure("relayed request {r} failed", f, r=r)
            answer(env.reply("response", {"status": 500, "body": {"error": "internal error"}}))

        d.addCallbacks(answer, failed)

    def _on_reach(self, header: dict[str, Any], payload: bytes) -> None:
        """A gateway says which task servers it links to now (its agents' task sessions
        can then be assigned to those, through it)."""
        if self.role != "gateway":
            raise link.LinkError("only a gateway says which task servers it reaches")
        reach = tuple(sorted(set(header["task_servers"])))
        if reach != self.reach:
            self.reach = reach
            self.hub.reach_changed(self)

    def nodes(self, gateways: dict[str, str], previous: dict[str, str] | None = None) -> None:
        """Tell a task server which gateways may link to it (name -> certificate
        fingerprint): sent at welcome and whenever the registered nodes change."""
        if self.ready and self.role == "taskserver":
            message: dict[str, Any] = {"t": "nodes", "gateways": gateways}
            if previous:
                message["previous"] = previous
            self.send(message)

    def cluster(self, members: list[dict[str, str]]) -> None:
        """Tell a relay node the cluster's server nodes (`{"node", "url", "state"}`): it
        links to each one that is up, and spreads its agents over them."""
        if self.ready:
            self.send({"t": "cluster", "nodes": members})

    def pending(self, agent_ids: list[str], approved: list[str] | None = None) -> None:
        """Tell a gateway which agents wait for approval (it refuses them until then)."""
        if self.ready and self.role == "gateway":
            self.send({"t": "pending", "agents": agent_ids, "approved": approved or []})

    def revoked(self, agent_ids: list[str]) -> None:
        """Tell a gateway that these agents are revoked (it refuses them from now on)."""
        if self.ready and self.role == "gateway":
            self.send({"t": "revoked", "agents": agent_ids, "full": False})

    def lost(self) -> None:
        """The link is gone: every session it carried is gone with it."""
        self._writer.discard()
        self._tokens.clear()
        sessions, self.sessions = self.sessions, {}
        for session in sessions.values():
            session.connection_lost()
        if self.ready:
            self.ready = False
            self.hub.link_closed(self)

    def open_sessions(self, channel: str | None = None) -> int:
        """Open sessions on this link (of one channel: "core" or "task")."""
        return sum(
            1
            for s in self.sessions.values()
            if s.state is SessionState.OPEN and (channel is None or s.channel == channel)
        )


class NodeLinkProtocol(LinkEndMixin, LeanWebSocketMixin, WebSocketServerProtocol):  # type: ignore[misc]
    """Thin adapter: binary link messages in and out of a NodeLink."""

    _log = Logger()

    factory: NodeLinkFactory

    def onConnect(self, request):
        factory = self.factory
        transport: Any = self.transport  # connected: Autobahn calls onConnect on a transport
        if link.SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"node links speak {link.SUBPROTOCOL}")
        cn = pki.peer_common_name(self.transport)
        if cn is None or not cn.startswith(link.NODE_PREFIX):
            raise ConnectionDeny(403, "a node certificate is required (enroll the node first)")
        name = cn[len(link.NODE_PREFIX) :]
        refusal = factory.nodes.refusal(name, pki.peer_fingerprint(transport))
        if refusal is not None:
            self._log.info("node link from {name} refused: {why}", name=name, why=refusal)
            raise ConnectionDeny(403, refusal)
        self.end = NodeLink(
            name,
            self._send_to_node,
            self.sendClose,
            factory.hub,
            factory.clock,
            host=transport.getHost(),
            max_message_size=factory.max_message_size,
        )
        return link.SUBPROTOCOL

    def _send_to_node(self, data: bytes) -> None:
        # A batch flushed after the link began to close (the node broke the protocol) has no
        # one to go to: dropped, not an error in a timed call.
        if self.state == self.STATE_OPEN:
            self.sendMessage(data, isBinary=True)


class NodeLinkFactory(WebSocketServerFactory):
    """The nodes' link endpoint: a link of a registered, enrolled node (`nodes`) becomes a
    NodeLink whose sessions call `hub`."""

    protocol = NodeLinkProtocol

    def __init__(
        self,
        url: str,
        hub: Any,  # the link hub (tcm.server.hub.AgentHub)
        nodes: INodeRegistry,  # who may link
        clock: Any,
        max_message_size: int,
        keepalive: float,
        keepalive_timeout: float,
    ):
        super().__init__(url, protocols=[link.SUBPROTOCOL])
        self.hub = hub
        self.nodes = nodes
        self.clock = clock
        self.max_message_size = max_message_size
        link_end_options(self, max_message_size * 64, keepalive / 2, keepalive_timeout)


def _address(peer: str | None) -> Any:
    """'tcp4:1.2.3.4:5678' (as a node reports it) as an address object."""
    if not isinstance(peer, str):
        return IPv4Address("TCP", "0.0.0.0", 0)
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if kind == "tcp6":
        return IPv6Address("TCP", host, number)
    return IPv4Address("TCP", host or "0.0.0.0", number)
