"""The management server's composition root: `make_server_service` builds the narrow services
and gives each consumer only the ones it uses.

    consumer               services it gets
    AdminAPI (/api/v1)     access, admission, presence, settings, jobs, targets, inventory,
                           audit, policies, profiles, nodes, certificates, packages
    AgentAPI (/agent/v1)   admission, presence, settings, jobs, policies, profiles
    NodeAPI (/link/v1)     nodes
    AgentServerFactory     hub, admission, settings (the agents' WebSocket endpoint)
    NodeLinkFactory        hub, nodes (the nodes' link endpoint)
    AgentHub               settings, presence, admission, nodes, jobs, policies, profiles,
                           requests (agent sessions and node links call it)
    ServerMetrics          presence, admission, nodes, jobs, dispatcher, handshakes

Each service takes the store area(s) it uses (`job_store=`, `agent_store=`, ...): the
components of one `Database` (tcm/store), `db.jobs`, `db.agents`, ...
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import attrs
from autobahn.twisted.resource import WebSocketResource
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

from tcm.heap import HeapSettler, load_then_settle
from tcm.httplimits import limited_site
from tcm.installpackage import WheelCache
from tcm.interfaces import (
    IAccessTokens,
    IAgentAdmission,
    IAgentPresence,
    IAudit,
    ICertificates,
    ICluster,
    IClusterBus,
    IEventHub,
    IInstallPackages,
    IInventory,
    IJobHistory,
    IJobs,
    INodeRegistry,
    IPolicies,
    IProfiles,
    IRuntimeSettings,
    ITargets,
)
from tcm.process import raise_descriptor_limit, stop_with_failure
from tcm.protocol import codes, link
from tcm.server import inventory as inventory_domain
from tcm.server.access import AccessTokens
from tcm.server.adminapi import AdminAPI, AdminServices
from tcm.server.admission import HandshakeGate
from tcm.server.agentapi import AgentAPI
from tcm.server.agentconfig import AgentConfigBook
from tcm.server.agents import AgentAdmission, AgentDirectory, AgentPresence
from tcm.server.audit import AuditLog
from tcm.server.ca import CertificateAuthority
from tcm.server.certificates import SERVER_CERT_CHECK, Certificates, ServerTLS
from tcm.server.cluster.bus import RedisBus
from tcm.server.cluster.node import ClusterEvents, ClusterNode
from tcm.server.cluster.secrets import ClusterIdentity, join, load_or_create_key
from tcm.server.config import ServerConfig
from tcm.server.console import ConsoleResource
from tcm.server.dispatcher import Dispatcher
from tcm.server.events import EventHub
from tcm.server.history import JobHistory, SizeLimits
from tcm.server.hub import AgentHub, AgentRequests
from tcm.server.intake import IntakeBudget
from tcm.server.jobservice import JobService
from tcm.server.links import NodeLinkFactory
from tcm.server.metrics import ServerMetrics, server_metrics_site
from tcm.server.nodeapi import NodeAPI
from tcm.server.noderegistry import NodeRegistry
from tcm.server.nodes import TaskServerAssignments
from tcm.server.packages import InstallPackages
from tcm.server.policies import PolicyService
from tcm.server.profiles import ProfileService
from tcm.server.selection import InventoryService, TargetService
from tcm.server.settings import RuntimeSettings
from tcm.server.web import ApiWithWebSocket
from tcm.server.websocket import AgentServerFactory
from tcm.store import Database
from tcm.tls import pki
from tcm.tls.endpoints import TLSServerEndpoint, listeners, parse, port_description
from tcm.tls.handshake import HandshakeLogger
from tcm.tls.resumption import ResumptionKeys

__all__ = ["ServerConfig", "ServerService", "make_server_service"]

T = TypeVar("T")


def provides(interface: InterfaceClass, obj: T) -> T:
    """`obj`, checked to provide `interface` (zope verifyObject) where it is wired."""
    verifyObject(interface, obj)
    return obj


@attrs.frozen
class EmbeddingServer:
    """What the all-in-one's embedded task server and gateway (tcm/allinone.py) use of this
    server: its settings and name, the resource tree the task server mounts `/task` on, the
    CA certificate, node identities issued straight by its CA (no token), and the keys of
    its agents' resumption tokens."""

    config: ServerConfig
    reactor: Any
    clock: Any
    name: str
    root: Resource
    _nodes_store: Any  # the access area: register_node, enroll_node, list_nodes
    _ca: CertificateAuthority
    _reload_nodes: Callable[[], Deferred[None]]
    _renew_node: Callable[[str, Any, str], Deferred[dict[str, str]]]
    # the keys of the resumption tokens of this process's listeners: the embedded task
    # server's agents come through the server's, and the embedded gateway's are as trusted
    resumption: ResumptionKeys | None = None

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem

    @inlineCallbacks
    def renew_node_certificate(self, name: str, cert_pem: bytes, csr_pem: bytes):
        """An embedded node's renewal, as `POST /link/v1/renew` would do it: the new
        certificate (PEM) for the CSR's key."""
        reply = yield self._renew_node(name, pki.load_certificate(cert_pem), csr_pem.decode())
        return reply["certificate"].encode()

    @inlineCallbacks
    def node_certificate(
        self,
        name: str,
        role: str,
        key_pem: bytes,
        cert_pem: bytes | None,
        server_names: Sequence[str] = (),
    ):
        """The certificate of embedded node `name` (role "taskserver" or "gateway"):
        `cert_pem` while the store knows the node with it (and it names `server_names`),
        else a new one for `key_pem`, signed by the CA and registered as the node's."""
        records = {r["name"]: r for r in (yield self._nodes_store.list_nodes())}
        record = records.get(name)
        if (
            cert_pem is not None
            and record is not None
            and record.get("fingerprint") == pki.fingerprint(pki.load_certificate(cert_pem))
            and pki.names_in(cert_pem, server_names)
        ):
            return cert_pem
        csr = pki.make_csr(pki.load_key(key_pem), common_name=link.NODE_PREFIX + name)
        cert_pem = self._ca.sign_csr(
            csr,
            link.NODE_PREFIX + name,
            lifetime=datetime.timedelta(seconds=self.config.node_cert_lifetime),
            client=True,
            server_names=server_names,
        )
        now = self.clock.seconds()
        secret = yield self._nodes_store.register_node(name, role, None, 60.0, now)
        fingerprint = pki.fingerprint(pki.load_certificate(cert_pem))
        yield self._nodes_store.enroll_node(name, secret, fingerprint, now)
        yield self._reload_nodes()
        return cert_pem


@attrs.frozen
class ServerParts:
    """What make_server_service built, by name: for tests and introspection. No part is
    handed this; each gets only its own services."""

    config: ServerConfig
    clock: Any
    db: Database
    certificates: Certificates
    access: AccessTokens
    settings: RuntimeSettings
    presence: AgentPresence
    admission: AgentAdmission
    nodes: NodeRegistry
    dispatcher: Dispatcher
    jobs: JobService
    targets: TargetService
    inventory: InventoryService
    agent_config: AgentConfigBook
    policies: PolicyService
    profiles: ProfileService
    audit: AuditLog
    history: JobHistory
    hub: AgentHub
    site: Site
    admin_api: AdminAPI
    agent_api: AgentAPI
    handshakes: HandshakeLogger
    intake: IntakeBudget


class ServerService(service.MultiService):
    """Starts the services (store, migrations, working set) before listening; at a stop,
    tells the agents it restarts and closes the store last."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        start: Callable[[], Deferred[None]],
        stop: Callable[[], None],
        presence: AgentPresence,
    ):
        super().__init__()
        self.reactor = reactor
        self._start = start
        self._stop = stop
        self._presence = presence

    parts: ServerParts  # set by make_server_service
    embedding: EmbeddingServer  # set by make_server_service
    listeners: list[Any]  # the listen endpoints (StreamServerEndpointServices), closed first
    admin_handshakes: HandshakeLogger  # the admin listener's TLS failures (no gate)

    def add_listeners(
        self,
        config: ServerConfig,
        certificates: Certificates,
        factory: Any,
        site: Site,
        resumption: ResumptionKeys | None = None,
    ) -> None:
        """Every listen address (tcm/tls/endpoints.py): `tcm:` ones with this server's
        certificate and its CA for client certificates, serving `factory`; plain ones (an
        admin API behind a TLS-terminating proxy) serve `site` without TLS, where no agent
        certificate can be presented. `resumption`: the keys of the welcomes' resumption
        tokens, to resume handshakes that offer one."""
        # the admin listener's address is one of the names the certificate must carry
        admin_names = [
            e.address[0]
            for e in (parse(self.reactor, d, "--admin-listen") for d in config.admin_listen)
            if isinstance(e, TLSServerEndpoint) and e.address is not None and e.address[0]
        ]
        named = attrs.evolve(config, hostnames=[*config.hostnames, *admin_names])
        tls = ServerTLS(
            certificates, named, None if resumption is None else (resumption, self.reactor.seconds)
        )
        # the self-made certificate renews itself before it expires, for new connections
        TimerService(SERVER_CERT_CHECK, tls.check).setServiceParent(self)
        endpoints = config.listen or [port_description(config.port, config.interface)]
        self.listeners = listeners(self.reactor, endpoints, tls, factory, site)
        # The admin listener: the same site and TLS, without the agents' admission gate (a
        # handshake flood on the agents' port waits there, not here).
        self.admin_handshakes = HandshakeLogger(site, None)
        self.listeners += listeners(
            self.reactor, config.admin_listen, tls, self.admin_handshakes, site
        )
        for listener in self.listeners:
            listener.setServiceParent(self)

    def privilegedStartService(self):
        # twistd binds ports here, before startService; the listener binds in startService
        # below instead, once the store is migrated and the working set loaded.
        service.Service.privilegedStartService(self)

    def startService(self):
        # Listen only once the store is migrated and the working set loaded.
        service.Service.startService(self)
        d = self._start()
        d.addCallback(lambda _: [child.startService() for child in self if self.running])
        d.addErrback(self._fatal)

    def _fatal(self, f):
        Logger().failure("server failed to start", f)
        stop_with_failure(self.reactor)

    def stopService(self):
        service.Service.stopService(self)
        self.parts.hub.stop_rebalancing()  # no agent is moved while the server stops
        # No new connection from here on: an agent told 4012 that came back within the
        # grace below would be served by a server about to go, and its session (a welcome
        # ends the agent's restart hint) then dropped without a 4012: it would climb its
        # backoff ladder. Refused now, it tries again every few seconds until the next
        # server listens.
        unlistened = [maybeDeferred(s.stopService) for s in self.listeners if s.running]
        # Tell the agents this is a restart: they come back every few seconds rather than
        # climbing their backoff while the server is away (docs/protocol.md, 4012). The
        # close frames need the reactor to go out: wait (a little) for the closes to finish.
        told, written = self._presence.closing_all(codes.CLOSE_RESTARTING)
        closed = self._presence.sessions_gone(self.RESTART_GRACE) if told else succeed(0)

        def gone(left: int) -> Deferred:
            if told:
                self._log.info(
                    "{n} sessions closed, {left} left to the reactor's shutdown",
                    n=told - left,
                    left=left,
                )
            # the agents' last-seen write of closing_all, before the store closes
            return written.addErrback(lambda f: None)

        def stop_children(_):
            # the listeners are stopping already: a second stopService would cancel their
            # stopListening (an unhandled CancelledError)
            others = [c for c in reversed(list(self)) if c.running and c not in self.listeners]
            return DeferredList(unlistened + [maybeDeferred(c.stopService) for c in others])

        def stopped(_):
            self._stop()

        return closed.addCallback(gone).addCallback(stop_children).addBoth(stopped)

    RESTART_GRACE = 2.0  # most seconds a stop waits for the agents to take their 4012


def _resource_tree(
    admin_api: Resource,
    agent_api: Resource,
    agent_ws: AgentServerFactory,
    node_api: Resource,
    link_ws: NodeLinkFactory,
) -> Resource:
    """/api/v1 (admins), /agent/v1 and its `ws` (agents), /link/v1 and its `ws` (nodes)."""
    root = Resource()
    api = Resource()
    root.putChild(b"api", api)
    api.putChild(b"v1", admin_api)
    agent = Resource()
    root.putChild(b"agent", agent)
    agent.putChild(b"v1", ApiWithWebSocket(agent_api, WebSocketResource(agent_ws)))
    links = Resource()
    root.putChild(b"link", links)
    ws: Any = WebSocketResource(link_ws)
    links.putChild(b"v1", ApiWithWebSocket(node_api, ws))
    return root


def make_server_service(config: ServerConfig, reactor: Any = None) -> ServerService:
    """The management server: its services, wired, under one twistd service."""
    limit = raise_descriptor_limit()
    Logger().info("this process may hold about {n} connections (descriptor limit)", n=limit)
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    clock = reactor
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    name = config.name or _load_or_create_name(config.state_dir)
    db = Database(config.database_url, reactor=reactor)
    db.inventory.history = config.inventory_history
    identity = _join_cluster(config, db, name) if config.clustered else None

    # -- the services, each with the store area(s) and the services it uses ---------------
    ca = CertificateAuthority.load_or_create(config.state_dir)
    certificates = provides(ICertificates, Certificates(ca, unit=name))
    access = provides(
        IAccessTokens,
        AccessTokens(db.access, _load_or_create_admin_token(config.state_dir), clock),
    )
    settings = provides(IRuntimeSettings, RuntimeSettings(config, db.settings))
    presence = provides(
        IAgentPresence,
        AgentPresence(clock, settings, db.agents, config.keepalive, config.keepalive_timeout),
    )
    settings.when_persistent_off(presence.persistent_switched_off)
    directory = AgentDirectory()  # the known agents, in memory: checked on every request
    assignments = TaskServerAssignments(config.taskserver_policy, config.taskserver_max_clients)
    nodes = provides(
        INodeRegistry,
        NodeRegistry(
            db.access, certificates, assignments, clock, config.node_cert_lifetime / 86400.0
        ),
    )
    dispatcher = Dispatcher(presence.registry, presence.polls, presence.task_registry)
    # the inventory digests the store holds per agent: what each collection carries
    known_digests = inventory_domain.KnownDigests()
    jobs = provides(
        IJobs,
        JobService(
            db.jobs,
            dispatcher,
            clock,
            capabilities_of=presence.capabilities_of,
            known_agents=directory.ids,
            inventory_store=db.inventory,
            advertised=directory.advertised,
            max_output=config.max_output,
            max_message_size=config.max_message_size,
            max_class_bytes=config.inventory_class_bytes,
            known_digests=known_digests,
            shared=config.clustered,
        ),
    )
    targets = provides(
        ITargets,
        TargetService(db.targets, db.agents, db.inventory, directory, presence, jobs, clock),
    )
    # what policies and profiles share: agents' config rows, missed notices, members
    agent_config = AgentConfigBook(db.agents, dispatcher, clock, targets.resolve_target)
    policies = provides(
        IPolicies,
        PolicyService(
            agent_config,
            db.config,
            db.inventory,
            clock,
            known_digests=known_digests,
            max_class_bytes=config.inventory_class_bytes,
        ),
    )
    profiles = provides(IProfiles, ProfileService(agent_config, db.config, clock))
    admission = provides(
        IAgentAdmission,
        AgentAdmission(
            directory,
            db.agents,
            db.access,
            presence,
            nodes,
            certificates,
            settings,
            profiles,
            clock,
            config.agent_cert_lifetime / 86400.0,
        ),
    )
    audit = provides(IAudit, AuditLog(db.audit, clock))
    history = provides(
        IJobHistory,
        JobHistory(
            db.jobs,
            db.agents,
            jobs,
            lambda: settings["job_retention"],
            clock,
            limits=SizeLimits(
                config.result_bytes_per_job,
                config.result_bytes_total,
                config.inventory_history,
            ),
            database=db,
            inventory_store=db.inventory,
            audit=audit,
        ),
    )
    presence.on_cloned = lambda agent_id, why: audit.record(
        "server", "agent.cloned", agent_id, {"why": why}
    )
    inventory = provides(
        IInventory, InventoryService(db.inventory, db.agents, directory, targets, clock)
    )
    requests = AgentRequests()  # renders agents' requests on the site (set below)
    hub = AgentHub(
        config,
        name,
        clock,
        settings,
        presence,
        admission,
        nodes,
        jobs,
        policies,
        profiles,
        requests,
    )
    # welcomes give agents resumption tokens: a restart's reconnects skip the certificates
    hub.resumption = _resumption_keys(config)

    # the console's live events: every part where state changes publishes to the one hub
    events = provides(IEventHub, EventHub(clock))
    jobs.events = presence.events = admission.events = hub.events = policies.events = events
    cluster: ClusterNode | None = None
    if identity is not None:
        cluster = ClusterNode(
            name,
            admin_url(reactor, config),
            provides(
                IClusterBus,
                RedisBus(str(config.redis), f"tcm:{identity.cluster_id}", name, reactor),
            ),
            db.cluster,
            presence,
            jobs,
            _cluster_reloads(
                settings,
                access,
                admission,
                policies,
                profiles,
                agent_config,
                presence,
                jobs,
                nodes,
            ),
            clock,
        )
        provides(ICluster, cluster)
        jobs.on_created = cluster.job_created
        jobs.on_stored = cluster.event
        jobs.on_canceled = lambda job_id, agents: cluster.changed("cancel", [job_id, *agents])
        admission.on_changed = lambda ids: cluster.changed("agents", ids)
        admission.shared = True
        # PushPolicy on any node: agents on other nodes notified there, their reports heard
        policies.elsewhere = cluster.where
        presence.elsewhere = cluster.where  # an HTTP agent polling another node is not offline
        policies.on_push = lambda: cluster.changed("policies")
        policies.on_report = cluster.event
        cluster.event_listeners["policy.report"] = policies.reports_elsewhere
        # relay nodes linked here learn the cluster's nodes, and link to every one; a relay
        # node registered, enrolled, renewed or removed on one node may link to every node
        cluster.on_members = hub.cluster_changed
        nodes.on_changed = lambda: cluster.changed("nodes")
        # the console on any node: other nodes' events for the topics followed here
        cluster.hub = events
        publisher = ClusterEvents(events, cluster)
        jobs.events = presence.events = admission.events = hub.events = publisher
        policies.events = publisher

    # agent install packages for the console (tcm/server/packages.py): own thread, own cache
    packages = provides(
        IInstallPackages,
        InstallPackages(
            reactor,
            WheelCache(config.package_wheels or os.path.join(config.state_dir, "package-wheels")),
        ),
    )

    # -- the consumers: the HTTP and WebSocket endpoints ----------------------------------
    url = f"wss://{config.interface}"
    admin_api = AdminAPI(
        AdminServices(
            name=name,
            access=access,
            admission=admission,
            presence=presence,
            settings=settings,
            jobs=jobs,
            targets=targets,
            inventory=inventory,
            audit=audit,
            history=history,
            policies=policies,
            profiles=profiles,
            nodes=nodes,
            certificates=certificates,
            events=events,
            cluster=cluster,
            packages=packages,
        )
    )
    if cluster is not None:
        admin_api.written = _tell_cluster(cluster)
    agent_api = AgentAPI(
        admission, presence, settings, jobs, policies, profiles, clock, config.keepalive
    )
    intake = IntakeBudget(config.intake_budget)
    agent_ws = AgentServerFactory(
        url,
        hub,
        admission,
        settings,
        clock,
        config.max_message_size,
        config.handshake_timeout,
        intake,
        hold_ping=config.keepalive_timeout / 2,
    )
    link_ws = NodeLinkFactory(
        url,
        hub,
        nodes,
        clock,
        config.max_message_size,
        config.keepalive,
        config.keepalive_timeout,
    )
    root = _resource_tree(admin_api, agent_api, agent_ws, NodeAPI(nodes), link_ws)
    root.putChild(b"console", ConsoleResource())  # the web console (tcm/server/console.py)
    site = limited_site(root, timeout=60)  # header lines and bodies beyond limits: 431/413
    requests.site = site
    requests.api = agent_api

    # -- lifecycle -----------------------------------------------------------------------
    @inlineCallbacks
    def load():
        yield admission.load()
        yield access.load()
        yield nodes.reload()
        yield settings.load()
        yield policies.load()
        yield profiles.load()
        yield agent_config.load()
        yield jobs.load()

    @inlineCallbacks
    def start():
        """Migrate and open the store, then load agents, tokens, nodes, settings, policies
        and profiles, and unfinished jobs (tcm/heap.py: the collector paused meanwhile, the
        heap settled after)."""
        _write_server_json(config, admin_url(reactor, config))
        db.open()
        yield load_then_settle(load)
        jobs.start()
        history.start()  # purges jobs past the retention now and every hour

    def stop() -> None:
        history.stop()
        jobs.stop()
        db.close()

    top = ServerService(reactor, start, stop, presence)
    # a reconnect storm's handshakes run a few at a time, in order, instead of all at once
    gate = HandshakeGate(clock, config.max_handshakes) if config.max_handshakes > 0 else None
    handshakes = HandshakeLogger(site, gate)
    top.add_listeners(config, certificates, handshakes, site, hub.resumption)
    if cluster is not None:
        cluster.setServiceParent(top)  # started once the store is open (ServerService)
    packages.setServiceParent(top)  # its thread pool
    TimerService(config.keepalive, presence.sweep_silent_sessions).setServiceParent(top)
    # agents in HTTP mode that stopped polling: offline, and the console is told
    TimerService(HTTP_SWEEP, presence.sweep_polls).setServiceParent(top)
    # tcm/heap.py: full garbage collections kept off long-lived objects (sessions)
    HeapSettler(lambda: len(presence.registry)).setServiceParent(top)
    if config.metrics_port is not None:
        metrics = ServerMetrics(
            name,
            presence,
            admission,
            nodes,
            jobs,
            dispatcher,
            handshakes,
            cluster,
            intake=intake,
            writes=db.writes,
        )
        StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, config.metrics_port, interface="127.0.0.1"),
            server_metrics_site(metrics),
        ).setServiceParent(top)
    top.embedding = EmbeddingServer(
        config,
        reactor,
        clock,
        name,
        root,
        db.access,
        ca,
        nodes.reload,
        nodes.renew,
        hub.resumption,
    )
    top.parts = ServerParts(
        config=config,
        clock=clock,
        db=db,
        certificates=certificates,
        access=access,
        settings=settings,
        presence=presence,
        admission=admission,
        nodes=nodes,
        dispatcher=dispatcher,
        jobs=jobs,
        targets=targets,
        inventory=inventory,
        agent_config=agent_config,
        policies=policies,
        profiles=profiles,
        audit=audit,
        history=history,
        hub=hub,
        site=site,
        admin_api=admin_api,
        agent_api=agent_api,
        handshakes=handshakes,
        intake=intake,
    )
    return top


HTTP_SWEEP = 5.0  # seconds between two looks for HTTP-mode agents that stopped polling


def _resumption_keys(config: ServerConfig) -> ResumptionKeys:
    """The keys of resumption tokens (tcm.tls.resumption): derived from the cluster key on
    a node of a cluster (every node opens every node's tokens), else from a secret of the
    state directory's own."""
    if config.clustered:
        with open(config.cluster_key or os.path.join(config.state_dir, "cluster.key"), "rb") as f:
            return ResumptionKeys.from_shared_secret(f.read().strip())
    return ResumptionKeys.of_state_dir(config.state_dir)


def _join_cluster(config: ServerConfig, db: Database, name: str) -> ClusterIdentity:
    """Migrate the shared database and take the cluster's CA and admin token from it (the
    first node puts its own there): before the CA is loaded below. Blocking, at startup."""
    from tcm.store.database import upgrade

    upgrade(db.engine)
    key_file = config.cluster_key or os.path.join(config.state_dir, "cluster.key")
    identity = join(db.engine, load_or_create_key(key_file), config.state_dir, name)
    Logger().info(
        "node {name} of cluster {cluster} ({how} its CA)",
        name=name,
        cluster=identity.cluster_id,
        how="made" if identity.created_ca else "took",
    )
    return identity


#: Admin writes whose effect every node applies to its own agents: first path segment ->
#: the area each node reloads from the store (agents tell their own changes, see below).
_AREAS = {
    "settings": "settings",
    "policies": "policies",
    "profiles": "profiles",
    "targets": "targets",
    "groups": "targets",
    "apitokens": "access",
}


def _tell_cluster(cluster: ClusterNode) -> Callable[[str, str], None]:
    def written(method: str, path: str) -> None:
        parts = path.strip("/").split("/")
        if parts[-1] == "package":  # an install package: its token is in the store already
            return
        area = _AREAS.get(parts[0])
        if area is not None:
            cluster.changed(area)

    return written


def _cluster_reloads(
    settings: RuntimeSettings,
    access: AccessTokens,
    admission: AgentAdmission,
    policies: PolicyService,
    profiles: ProfileService,
    agent_config: AgentConfigBook,
    presence: AgentPresence,
    jobs: JobService,
    nodes: NodeRegistry,
) -> dict[str, Callable[[list[str] | None], Any]]:
    """What a node does when another node changed an area: read it again from the store,
    and tell its own agents where they must fetch again."""

    def here() -> list[str]:
        return [s.agent_id for s in presence.registry.all()]

    @inlineCallbacks
    def policies_changed(_ids: Any):
        yield policies.load()
        yield agent_config.load()
        agent_config.notify(here(), "policies", None, None)

    @inlineCallbacks
    def profiles_changed(_ids: Any):
        yield profiles.load()
        yield agent_config.load()
        agent_config.notify(here(), "profile", None, None)

    def targets_changed(_ids: Any) -> None:
        agent_config.forget_members()

    def canceled(ids: list[str] | None) -> Any:
        # [job, running agents...]: a cancel on another node (None: the bus came back)
        return jobs.cancel_here(ids[0], ids[1:]) if ids else None

    return {
        "cancel": canceled,
        "settings": settings.reload,
        "access": lambda _ids: access.load(),
        "agents": admission.refresh,
        "policies": policies_changed,
        "profiles": profiles_changed,
        "targets": targets_changed,
        "nodes": lambda _ids: nodes.reload(),
    }


def admin_url(reactor: Any, config: ServerConfig) -> str:
    """The URL the admin CLI uses: the first TCP `tcm:` admin listener's (--admin-listen),
    else the server's own port."""
    interface, port = config.interface, config.port
    for description in config.admin_listen:
        endpoint = parse(reactor, description, "--admin-listen")
        if isinstance(endpoint, TLSServerEndpoint) and endpoint.address is not None:
            interface, port = endpoint.address
            break
    host = interface if interface not in ("0.0.0.0", "::", "") else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"


def _write_server_json(config: ServerConfig, url: str) -> None:
    """Where the admin CLI finds this server when given only --state-dir."""
    pki.write_public(
        os.path.join(config.state_dir, "server.json"),
        json.dumps(
            {
                "url": url,
                # with an admin-supplied certificate the CLI trusts the system store (or
                # --ca-cert); the tcm CA then only verifies agents
                "ca": None if config.cert else "ca.pem",
                "token": "admin.token",
            },
            indent=1,
        ).encode(),
    )


def _load_or_create_name(state_dir: str) -> str:
    """This server's name when --name is not given: made once, kept in the state directory
    (agents' certificates carry it, so it must not change from one start to the next)."""
    path = os.path.join(state_dir, "server.name")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    name = "s-" + secrets.token_hex(5)
    pki.write_public(path, name.encode() + b"\n")
    return name


def _load_or_create_admin_token(state_dir: str) -> str:
    path = os.path.join(state_dir, "admin.token")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    token = secrets.token_urlsafe(32)
    pki.write_private(path, token.encode() + b"\n")
    return token
