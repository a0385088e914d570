"""The gateway service: enroll with each upstream, listen for agents, keep the links up.

State directory:
    upstreams/NAME/    one node identity per upstream management server (tcm/relay/node.py's)
    cert.pem, key.pem  optional: the admin's certificate for the agents' side (--cert/--key)
    resumption.key     the secret of the agents' resumption tokens (tcm.tls.resumption);
                       gateways that answer at one name hold copies of one

Agent-facing paths (one TLS port, client certificates from the tcm CA):
    /agent/v1/ws                 an agent's own (core) session -> the server in its certificate
    /taskserver/TS/task/v1/ws    its task-client session -> the link to task server TS
    /task/v1/ws                  its task-client session when it has no task server reachable
                                 from here -> its server's link, channel task
    /agent/v1/...                its HTTPS calls (fallback, long-polls) -> `request` link messages
    /upstream/NAME/agent/v1/...  the same, naming the upstream: enrollment (no certificate yet)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any
from urllib.parse import urlsplit

import attrs
from autobahn.twisted.resource import WebSocketResource
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from zope.interface import implementer

from tcm.compat import LeanTLSFactory
from tcm.gateway.forward import AgentApiForwarder
from tcm.heap import HeapSettler
from tcm.httplimits import limited_site
from tcm.process import raise_descriptor_limit
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
from tcm.relay.relays import GatewayRelay
from tcm.relay.upstream import UpstreamFactory, upstream_service
from tcm.tls.endpoints import listeners, port_description
from tcm.tls.handshake import HandshakeLogger
from tcm.tls.identity import Identity
from tcm.tls.renewal import DEFAULT_FRACTION, FollowRenewals
from tcm.tls.resumption import ResumptionKeys
from tcm.tls.server import server_tls_options


@attrs.define
class GatewayConfig:
    state_dir: str
    upstreams: list[tuple[str, str]]  # (NAME, https://SERVER:PORT), the first is the default
    # NAME -> every address of that upstream when it is a cluster of server nodes (the one
    # in `upstreams` first); the gateway links to each, and to nodes the cluster names later
    addresses: dict[str, list[str]] = attrs.field(factory=dict)
    tokens: dict[str, str] = attrs.field(factory=dict)  # NAME -> NODE.SECRET (first start)
    # task server upstream -> the management server upstream whose identity it is linked with
    # (default: the first management server upstream)
    upstream_servers: dict[str, str] = attrs.field(factory=dict)
    port: int = 8445
    interface: str = "127.0.0.1"
    listen: list[str] = attrs.field(factory=list)  # endpoint strings (empty: port/interface)
    hostnames: list[str] = attrs.field(factory=list)
    ca_cert: str | None = None  # the tcm CA (for enrollment)
    cert: str | None = None  # the admin's certificate for the agents' side ...
    key: str | None = None  # ... and its key (default: the node certificate)
    max_clients: int = 19000
    keepalive: float = 50.0
    renew_fraction: float = DEFAULT_FRACTION  # of the node certificates' life, then renewed
    drain_grace: float = 5.0  # seconds between telling agents to go and stopping
    metrics_port: int | None = None  # /metrics and /status on loopback (+ worker number)
    tls_groups: str | None = None  # key exchange groups (None: OpenSSL's default list)
    workers: int = 1
    worker: int | None = None  # set in worker processes the first one starts
    max_message_size: int = 1024 * 1024

    def url(self) -> str:
        host = self.hostnames[0] if self.hostnames else self.interface
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"wss://{host}:{self.port}/agent/v1/ws"


class GatewayRoot(Resource):
    """The agents' tree: WebSocket endpoints, the relayed agent API, /upstream/NAME/..."""

    def __init__(self, relay: GatewayRelay, core_ws: Any, task_ws: Any, max_body: int):
        super().__init__()
        self.relay = relay
        self.core_ws = core_ws
        self.task_ws = task_ws
        self.forward = AgentApiForwarder(relay, max_body)
        self.named = {n: AgentApiForwarder(relay, max_body, wanted=n) for n in relay.links.names}

    def getChild(self, path, request):
        parts = [path, *request.postpath]
        forward = self.forward
        if path == b"upstream" and request.postpath:
            name = request.postpath[0].decode("ascii", "replace")
            if name not in self.named:
                return _NotFound(f"no upstream {name!r} at this gateway")
            forward = self.named[name]
            parts = parts[2:]
        elif path == b"taskserver" and len(request.postpath) == 4:
            parts = parts[2:]  # /taskserver/NAME/task/v1/ws: the edge routes it by NAME
            if parts != [b"task", b"v1", b"ws"]:
                return _NotFound()
        if parts[:3] in ([b"agent", b"v1", b"ws"], [b"task", b"v1", b"ws"]) and len(parts) == 3:
            set_timeout = getattr(request.channel, "setTimeout", None)
            if set_timeout is not None:
                set_timeout(None)  # the WebSocket takes the connection over
            return self.core_ws if parts[0] == b"agent" else self.task_ws
        if parts[:2] == [b"agent", b"v1"] and (path != b"upstream" or forward is not self.forward):
            return forward
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, why: str = "not a path of this gateway"):
        super().__init__()
        self.why = why

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": self.why}).encode()


@implementer(IStreamServerEndpoint)
class ReusePortTLSEndpoint:
    """A TLS listener on a port several processes share (SO_REUSEPORT): the kernel spreads
    new connections over the worker processes, each with its own descriptor limit."""

    def __init__(self, reactor: Any, port: int, tls: Any, interface: str, backlog: int):
        self.reactor, self.port, self.tls = reactor, port, tls
        self.interface, self.backlog = interface, backlog

    def listen(self, factory: Any) -> Deferred:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.interface, self.port))
        sock.listen(self.backlog)
        sock.setblocking(False)
        try:
            port = self.reactor.adoptStreamPort(
                sock.fileno(), family, LeanTLSFactory(self.tls, False, factory)
            )
        finally:
            sock.close()  # the reactor holds its own copy of the descriptor
        return succeed(port)


class GatewayService(NodeService):
    """Enroll where needed; then the agents' listener, the upstream links, the sweep, the
    metrics site; drain on stop."""

    settles_heap = True  # a process of its own (tcm/heap.py); the all-in-one's server does
    # the agents' listener's TLS record: failures, handshakes by kind (set by build)
    handshakes: HandshakeLogger | None = None

    _log = Logger()
    what = "gateway"

    def __init__(self, config: GatewayConfig, reactor: Any = None):
        super().__init__(reactor)
        reactor = self.reactor
        self.config = config
        self.states = {
            name: NodeState(os.path.join(config.state_dir, "upstreams", name))
            for name, _ in config.upstreams
        }
        self.relay = GatewayRelay(
            reactor,
            config.max_clients,
            [n for n, _ in config.upstreams],
            task_server_upstreams=self.task_server_upstreams(),
        )
        # the node identity from each management server upstream, renewed in place
        self.identities: dict[str, Identity] = {}
        self.renewals: dict[str, NodeRenewal | FollowRenewals] = {}
        self.relay.on_cluster = self.cluster_told
        self.relay.on_welcomed = self.welcomed
        self.root: GatewayRoot | None = None
        self.children_procs: list[Any] = []
        self.started_at = reactor.seconds()
        self.metrics: Any = None

    def task_server_upstreams(self) -> list[str]:
        """Upstreams that are task servers: those this gateway neither enrolled with nor has
        a token for, when some other upstream is a management server. A task server takes
        the gateway's identity from its management server (`upstream_servers`)."""
        cfg = self.config
        servers = [n for n, _ in cfg.upstreams if self.states[n].enrolled() or n in cfg.tokens]
        named = set(cfg.upstream_servers)
        return [n for n, _ in cfg.upstreams if n not in servers and (servers or n in named)]

    def server_of(self, name: str) -> str:
        """The management server upstream whose node identity a link to `name` uses."""
        ts_names = self.relay.routing.ts_names
        if name not in ts_names:
            return name
        return self.config.upstream_servers.get(name) or next(
            n for n in self.relay.links.names if n not in ts_names
        )

    def identity_of(self, name: str) -> NodeState:
        """The node identity's files a link to this upstream is made with."""
        return self.states[self.server_of(name)]

    def issuer(self, name: str, url: str, identity: Identity) -> Any:
        """How the node identity from management server upstream `name` renews."""
        return any_issuer(
            lambda: self.node_addresses(name),
            lambda address: https_issuer(self.reactor, address, identity),
        )

    @inlineCallbacks
    def _prepare(self):
        cfg = self.config
        names = sorted({cfg.interface, *cfg.hostnames} - {"0.0.0.0", "::", ""})
        ts_names = self.relay.routing.ts_names
        for name in ts_names:
            server = cfg.upstream_servers.get(name)
            if server is not None and (server not in self.states or server in ts_names):
                raise NodeEnrollmentError(
                    f"--upstream-server {name}={server}: {server} is not a management server "
                    "upstream of this gateway"
                )
        for name in ts_names:
            if len(self.addresses_of(name)) > 1:
                raise NodeEnrollmentError(
                    f"--upstream {name}: a task server upstream takes one address, "
                    "not a list (a list is for the nodes of a management server's cluster)"
                )
        if len(ts_names) == len(cfg.upstreams):
            raise NodeEnrollmentError(
                "no management server among the upstreams: give --ca-cert and --upstream-token "
                "NAME=TOKEN (from `tcm gateways enroll NAME`) for at least one"
            )
        for name, url in cfg.upstreams:
            state = self.states[name]
            if state.enrolled() or name in ts_names:
                continue
            token = cfg.tokens.get(name)
            if not (token and cfg.ca_cert):
                raise NodeEnrollmentError(
                    f"upstream {name} is not enrolled yet: give --ca-cert and "
                    f"--upstream-token {name}=TOKEN (from `tcm gateways enroll NAME` on {url})"
                )
            with open(cfg.ca_cert, "rb") as f:
                ca_pem = f.read()
            yield enroll_any(self.reactor, state, self.addresses_of(name), ca_pem, token, names)
        self.build()

    def addresses_of(self, name: str) -> list[str]:
        return self.config.addresses.get(name) or [dict(self.config.upstreams)[name]]

    def build(self) -> None:
        cfg = self.config
        urls = dict(cfg.upstreams)
        cas: list[bytes] = []
        for name, state in self.states.items():
            if not state.enrolled():
                continue  # a task server's: its server's identity is used
            identity = self.identities[name] = state.identity()
            if identity.ca_pem not in cas:
                cas.append(identity.ca_pem)
            # the first worker (or the only process) renews; the others take the files
            if cfg.workers > 1 and cfg.worker:
                self.renewals[name] = FollowRenewals(self.reactor, state.dir, identity)
            else:
                self.renewals[name] = NodeRenewal(
                    self.reactor,
                    state,
                    identity,
                    self.issuer(name, urls[name], identity),
                    cfg.renew_fraction,
                )
            Running(self.renewals[name]).setServiceParent(self)
        # the agents' TLS ends here: this gateway seals their resumption tokens and resumes
        # the handshakes that offer one, with its own keys (not its servers')
        keys = self.resumption_keys()
        resumption = (keys, self.reactor.seconds)
        if cfg.cert and cfg.key:
            with open(cfg.cert, "rb") as f:
                cert_pem = f.read()
            with open(cfg.key, "rb") as f:
                key_pem = f.read()
            tls: Any = server_tls_options(
                key_pem, cert_pem, cas, groups=cfg.tls_groups, resumption=resumption
            )
        else:
            tls = self.identities[self.server_of(cfg.upstreams[0][0])].server_tls(
                cas, cfg.tls_groups, resumption
            )
        core = EdgeFactory(
            self.relay, cfg.url(), cfg.max_message_size, channel="core", resumption=keys
        )
        task = EdgeFactory(
            self.relay, cfg.url(), cfg.max_message_size, channel="task", resumption=keys
        )
        self.root = GatewayRoot(
            self.relay, WebSocketResource(core), WebSocketResource(task), cfg.max_message_size
        )
        # longer than the longest long-poll (60 s); lines and bodies over limits: 431/413
        site = limited_site(self.root, 90)
        self.handshakes = HandshakeLogger(site)  # TLS failures, counted by reason
        if cfg.workers > 1:
            endpoint = ReusePortTLSEndpoint(self.reactor, cfg.port, tls, cfg.interface, 4096)
            StreamServerEndpointService(endpoint, self.handshakes).setServiceParent(self)
        else:
            endpoints = cfg.listen or [port_description(cfg.port, cfg.interface)]
            for listener in listeners(self.reactor, endpoints, tls, self.handshakes):
                listener.setServiceParent(self)
        for name, _ in cfg.upstreams:
            for url in self.addresses_of(name):
                self.add_link_to(name, url)
        TimerService(cfg.keepalive, self._sweep).setServiceParent(self)
        # tcm/heap.py: full collections kept off the agents' connections, and the memory
        # their handshakes freed given back once they hold steady (as on the server)
        if self.settles_heap:
            HeapSettler(lambda: len(self.relay.conns)).setServiceParent(self)
        if cfg.metrics_port is not None:
            from tcm.gateway.metrics import GatewayMetrics, metrics_site_for

            self.metrics = GatewayMetrics(self)
            StreamServerEndpointService(
                TCP4ServerEndpoint(
                    self.reactor, cfg.metrics_port + (cfg.worker or 0), interface="127.0.0.1"
                ),
                metrics_site_for(self.metrics),
            ).setServiceParent(self)

    def resumption_keys(self) -> ResumptionKeys:
        """The keys of the agents' resumption tokens: this gateway's own, from
        STATE_DIR/resumption.key (made at the first start; its worker processes read the
        same file, and gateways that answer at one name share it as a copy)."""
        return ResumptionKeys.of_state_dir(self.config.state_dir)

    def add_link_to(self, name: str, url: str) -> None:
        """Link to upstream `name` at `url` (one node of it), kept up by its own service;
        started at once when the gateway runs already (a node its cluster named later)."""
        cfg = self.config
        state = self.identity_of(name)
        host = urlsplit(url).hostname or "127.0.0.1"
        client_tls = self.identities[self.server_of(name)].tls_options(host)
        factory = UpstreamFactory(
            self.relay,
            url,
            state.meta()["name"],
            "gateway",
            cfg.url(),
            upstream_name=name,
            worker=(cfg.worker or 0) if cfg.workers > 1 else None,
            node_key=url,
        )
        self.links.setdefault(name, {})[url] = factory
        svc = upstream_service(
            self.reactor, client_endpoint(self.reactor, url, client_tls), factory
        )
        self.link_services.setdefault(name, {})[url] = svc
        svc.setServiceParent(self)

    def cluster_told(self, name: str, nodes: dict[str, dict[str, Any]]) -> None:
        if name not in self.relay.routing.ts_names:  # a task server is no cluster
            super().cluster_told(name, nodes)

    def started(self) -> None:
        cfg = self.config
        self._log.info(
            "gateway{worker}: agents at {url} for {n} upstreams ({names}), at most {max} sessions",
            worker="" if cfg.worker is None else f" worker {cfg.worker}",
            url=cfg.url(),
            n=len(cfg.upstreams),
            names=", ".join(n for n, _ in cfg.upstreams),
            max=cfg.max_clients,
        )

    def _start_children(self, _):
        super()._start_children(_)
        cfg = self.config
        if self.running and cfg.workers > 1 and not cfg.worker:
            self._spawn_workers()

    def _spawn_workers(self) -> None:
        """Start workers 1..N-1: the same gateway in other processes on the same port."""
        from twisted.internet.protocol import ProcessProtocol

        argv = worker_argv(sys.argv)
        for k in range(1, self.config.workers):
            proc = self.reactor.spawnProcess(
                ProcessProtocol(),
                sys.executable,
                [sys.executable, *argv, "--worker-index", str(k)],
                env=os.environ,
                childFDs={0: 0, 1: 1, 2: 2},
            )
            self.children_procs.append(proc)
            self._log.info("worker {k} started (pid {pid})", k=k, pid=proc.pid)

    def _sweep(self) -> None:
        cfg = self.config
        self.relay.sweep(self.reactor.seconds() - (2 * cfg.keepalive + 20.0))

    def stopService(self):
        """Drain: refuse new agents, tell connected ones to reconnect elsewhere (4006), wait
        the grace period, then stop the listener and the links."""
        service.Service.stopService(self)
        for proc in self.children_procs:
            try:
                proc.signalProcess(signal.SIGTERM)
            except Exception:  # already gone
                pass
        n = self.relay.drain()
        if n:
            self._log.info(
                "draining: told {n} sessions to reconnect elsewhere (4006); stopping in {g} s",
                n=n,
                g=self.config.drain_grace,
            )
        wait: Deferred = deferLater(self.reactor, self.config.drain_grace if n else 0, lambda: None)

        def stop_children(_):
            return DeferredList(
                [maybeDeferred(c.stopService) for c in reversed(list(self)) if c.running]
            )

        return wait.addCallback(stop_children)


def worker_argv(argv: list[str]) -> list[str]:
    """A worker's command line from the first process's: the same twistd options (without
    pid and log files, in the foreground) and the same gateway options."""
    plugin = argv.index("tcm-gateway") if "tcm-gateway" in argv else len(argv)
    twistd: list[str] = []
    skip = False
    for a in argv[1:plugin]:
        if skip:
            skip = False
            continue
        if a in ("--pidfile", "--logfile", "-l"):
            skip = True
            continue
        if a.startswith(("--pidfile=", "--logfile=")) or a in ("-n", "--nodaemon"):
            continue
        twistd.append(a)
    gateway: list[str] = []
    for a in argv[plugin:]:
        if skip:
            skip = False
            continue
        if a == "--worker-index":
            skip = True
            continue
        if not a.startswith("--worker-index="):
            gateway.append(a)
    run = "from twisted.scripts.twistd import run; run()"
    return ["-c", run, "-n", "--pidfile=", *twistd, *gateway]


def make_gateway_service(config: GatewayConfig, reactor: Any = None) -> GatewayService:
    limit = raise_descriptor_limit()
    Logger().info("this process may hold about {n} connections (descriptor limit)", n=limit)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    return GatewayService(config, reactor)
