"""The two relays: a gateway's and a task server's, each composed of the relay's parts.

A relay sits between the edge (agents' connections, `edge.py`; at a task server also the
gateways' links, `downstream.py`) and its upstream links (`upstream.py`). It runs no session
logic: it numbers each agent connection (`ConnectionTable`), opens it on the link of its
upstream, and from then on moves frames; a `push` from a server (one frame, many
connections) is framed once here and sent to each connection.

- `GatewayRelay`: several upstreams, one per `--upstream NAME=URL`; an agent goes to the
  upstream of the server named in its certificate (`GatewayRouting`), is refused if that
  server revoked it or has not approved it (`AccessLists`), and its HTTPS calls cross the link
  as requests (`PendingRequests`). Upstreams may also be task servers: an agent's task session
  at /taskserver/NAME/task/v1/ws goes over the link to task server NAME; the gateway tells
  each server which of its task servers it links to (`reach`).
- `TaskServerRelay`: one upstream, its management server; it accepts links of the gateways
  its server names (`GatewayLinks`), each gateway connection a connection here like an
  agent's own.

Link messages from a server are dispatched by type through each relay's `_HANDLERS` table;
a type the relay does not take is a `LinkError` (the upstream link closes with 4002).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from autobahn.exception import Disconnected
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tcm.protocol import codes, link
from tcm.relay.access import AccessLists
from tcm.relay.connections import AgentConnection, ConnectionTable
from tcm.relay.counters import RelayCounters
from tcm.relay.gatewaylinks import GatewayLinks
from tcm.relay.requests import REQUEST_TIMEOUT, PendingRequests
from tcm.relay.routing import (
    GatewayRouting,
    Refusal,
    UpstreamLinks,
    wanted_task_server,
    wanted_upstream,
)


class Relay(ABC):
    """What both relays do: agent connections in, their frames up the link, the server's
    frames, pushes and closes out. Subclasses add their parts and message handlers."""

    _log = Logger()
    role: ClassVar[str] = "relay node"
    channel: ClassVar[str] = "task"  # what an agent's session at /…/ws is (the edge may say)
    _HANDLERS: ClassVar[dict[str, str]] = {
        "frame": "_on_frame",
        "push": "_on_push",
        "close": "_on_close",
        "cluster": "_on_cluster",
    }

    def __init__(self, clock: Any, max_clients: int, upstreams: list[str]):
        self.clock = clock
        self.max_clients = max_clients
        self.links = UpstreamLinks(upstreams)
        self.conns = ConnectionTable(self.links.default)
        self.counters = RelayCounters()
        self.prepare: Any = None  # the edge factory's prepareMessage: frame a push once
        self.draining = False
        # told of each upstream cluster's nodes ({name: address}): the node links to them
        self.on_cluster: Any = None
        # told of each link welcomed: (upstream, node key, the server node's name)
        self.on_welcomed: Any = None
        self.clusters: dict[str, dict[str, dict[str, Any]]] = {}  # upstream -> its nodes

    # -- the edge ------------------------------------------------------------------------
    @abstractmethod
    def admit(self, agent_id: str, server: str | None, path: str | bytes) -> tuple[Any, Any]:
        """Where an agent's new connection at `path` goes: (upstream, None), or (None,
        (status, reason)) when it is refused. `server` is the one its certificate names."""

    def refusal(
        self, agent_id: str | None = None, upstream: str | None = None, new_session: bool = True
    ) -> Refusal | None:
        """Why a new agent connection (or, not `new_session`, an agent's HTTPS call) is
        refused now (HTTP status, reason), or None."""
        name = self.links.default if upstream is None else upstream
        if self.draining:
            return 503, "this node is draining; reconnect elsewhere"
        barred = self._barred(agent_id, name)
        if barred is not None:
            return barred
        if not self.links.is_up(name):
            return 503, "this node has no link to its server now; try again later"
        if new_session and len(self.conns) >= self.max_clients:
            return 503, f"this node is full ({self.max_clients} clients)"
        return None

    def _barred(self, agent_id: str | None, upstream: str) -> Refusal | None:
        """Why the upstream's server would refuse this agent, as far as this node knows."""
        return None

    def opened(
        self,
        conn: AgentConnection,
        agent_id: str,
        peer: str,
        tls: dict[str, Any],
        upstream: str | None = None,
        channel: str | None = None,
        gateway: str | None = None,
        node: str | None = None,
        resume: dict[str, Any] | None = None,
    ) -> int:
        """An agent connection was accepted: number it and open it on a link of its
        upstream (of a cluster: the node link its agent's other sessions use, else the one
        the spread picks). `resume`: the resumption token sealed for it where its TLS ended
        (here, or at the gateway that carries it), for its server to put in the welcome."""
        name = self.links.default if upstream is None else upstream
        up = self.link_for(name, agent_id, node)
        c = self.conns.add(conn, name, up, agent_id)
        self.counters.accepted += 1
        header = {
            "t": "open",
            "c": c,
            "agent": agent_id,
            "peer": peer,
            "tls": tls,
            "channel": channel or self.channel,
        }
        if gateway is not None:
            header["gateway"] = gateway  # a task server: the gateway this session came by
        if node is not None and up is not None and self._passes_node(name):
            header["node"] = node  # a task server behind a gateway: where to take it on
        if resume is not None:
            header["resume"] = resume
        up.send(header)
        return c

    def _passes_node(self, upstream: str) -> bool:
        """Whether an `open` on upstream `upstream` carries the agent's server node (to a
        task server, which links to every node of the cluster)."""
        return False

    def link_for(self, upstream: str, agent_id: str | None, node: str | None = None) -> Any:
        """The node link of `upstream` an agent's new connection or call goes over: where
        its other sessions are; else to server node `node` if linked (the node holding its
        core session named itself in the task session's URL); else the spread's choice."""
        if agent_id is not None:
            held = self.conns.link_of_agent(upstream, agent_id)
            if held is not None and self.links.holds(upstream, held):
                return held
        if node is not None:
            for up in self.links.all(upstream):
                if getattr(getattr(up, "factory", None), "server_name", None) == node:
                    return up
        return self.links.pick(upstream, agent_id)

    def from_agent(self, c: int, payload: bytes) -> None:
        conn = self.conns.get(c)
        if conn is None:
            return
        # a connection in the table is on a live link (a lost link's are taken out)
        upstream = conn.relay_link or self.links.get(self.conns.upstream_of(conn))
        if upstream is not None:
            self.counters.to_server(payload)
            upstream.send({"t": "frame", "c": c}, payload)

    def closed(self, c: int) -> None:
        conn = self.conns.pop(c)
        if conn is not None:
            upstream = conn.relay_link or self.links.get(self.conns.upstream_of(conn))
            if upstream is not None:
                upstream.send({"t": "closed", "c": c})

    def close_all(self, code: int) -> int:
        """Close every agent connection with `code` (draining at shutdown)."""
        n = 0
        for conn in self.conns:
            conn.sendClose(code, codes.CLOSE_REASONS.get(code, ""))
            n += 1
        return n

    def drain(self) -> int:
        """Refuse new agents and tell every connected one to reconnect elsewhere (4006)."""
        self.draining = True
        return self.close_all(codes.CLOSE_DRAIN)

    def sweep(self, deadline: float) -> None:
        """Close agent connections silent since `deadline` (no ping, no frame)."""
        for conn in self.conns:
            if conn.last_rx < deadline:
                conn.sendClose(codes.CLOSE_KEEPALIVE, codes.CLOSE_REASONS[codes.CLOSE_KEEPALIVE])

    def sessions_per_upstream(self) -> dict[str, int]:
        return self.conns.per_upstream(self.links.names)

    def node_links(self, upstream: str) -> list[dict[str, Any]]:
        """Upstream `upstream`'s node links: each node's address, name (from its welcome),
        state and sessions; the nodes its cluster named that are not linked are down."""
        per = self.conns.per_link(upstream)
        out: dict[str, dict[str, Any]] = {}
        for key, up in self.links.nodes(upstream).items():
            address = str(key) if key is not None else "-"
            out[address] = {
                "address": address,
                "node": getattr(getattr(up, "factory", None), "server_name", None) or "-",
                "link": "up",
                "sessions": per.get(up, 0),
            }
        for node, info in sorted(self.clusters.get(upstream, {}).items()):
            address = str(info.get("url") or "-")
            if address in out:
                out[address]["node"] = node
            else:
                out[address] = {"address": address, "node": node, "link": "down", "sessions": 0}
        return [out[k] for k in sorted(out)]

    def gateway_links(self) -> dict[str, Any] | None:
        """The links of gateways that carry agents here (a task server's), else None."""
        return None

    # -- the upstream links --------------------------------------------------------------
    @abstractmethod
    def link_up(
        self,
        name: str,
        link: Any,
        server: str | None = None,
        role: str = "server",
        node: str | None = None,
        key: Any = None,
    ) -> str | None:
        """The link to upstream `name` was welcomed (by a `role`, server `server`, task
        server `node`); why it cannot be used, or None."""

    def link_lost(self, name: str, link: Any = None) -> None:
        """No link: that server (that node of a cluster) has forgotten the sessions it
        carried; their agents must come again (and land on a node still linked)."""
        current = self.links.down(name, link)
        if current:
            self._link_gone(name, link)
        elif link is None:
            return
        lost = self.conns.on(name, link)
        if lost:
            self._log.warn(
                "link {name} lost: closing {n} agent connections", name=name, n=len(lost)
            )
        for c in lost:
            conn = self.conns.pop(c)
            assert conn is not None
            conn.relay_conn = None
            conn.sendClose(
                codes.CLOSE_UPSTREAM_LOST, codes.CLOSE_REASONS[codes.CLOSE_UPSTREAM_LOST]
            )

    @abstractmethod
    def _link_gone(self, name: str, link: Any = None) -> None:
        """What else goes with upstream `name`'s link `link` (None: every link)."""

    def from_server(
        self, header: dict[str, Any], payload: bytes, upstream: str | None = None, via: Any = None
    ) -> None:
        """One checked link message from upstream `upstream` (the default one if None) over
        its node link `via`, to its handler by type; LinkError for a type this relay does
        not take."""
        name = self._HANDLERS.get(header["t"])
        if name is None:
            raise link.LinkError(f"a {self.role} does not take link message {header['t']!r}")
        getattr(self, name)(
            self.links.default if upstream is None else upstream, header, payload, via
        )

    def _on_frame(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        conn = self.conns.of(header["c"], upstream, via)
        if conn is not None:
            self.counters.to_agents(payload)
            _send(conn, payload)

    def _on_push(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        prepared = self.prepare(payload) if self.prepare is not None else None
        n = 0
        onward: dict[Any, list[int]] | None = None  # gateway links -> their connections
        for c in header["c"]:
            conn: Any = self.conns.of(c, upstream, via)
            if conn is None:
                continue
            n += 1
            if conn.down is not None:  # a gateway's: one push per gateway link
                if onward is None:
                    onward = {}
                onward.setdefault(conn.down, []).append(conn.c)
            elif prepared is not None:
                try:
                    conn.sendPreparedMessage(prepared)
                except Disconnected:  # closed meanwhile (a drain): nothing to send to
                    pass
            else:
                _send(conn, payload)
        if onward is not None:
            for down, conns in onward.items():
                down.push(conns, payload)
        self.counters.pushed(payload, n)

    def _on_close(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        conn = self.conns.of(header["c"], upstream, via)
        if conn is not None:
            conn.sendClose(header["code"], str(header.get("reason", ""))[:120])

    def _on_cluster(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        """The upstream is a cluster of server nodes: their names and addresses. Agents
        whose certificates name any node go to this upstream; a node not linked yet is
        linked (by the service, `on_cluster`)."""
        nodes = {
            str(n["node"]): {"url": str(n["url"]), "state": str(n.get("state", "up"))}
            for n in header["nodes"]
        }
        self.clusters[upstream] = nodes
        self._cluster_nodes(upstream, list(nodes))
        if self.on_cluster is not None:
            self.on_cluster(upstream, nodes)

    def _cluster_nodes(self, upstream: str, servers: list[str]) -> None:  # noqa: B027
        """What the relay learns from a cluster's node names (the gateway: routing)."""


class GatewayRelay(Relay):
    """An internet gateway's relay: agents of several servers, routed by their certificates,
    their HTTPS calls carried as requests, the servers' access lists applied here."""

    role = "gateway"
    channel = "core"
    _HANDLERS = {
        **Relay._HANDLERS,
        "response": "_on_response",
        "revoked": "_on_revoked",
        "pending": "_on_pending",
    }

    def __init__(
        self,
        clock: Any,
        max_clients: int,
        upstreams: list[str],
        task_server_upstreams: list[str] | tuple[str, ...] = (),
        request_timeout: float = REQUEST_TIMEOUT,
    ):
        super().__init__(clock, max_clients, upstreams)
        self.routing = GatewayRouting(self.links, list(task_server_upstreams))
        self.access = AccessLists()
        self.requests = PendingRequests(clock, request_timeout)

    # -- agents --------------------------------------------------------------------------
    def admit(self, agent_id: str, server: str | None, path: str | bytes) -> tuple[Any, Any]:
        task_server = wanted_task_server(path)
        if task_server is not None:
            upstream, refusal = self.routing.route_task_server(server, task_server)
        else:
            upstream, refusal = self.routing.route(server, wanted_upstream(path))
        if refusal is None:
            refusal = self.refusal(agent_id, upstream)
        return (None, refusal) if refusal is not None else (upstream, None)

    def admit_call(
        self, agent_id: str | None, server: str | None, wanted: str | None
    ) -> tuple[Any, Any]:
        """Where an agent's HTTPS call goes (`wanted`: the upstream its URL names), or why
        it is refused: (upstream, None) or (None, (status, reason))."""
        upstream, refusal = self.routing.route(server, wanted)
        if refusal is None and upstream is not None:
            refusal = self.refusal(agent_id, upstream, new_session=False)
        return (None, refusal) if refusal is not None else (upstream, None)

    def _barred(self, agent_id: str | None, upstream: str) -> Refusal | None:
        return self.access.refusal(agent_id, self.routing.lists_of(upstream))

    def request(
        self, upstream: str, agent_id: str | None, peer: str, envelope: bytes
    ) -> Deferred[bytes]:
        """Carry an agent's HTTPS call to its server (the node its sessions are on, or the
        spread's choice); fires with the response envelope."""
        up = self.link_for(upstream, agent_id)
        r, d = self.requests.start(upstream, up)
        self.counters.to_server(envelope)
        up.send({"t": "request", "r": r, "agent": agent_id, "peer": peer}, envelope)
        return d

    def revoke(self, upstream: str, agent_ids: list[str], full: bool = False) -> int:
        """Agents that server revoked: refused from now on, their live sessions closed."""
        ids = self.access.revoke(upstream, agent_ids, full)
        n = 0
        for conn in self.conns:
            if (
                conn.agent_id in ids
                and self.routing.lists_of(self.conns.upstream_of(conn)) == upstream
            ):
                conn.sendClose(codes.CLOSE_REVOKED, codes.CLOSE_REASONS[codes.CLOSE_REVOKED])
                n += 1
        if ids:
            self._log.info(
                "{upstream}: {n} agents revoked, {c} sessions closed",
                upstream=upstream,
                n=len(ids),
                c=n,
            )
        return n

    def set_pending(
        self, upstream: str, agent_ids: list[str], approved: list[str], full: bool = False
    ) -> None:
        """Agents that server has not approved yet: refused until it says they are."""
        self.access.set_pending(upstream, agent_ids, approved, full)

    # -- upstreams -----------------------------------------------------------------------
    def link_up(
        self,
        name: str,
        link: Any,
        server: str | None = None,
        role: str = "server",
        node: str | None = None,
        key: Any = None,
    ) -> str | None:
        problem = self.routing.accept(name, server, role, node)
        if problem is not None:
            return problem
        self.links.up(name, link, key)
        # a task server's link changes what every server's agents reach; a server node's
        # link tells every node of its upstream (its server's name may be the one a task
        # server named: what the upstream reaches may change); a node hears only changes
        self.announce_reach(None if role == "taskserver" else name)
        return None

    def announce_reach(self, only: str | None = None, link: Any = None) -> None:
        """Tell each management server (every node of a cluster; only `link` when given)
        which of its task servers this gateway links to."""
        for name, reach in self.routing.reach(only).items():
            for up in [link] if link is not None else self.links.all(name):
                up.send({"t": "reach", "task_servers": reach})

    def _link_gone(self, name: str, link: Any = None) -> None:
        if not self.links.is_up(name) and self.routing.forget(name):
            self.announce_reach()
        self.requests.lose(name, link)

    def _passes_node(self, upstream: str) -> bool:
        return upstream in self.routing.ts_names

    def _cluster_nodes(self, upstream: str, servers: list[str]) -> None:
        for server in self.routing.learn(upstream, servers):
            self._log.warn(
                "cluster node {server} of upstream {upstream} is another upstream's server",
                server=server,
                upstream=upstream,
            )
        # a task server linked to one of these nodes now counts for this upstream
        self.announce_reach(upstream)

    def _on_response(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        if self.requests.answer(header["r"], upstream, payload, via):
            self.counters.to_agents(payload)

    def _on_revoked(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        self.revoke(upstream, header["agents"], bool(header.get("full")))

    def _on_pending(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        self.set_pending(
            upstream, header["agents"], header.get("approved", []), bool(header.get("full"))
        )


class TaskServerRelay(Relay):
    """A task server's relay: one upstream (its management server), agents' task sessions,
    and those the gateways its server names carry here."""

    role = "task server"
    channel = "task"
    UPSTREAM = "server"
    _HANDLERS = {**Relay._HANDLERS, "nodes": "_on_nodes"}

    def __init__(self, clock: Any, max_clients: int):
        super().__init__(clock, max_clients, [self.UPSTREAM])
        self.node_name: str | None = None  # this task server's name
        self.server_name: str | None = None  # its server's, from the welcome
        self.gateways = GatewayLinks()

    def admit(self, agent_id: str, server: str | None, path: str | bytes) -> tuple[Any, Any]:
        refusal = self.refusal(agent_id)
        return (None, refusal) if refusal is not None else (self.UPSTREAM, None)

    def gateway_links(self) -> dict[str, Any]:
        return self.gateways.links

    def link_up(
        self,
        name: str,
        link: Any,
        server: str | None = None,
        role: str = "server",
        node: str | None = None,
        key: Any = None,
    ) -> str | None:
        if role != "server":
            return (
                f"upstream {name!r} is task server {node!r}, not a management server: "
                "give the management server's URL"
            )
        self.server_name = server
        self.links.up(name, link, key)
        return None

    def _link_gone(self, name: str, link: Any = None) -> None:
        """Nothing else: the gateways' links stay up, and what they open is refused (no link)
        until the server's link is back."""

    def _on_nodes(
        self, upstream: str, header: dict[str, Any], payload: bytes, via: Any = None
    ) -> None:
        """The gateways this task server may accept (from its server); links of others go."""
        self.gateways.set_allowed(header["gateways"], header.get("previous"))


def _send(conn: Any, payload: bytes) -> None:
    """A frame to an agent's connection; one closed meanwhile (its close begun by a drain, or
    by the agent, before the table forgot it) gets nothing, and the frame is not an error:
    the agent reconnects and the server sends what it still owes it."""
    try:
        conn.sendMessage(payload, isBinary=False)
    except Disconnected:
        pass
