"""The task server: a relay node for agents' task-client sessions.

On first start it enrolls with the management server (a one-time token from `tcm taskservers
enroll NAME`), then keeps its link to the server up and accepts agents on `/task/v1/ws`
(WSS, mutual TLS with the agents' certificates). Tasks for its agents come over the link once
per push and fan out here; results and output go back the same way. See docs/architecture.md.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from autobahn.twisted.resource import WebSocketResource
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from tcm.heap import HeapSettler
from tcm.httplimits import limited_site
from tcm.process import raise_descriptor_limit
from tcm.protocol import codes, link
from tcm.relay.downstream import DownLinkFactory
from tcm.relay.edge import EdgeFactory
from tcm.relay.node import (
    NodeEnrollmentError,
    NodeRenewal,
    NodeService,
    NodeState,
    Running,
    any_issuer,
    client_endpoint,
    enroll_any,
    https_issuer,
)
from tcm.relay.relays import TaskServerRelay
from tcm.relay.upstream import UpstreamFactory, upstream_service
from tcm.taskserver import WS_PATH
from tcm.tls.endpoints import listeners, port_description
from tcm.tls.handshake import HandshakeLogger
from tcm.tls.identity import Identity
from tcm.tls.renewal import DEFAULT_FRACTION
from tcm.tls.resumption import ResumptionKeys


@attrs.define
class TaskServerConfig:
    state_dir: str
    server: str | None = None  # the management server's URL
    # the other nodes of its cluster (the task server links to every node, and to each node
    # the cluster names later)
    servers: list[str] = attrs.field(factory=list)
    port: int = 8444
    interface: str = "127.0.0.1"
    listen: list[str] = attrs.field(factory=list)  # endpoint strings (empty: port/interface)
    hostnames: list[str] = attrs.field(factory=list)
    ca_cert: str | None = None  # the tcm CA (for enrollment)
    token: str | None = None  # NAME.SECRET from `tcm taskservers enroll NAME`
    max_clients: int = 5000
    keepalive: float = 50.0  # what agents are told to ping at comes from the server
    drain_grace: float = 2.0  # seconds between telling agents to go and stopping
    renew_fraction: float = DEFAULT_FRACTION  # of the node certificate's life, then renewed
    metrics_port: int | None = None  # /metrics and /status on loopback
    tls_groups: str | None = None  # key exchange groups (None: OpenSSL's default list)

    def url(self) -> str:
        host = self.hostnames[0] if self.hostnames else self.interface
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"wss://{host}:{self.port}{WS_PATH}"


def edge_site(resource: Resource, gateway_links: Resource | None = None) -> Site:
    """/task/v1/ws for agents; /link/v1/ws for gateways carrying their agents' sessions."""
    root = Resource()
    for path, child in ((b"task", resource), (b"link", gateway_links)):
        if child is None:
            continue
        top, v1 = Resource(), Resource()
        root.putChild(path, top)
        top.putChild(b"v1", v1)
        v1.putChild(b"ws", child)
    return limited_site(root, 60)  # lines and bodies over limits: 431/413 at once


class TaskServerService(NodeService):
    """Enroll if needed; then the edge listener, the link and the keepalive sweep."""

    _log = Logger()
    what = "task server"
    # the agents' listener's TLS record: failures, handshakes by kind (set by build)
    handshakes: HandshakeLogger | None = None

    def __init__(self, config: TaskServerConfig, reactor: Any = None):
        super().__init__(reactor)
        reactor = self.reactor
        self.config = config
        self.state = NodeState(config.state_dir)
        self.relay = TaskServerRelay(reactor, config.max_clients)
        self.relay.on_cluster = self.cluster_told
        self.relay.on_welcomed = self.welcomed
        self.node_name: str | None = None
        self.identity: Identity | None = None  # its node certificate, renewed in place
        self.renewal: NodeRenewal | None = None

    @inlineCallbacks
    def _prepare(self):
        cfg = self.config
        if not self.state.enrolled():
            if not (cfg.server and cfg.token and cfg.ca_cert):
                raise NodeEnrollmentError(
                    "not enrolled yet: give --server, --ca-cert and --token "
                    "(from `tcm taskservers enroll NAME`)"
                )
            with open(cfg.ca_cert, "rb") as f:
                ca_pem = f.read()
            names = sorted({cfg.interface, *cfg.hostnames} - {"0.0.0.0", "::", ""})
            yield enroll_any(
                self.reactor, self.state, self.addresses_of(), ca_pem, cfg.token, names
            )
        meta = self.state.meta()
        self.node_name = self.relay.node_name = meta["name"]
        server = cfg.server or meta["server"]
        self.identity = identity = self.state.identity()
        self.build(server, identity)
        self.renew_with(
            any_issuer(
                lambda: self.node_addresses(TaskServerRelay.UPSTREAM),
                lambda address: https_issuer(self.reactor, address, identity),
            )
        )

    def addresses_of(self, name: str = TaskServerRelay.UPSTREAM) -> list[str]:
        """Its server's configured addresses: --server, then the cluster's other nodes."""
        cfg = self.config
        first = cfg.server or self.state.meta().get("server")
        return [u for u in [first, *cfg.servers] if u]

    def renew_with(self, issue: Any) -> None:
        """Renew the node certificate through `issue` when it is due (started with the
        node); new connections, both ways, present the renewed one."""
        assert self.identity is not None
        self.renewal = NodeRenewal(
            self.reactor, self.state, self.identity, issue, self.config.renew_fraction
        )
        Running(self.renewal).setServiceParent(self)

    def build(self, server: str, identity: Identity) -> None:
        cfg = self.config
        assert self.node_name is not None
        # agents' TLS ends here: this task server seals their resumption tokens and resumes
        # the handshakes that offer one, with its own keys (STATE_DIR/resumption.key)
        keys = ResumptionKeys.of_state_dir(cfg.state_dir)
        edge = EdgeFactory(self.relay, cfg.url(), resumption=keys)
        gateways = DownLinkFactory(self.relay, cfg.url().replace(WS_PATH, link.WS_PATH))
        site = edge_site(_resource(WebSocketResource(edge)), _resource(WebSocketResource(gateways)))
        # TLS failures logged and handshakes counted by kind, as the server's and gateway's
        self.handshakes = HandshakeLogger(site)
        for listener in listeners(
            self.reactor,
            cfg.listen or [port_description(cfg.port, cfg.interface)],
            identity.server_tls([identity.ca_pem], cfg.tls_groups, (keys, self.reactor.seconds)),
            self.handshakes,
        ):
            listener.setServiceParent(self)
        for address in [server, *[u for u in cfg.servers if u != server]]:
            self.add_link(address, identity, cfg.url())
        TimerService(cfg.keepalive, self._sweep).setServiceParent(self)
        HeapSettler(lambda: len(self.relay.conns)).setServiceParent(self)  # tcm/heap.py
        if cfg.metrics_port is not None:
            from twisted.internet.endpoints import TCP4ServerEndpoint

            from tcm.relay.metrics import relay_metrics_site

            StreamServerEndpointService(
                TCP4ServerEndpoint(self.reactor, cfg.metrics_port, interface="127.0.0.1"),
                relay_metrics_site(
                    "tcm_taskserver",
                    f"tcm task server {self.node_name}",
                    self.relay,
                    self.handshakes,
                ),
            ).setServiceParent(self)

    def add_link(self, server: str, identity: Identity, url: str):
        """Link to its server at `server` (one node of a cluster), kept up by its own
        service (started at once when the task server runs already)."""
        from urllib.parse import urlsplit

        assert self.node_name is not None
        host = urlsplit(server).hostname or "127.0.0.1"
        tls = identity.tls_options(host)
        factory = UpstreamFactory(
            self.relay, server, self.node_name, "taskserver", url, node_key=server
        )
        svc = upstream_service(self.reactor, client_endpoint(self.reactor, server, tls), factory)
        name = TaskServerRelay.UPSTREAM
        self.links.setdefault(name, {})[server] = factory
        self.link_services.setdefault(name, {})[server] = svc
        svc.setServiceParent(self)

    def add_link_to(self, name: str, url: str) -> None:
        assert self.identity is not None
        self.add_link(url, self.identity, self.config.url())

    def started(self) -> None:
        self._log.info(
            "task server {name}: agents at {url}, at most {n} clients",
            name=self.node_name,
            url=self.config.url(),
            n=self.config.max_clients,
        )

    def _sweep(self) -> None:
        cfg = self.config
        self.relay.sweep(self.reactor.seconds() - (2 * cfg.keepalive + 20.0))

    def stopService(self):
        """Drain: tell the agents to reconnect elsewhere, give them a moment, then stop."""
        service.Service.stopService(self)
        n = self.relay.close_all(codes.CLOSE_DRAIN)
        from twisted.internet.defer import DeferredList, maybeDeferred
        from twisted.internet.task import deferLater

        wait: Deferred = deferLater(
            self.reactor, min(self.config.drain_grace, 1.0) if n else 0, lambda: None
        )
        if n:
            self._log.info("draining: told {n} agents to reconnect elsewhere", n=n)

        def stop_children(_):
            return DeferredList(
                [maybeDeferred(c.stopService) for c in reversed(list(self)) if c.running]
            )

        return wait.addCallback(stop_children)


class EmbeddedTaskServer(TaskServerService):
    """The task server of the all-in-one `twistd tcm`: same relay and link, but its agent
    endpoint is mounted on the management server's own site (one port), and its identity
    comes straight from the server's CA (registered as node `local`, no token)."""

    NAME = "local"

    def __init__(self, server: Any, max_clients: int = 5000):
        cfg = server.config
        super().__init__(
            TaskServerConfig(
                state_dir=os.path.join(cfg.state_dir, "taskserver"),
                port=cfg.port,
                interface=cfg.interface,
                hostnames=list(cfg.hostnames),
                max_clients=max_clients,
                keepalive=cfg.keepalive,
            ),
            server.reactor,
        )
        self.server = server  # the EmbeddingServer of tcm/server/service.py

    @inlineCallbacks
    def _prepare(self):
        server, state = self.server, self.state
        old = state.read("cert.pem")
        cert_pem = yield server.node_certificate(self.NAME, "taskserver", state.key_pem(), old)
        if cert_pem != old:
            state.store_identity(self.NAME, "taskserver", "", server.ca_pem, cert_pem)
        self.node_name = self.relay.node_name = self.NAME
        cfg = self.config
        host = cfg.interface if cfg.interface not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = f"https://{f'[{host}]' if ':' in host else host}:{cfg.port}"
        # its agents' TLS ends at the server's listener: their tokens are the server's
        edge = EdgeFactory(self.relay, cfg.url(), resumption=server.resumption)
        task = Resource()
        v1 = Resource()
        server.root.putChild(b"task", task)
        task.putChild(b"v1", v1)
        v1.putChild(b"ws", WebSocketResource(edge))
        self.identity = identity = Identity(server.ca_pem, cert_pem, state.key_pem())
        self.add_link(url, identity, cfg.url())
        TimerService(cfg.keepalive, self._sweep).setServiceParent(self)  # the server settles
        self.renew_with(
            lambda csr: server.renew_node_certificate(self.NAME, identity.cert_pem, csr)
        )


def _resource(r: Any) -> Resource:
    return r


def make_taskserver_service(config: TaskServerConfig, reactor: Any = None) -> TaskServerService:
    limit = raise_descriptor_limit()
    Logger().info("this process may hold about {n} connections (descriptor limit)", n=limit)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    return TaskServerService(config, reactor)
