"""The management server: composition of store, CA, sessions, jobs and the HTTPS/WSS site."""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import attrs
from autobahn.twisted.resource import WebSocketResource
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

import tcm
from tcm import pki
from tcm.process import raise_descriptor_limit, stop_with_failure
from tcm.protocol import codes
from tcm.protocol.envelope import Envelope
from tcm.server.adminapi import AdminAPI
from tcm.server.admission import HandshakeGate
from tcm.server.agentapi import AgentAPI, RecentEnrollments
from tcm.server.agentconfig import ConfigService
from tcm.server.ca import CertificateAuthority, HandshakeLogger, server_tls_options
from tcm.server.dispatcher import DirectRoute, Dispatcher
from tcm.server.envelope_http import render_envelope
from tcm.server.heap import HeapSettler
from tcm.server.jobservice import JobService
from tcm.server.links import NodeLinkFactory
from tcm.server.nodeapi import NodeAPI
from tcm.server.nodes import DEFAULT_MAX_CLIENTS, NodeDirectory, TaskServerAssignments
from tcm.server.polls import PollRegistry
from tcm.server.roles import Principal, TokenBook
from tcm.server.sessions import AgentSession, SessionRegistry, SessionState
from tcm.server.targets import FilterError, Target, UnknownTarget
from tcm.server.web import ApiError, ApiWithWebSocket
from tcm.server.websocket import AgentServerFactory
from tcm.store.store import Store
from tcm.tls.endpoints import listeners, port_description

# Fields of an agent view that are not inventory classes (see ServerCore.agent_views).
VIEW_FIELDS = frozenset(
    {"id", "name", "platform", "online", "mode", "group", "enrolled_at", "last_seen"}
)


@attrs.define
class ServerConfig:
    """Settings of one management server (twistd options map onto these)."""

    state_dir: str
    port: int = 8443
    interface: str = "127.0.0.1"
    # endpoint strings to listen on (tcm/tls/endpoints.py); empty: tcm's TLS on port/interface
    listen: list[str] = attrs.field(factory=list)
    hostnames: list[str] = attrs.field(factory=list)
    database: str | None = None  # default: sqlite in state_dir
    cert: str | None = None  # admin-supplied server certificate (PEM) ...
    key: str | None = None  # ... and its key
    keepalive: float = 50.0  # agents ping this often; below common 60 s LB idle timeouts
    keepalive_timeout: float = 20.0
    poll_interval: float = 60.0
    long_poll: float = 30.0  # most seconds the server holds a poll; 0: plain polling only
    persistent_connections: bool = True
    require_approval: bool = False  # new agents wait for `tcm agents approve` (run-time setting)
    handshake_timeout: float = 30.0
    max_handshakes: int = 100  # TLS handshakes in progress at once (tcm/server/admission.py)
    max_message_size: int = 1024 * 1024
    max_in_flight: int = 64
    cert_days: int = 365
    taskserver_policy: str = "fewest"  # or "capacity" (docs/operating.md)
    taskserver_max_clients: int = DEFAULT_MAX_CLIENTS
    name: str | None = None  # this server's name, in its agents' certificates (gateways)
    metrics_port: int | None = None  # /metrics and /status on loopback

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{os.path.join(self.state_dir, 'tcm.sqlite')}"


class RuntimeSettings(dict):
    """Settings an admin changes while the server runs (`tcm settings set`), kept in the store.

    Defaults come from the command line; a stored value wins over the default.
    """

    TYPES: dict[str, tuple[type, ...]] = {
        "persistent_connections": (bool,),
        "poll_interval": (int, float),
        "long_poll": (int, float),
        "require_approval": (bool,),
    }

    def __init__(self, config: ServerConfig):
        super().__init__(
            require_approval=config.require_approval,
            persistent_connections=config.persistent_connections,
            poll_interval=config.poll_interval,
            long_poll=config.long_poll,
        )

    def validate(self, changes: dict[str, Any], ignore_unknown: bool = False) -> dict[str, Any]:
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            types = self.TYPES.get(key)
            if types is None:
                if ignore_unknown:
                    continue
                raise ApiError(400, f"unknown setting {key!r}", known=sorted(self.TYPES))
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ApiError(400, f"setting {key!r} must be {types[0].__name__}")
            number: Any = value
            if key == "poll_interval" and not 1 <= number <= 86400:
                raise ApiError(400, "poll_interval must be 1..86400 seconds")
            if key == "long_poll" and not 0 <= number <= 300:
                raise ApiError(400, "long_poll must be 0..300 seconds (0: off)")
            clean[key] = value
        return clean


def describe(hostname: str, platform: str, capabilities: Any) -> str:
    """What the store keeps about an agent from its hello, as one comparable value."""
    return json.dumps([hostname or "", platform or "", capabilities or []], sort_keys=True)


class AgentDirectory:
    """Known agents in memory (id -> hostname, revoked): every request checks it."""

    def __init__(self) -> None:
        self._agents: dict[str, dict[str, Any]] = {}

    def load(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self._agents[r["id"]] = {
                "hostname": r["hostname"],
                "revoked": bool(r["revoked"]),
                "approved": bool(r.get("approved", True)),
                "capabilities": None,
                "described": describe(r["hostname"], r["platform"], r["capabilities"]),
            }

    def add(self, agent_id: str, hostname: str, approved: bool = True) -> None:
        self._agents[agent_id] = {
            "hostname": hostname,
            "revoked": False,
            "approved": approved,
            "capabilities": None,
        }

    def get(self, agent_id: str) -> dict[str, Any] | None:
        return self._agents.get(agent_id)

    def ids(self) -> list[str]:
        return [a for a, r in self._agents.items() if not r["revoked"]]

    def revoked_ids(self) -> list[str]:
        return [a for a, r in self._agents.items() if r["revoked"]]

    def pending_ids(self) -> list[str]:
        """Agents enrolled but not approved yet."""
        return [a for a, r in self._agents.items() if not r.get("approved", True)]

    def __len__(self) -> int:
        return len(self._agents)


class AgentHub:
    """What agent sessions call on the server."""

    _log = Logger()

    def __init__(self, core: ServerCore):
        self.core = core
        self.max_in_flight = core.config.max_in_flight

    def welcome_for(self, session: AgentSession) -> dict[str, Any]:
        cfg = self.core.config
        return {
            "session": session.id,
            "agent_id": session.agent_id,
            "keepalive": cfg.keepalive,
            "poll_interval": self.core.settings["poll_interval"],
            "long_poll": self.core.settings["long_poll"],
            "max_message_size": cfg.max_message_size,
            "max_in_flight": cfg.max_in_flight,
            "server_version": tcm.__version__,
            "server_time": self.core.clock.seconds(),
            **(self.task_server_for(session) if session.channel == "core" else {}),
            # none of either: an agent that has none need not fetch them at session start
            "policy_count": len(self.core.agent_config.policies),
            "profile_count": len(self.core.agent_config.profiles),
        }

    # -- task servers --------------------------------------------------------------------
    @property
    def link_keepalive(self) -> float:
        return self.core.config.keepalive / 2

    def persistent_enabled(self) -> bool:
        return self.core.persistent_enabled()

    @property
    def server_name(self) -> str:
        return self.core.name

    def pending_agents(self) -> list[str]:
        """Agents a gateway must refuse until an admin approves them."""
        return self.core.directory.pending_ids()

    def revoked_agents(self) -> list[str]:
        """Agents a gateway must refuse (sent at link welcome; changes follow)."""
        return self.core.directory.revoked_ids()

    def render_relayed(self, view: Any, env: Envelope) -> Deferred[Envelope]:
        """An agent's HTTPS call carried by a gateway: the same resource tree answers it."""
        return render_envelope(self.core.site, view, env, carried_by=b"https")

    def authenticate_agent_id(self, agent_id: str) -> str:
        """A node vouches for an agent it verified: may that agent be served?"""
        return self.core.check_agent(agent_id)

    def gateway_fingerprints(self) -> dict[str, str]:
        """The gateways a task server may accept links from (name -> certificate)."""
        return self.core.nodes.gateway_fingerprints()

    def task_server_for(self, session: AgentSession) -> dict[str, Any]:
        """Assign the agent a task server (or say why there is none), for welcome/notify.

        An agent that reaches the server through a gateway keeps its task session on that
        gateway too: task servers are inside the network the gateway stands in front of. It
        is assigned, by the same policy, one of the task servers that gateway links to (its
        `reach`), at `/taskserver/NAME/task/v1/ws` on the gateway; with none reachable (or
        all full) its task session goes through the gateway to this server (`/task/v1/ws`)."""
        route = session.route
        assignments = self.core.assignments
        if (
            getattr(route, "role", None) == "gateway"
            and getattr(route, "url", None)
            and assignments.registered
        ):
            base = route.url.rsplit("/agent/v1/ws", 1)[0]
            reachable = [n for n in route.reach if n in assignments.servers]
            if reachable:
                name, why = assignments.assign(session.agent_id, among=reachable)
                if name is not None:
                    return {
                        "task_server": {
                            "name": name,
                            "url": f"{base}/taskserver/{name}/task/v1/ws",
                        },
                        "task_server_status": f"{why}, through gateway {route.name}",
                    }
                why = f"through gateway {route.name} to this server: {why}"
            else:
                assignments.release(session.agent_id)
                why = (
                    f"through gateway {route.name} to this server: "
                    "it links to no connected task server"
                )
            return {
                "task_server": {"name": f"gateway:{route.name}", "url": base + "/task/v1/ws"},
                "task_server_status": why,
            }
        name, why = assignments.assign(session.agent_id)
        if name is None:
            return {"task_server": None, "task_server_status": why}
        return {
            "task_server": {"name": name, "url": assignments.url_of(name)},
            "task_server_status": why,
        }

    def link_opened(self, node: Any) -> None:
        core = self.core
        self._log.info(
            "{role} {name} linked ({url}, max {max} clients)",
            role=node.role,
            name=node.name,
            url=node.url,
            max=node.max_clients,
        )
        old = core.nodes.links.get(node.key)
        core.nodes.links[node.key] = node
        if old is not None and old is not node:
            old._close(codes.CLOSE_SUPERSEDED, "a newer link of this node replaced this one")
        core.store.node_reported(node.name, node.url or "")
        if node.role != "taskserver":
            return
        record = core.nodes.records.get(node.name, {})
        limits = [m for m in (record.get("max_clients"), node.max_clients) if m]
        core.assignments.up(node.name, node.url or "", min(limits) if limits else None)
        # Agents that found no task server so far get this one (behind a gateway: if that
        # gateway links to it).
        for session in core.registry.all():
            route = session.route
            if route is not core.direct_route and node.name not in getattr(route, "reach", ()):
                continue
            if core.assignments.of(session.agent_id) is None:
                self._tell_task_server(session, "a task server became available")

    def reach_changed(self, gateway: Any) -> None:
        """A gateway links to other task servers now: its agents' task sessions follow."""
        core = self.core
        self._log.info(
            "gateway {name} links to task servers: {reach}",
            name=gateway.key,
            reach=", ".join(gateway.reach) or "none",
        )
        for session in list(gateway.sessions.values()):
            if session.channel != "core" or session.state is not SessionState.OPEN:
                continue
            current = core.assignments.of(session.agent_id)
            if current is None or current not in gateway.reach:
                self._tell_task_server(session, f"gateway {gateway.name} reach changed")

    def link_closed(self, node: Any) -> None:
        core = self.core
        name, role, key = node.name, node.role, node.key
        if core.nodes.links.get(key) is not node:
            return  # superseded by a newer link of the same node
        del core.nodes.links[key]
        self._log.warn("{role} {name} link lost", role=role, name=name)
        if role != "taskserver":
            return
        moved = core.assignments.down(name)
        for agent_id in moved:
            session = core.registry.get(agent_id)
            if session is not None:
                self._tell_task_server(session, f"task server {name} is down")

    def _tell_task_server(self, session: AgentSession, reason: str) -> None:
        data = self.task_server_for(session)
        target = data["task_server"]
        self._log.info(
            "agent {agent}: task server {name} ({why})",
            agent=session.agent_id,
            name=target["name"] if target else None,
            why=f"{reason}; {data['task_server_status']}",
        )
        session.send(Envelope(type="notify", data={"topic": "task_server", **data}))

    def session_opened(self, session: AgentSession, hello: dict[str, Any]) -> None:
        core = self.core
        if session.channel == "task":
            core.task_registry.add(session)
            self._log.info(
                "agent {agent} task session open via {via}", agent=session.agent_id, via=session.via
            )
            core.jobs.session_opened(session.agent_id, channel="task")
            return
        core.registry.add(session)
        record = core.directory.get(session.agent_id)
        if record is not None:
            record["capabilities"] = session.capabilities
        now = core.clock.seconds()
        capabilities = list(session.capabilities.values())
        described = describe(hello.get("hostname", ""), hello.get("platform", ""), capabilities)
        if record is not None and record.get("described") == described:
            core.store.agent_seen(session.agent_id, now)  # unchanged: one batched row
        else:
            core.store.agent_seen(
                session.agent_id,
                now,
                hostname=hello.get("hostname"),
                platform=hello.get("platform"),
                capabilities=capabilities,
            )
            if record is not None:
                record["described"] = described
        self._log.info(
            "agent {agent} session open via {via} ({n} sessions)",
            agent=session.agent_id,
            via=session.via,
            n=len(core.registry),
        )
        core.agent_config.session_opened(session.agent_id, hello)
        core.jobs.session_opened(session.agent_id)

    def session_closed(self, session: AgentSession) -> None:
        core = self.core
        if session.channel == "task":
            if core.task_registry.remove(session):
                self._log.info("agent {agent} task session closed", agent=session.agent_id)
            return
        if core.registry.remove(session):
            core.assignments.release(session.agent_id)
            if core.closing_everything:
                return  # a stop: seen and logged once for all sessions (closing_all)
            core.store.agent_seen(session.agent_id, core.clock.seconds())
            self._log.info("agent {agent} session closed", agent=session.agent_id)

    def handle_request(self, session: AgentSession, env: Envelope) -> Deferred[Envelope]:
        return render_envelope(self.core.site, session.transport.peer_transport, env)


PROXIED_CERT_HEADER = b"x-tcm-client-cert"


class ServerCore:
    """Everything the server's parts share; built by makeService."""

    _log = Logger()

    def __init__(self, config: ServerConfig, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.clock = reactor
        self.config = config
        self.version = tcm.__version__
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        self.ca = CertificateAuthority.load_or_create(config.state_dir)
        self.name = config.name or _load_or_create_name(config.state_dir)
        self.admin_token = _load_or_create_admin_token(config.state_dir)
        self.tokens = TokenBook(self.admin_token)
        self.store = Store(config.database_url, reactor=reactor)
        self.directory = AgentDirectory()
        self.recent_enrollments = RecentEnrollments()  # an agent may ask again (agentapi)
        self.registry = SessionRegistry()
        self.task_registry = SessionRegistry()  # agents' task-client sessions (via nodes)
        self.nodes = NodeDirectory()
        self.assignments = TaskServerAssignments(
            config.taskserver_policy, config.taskserver_max_clients
        )
        self.settings = RuntimeSettings(config)
        self.handshakes: HandshakeLogger | None = None  # set by make_server_service
        self.hub = AgentHub(self)
        self.site = self._make_site()
        self.direct_route = DirectRoute(self.ws_factory.prepareMessage)
        self.polls = PollRegistry(self.clock)
        self.last_poll: dict[str, float] = {}
        self.dispatcher = Dispatcher(self.registry, self.polls, self.task_registry)
        self.jobs = JobService(
            self.store,
            self.dispatcher,
            self.clock,
            capabilities_of=self._capabilities_of,
            known_agents=self.directory.ids,
        )
        self.agent_config = ConfigService(
            self.store, self.dispatcher, self.clock, self.resolve_target
        )

    def _make_site(self) -> Site:
        root = Resource()
        api = Resource()
        root.putChild(b"api", api)
        self.admin_api = AdminAPI(self)
        api.putChild(b"v1", self.admin_api)
        agent = Resource()
        root.putChild(b"agent", agent)
        self.agent_api = AgentAPI(self)
        self.ws_factory = AgentServerFactory(self, f"wss://{self.config.interface}")
        v1 = ApiWithWebSocket(self.agent_api, WebSocketResource(self.ws_factory))
        agent.putChild(b"v1", v1)
        links = Resource()
        root.putChild(b"link", links)
        self.node_api = NodeAPI(self)
        self.link_factory = NodeLinkFactory(self, f"wss://{self.config.interface}")
        ws: Any = WebSocketResource(self.link_factory)
        links.putChild(b"v1", ApiWithWebSocket(self.node_api, ws))
        self.root = root
        site = Site(root, timeout=60)
        site.displayTracebacks = False
        return site

    def _capabilities_of(self, agent_id: str) -> dict[str, Any] | None:
        session = self.registry.get(agent_id)
        return session.capabilities if session is not None else None

    # -- identity ----------------------------------------------------------------------
    def authenticate_transport(self, transport: Any) -> str:
        """The agent id of a connection's verified client certificate, or ApiError.

        The subject is read once per connection and kept on it; whether the agent is known
        and not revoked is checked on every request."""
        agent_id = getattr(transport, "tcm_agent_id", None)
        if agent_id is None:
            agent_id = pki.peer_common_name(transport)
            if agent_id is None:
                raise ApiError(403, "client certificate required: enroll first")
            try:
                transport.tcm_agent_id = agent_id
            except AttributeError:  # a transport that takes no attributes: read it each time
                pass
        return self.check_agent(agent_id)

    def check_agent(self, agent_id: str) -> str:
        """The agent id if this agent may be served now: known, not revoked, approved."""
        record = self.directory.get(agent_id)
        if record is None:
            raise ApiError(403, f"unknown agent {agent_id}: enroll again")
        if record["revoked"]:
            raise ApiError(403, f"agent {agent_id} is revoked")
        if not record.get("approved", True):
            raise ApiError(
                403, f"agent {agent_id} is awaiting approval (tcm agents approve {agent_id})"
            )
        return agent_id

    @inlineCallbacks
    def approve_agent(self, agent_id: str):
        """Approve an agent that enrolled while approval was required; gateways are told."""
        record = self.directory.get(agent_id)
        if record is None:
            raise ApiError(404, f"no agent {agent_id}")
        if record.get("approved", True):
            return False
        yield self.store.approve_agent(agent_id)
        record["approved"] = True
        self._log.info("agent {agent} approved", agent=agent_id)
        for node in list(self.nodes.links.values()):
            node.pending([], approved=[agent_id])
        return True

    def agent_enrolled(self, agent_id: str, hostname: str, approved: bool) -> None:
        self.directory.add(agent_id, hostname, approved)
        if not approved:
            self._log.info("agent {agent} awaits approval", agent=agent_id)
            for node in list(self.nodes.links.values()):
                node.pending([agent_id])

    @inlineCallbacks
    def revoke_agent(self, agent_id: str):
        """Revoke an agent: stored, refused from now on, its sessions closed with 4007, and
        every gateway told (it refuses the agent at the upgrade)."""
        record = self.directory.get(agent_id)
        if record is None:
            raise ApiError(404, f"no agent {agent_id}")
        if record["revoked"]:
            return False
        yield self.store.revoke_agent(agent_id)
        record["revoked"] = True
        self._log.info("agent {agent} revoked", agent=agent_id)
        for registry in (self.registry, self.task_registry):
            session = registry.get(agent_id)
            if session is not None:
                session.close(codes.CLOSE_REVOKED)
        for node in list(self.nodes.links.values()):
            node.revoked([agent_id])
        return True

    def authenticate_agent(self, request) -> str:
        forwarded = request.getHeader(PROXIED_CERT_HEADER)
        if forwarded is not None:
            return self.authenticate_proxied(request.channel.transport, forwarded)
        return self.authenticate_transport(request.channel.transport)

    def authenticate_proxied(self, transport: Any, escaped_pem: str | bytes) -> str:
        """The agent id of a client certificate a TLS-terminating reverse proxy (nginx's
        `$ssl_client_escaped_cert`) forwards in X-Tcm-Client-Cert. Taken only from a
        registered node (its own client certificate `node:NAME`, enrolled like a gateway),
        and only for a certificate this server's CA issued."""
        from urllib.parse import unquote

        from tcm.protocol import link

        cached = getattr(transport, "tcm_agent_id", None)
        if cached is None:
            cn = pki.peer_common_name(transport)
            if cn is None or not cn.startswith(link.NODE_PREFIX):
                raise ApiError(403, "X-Tcm-Client-Cert is only taken from an enrolled node")
            node = cn[len(link.NODE_PREFIX) :]
            refusal = self.nodes.refusal(node, pki.peer_fingerprint(transport))
            if refusal is not None:
                raise ApiError(403, refusal)
            if isinstance(escaped_pem, bytes):
                escaped_pem = escaped_pem.decode("latin-1")
            try:
                cert = pki.load_certificate(unquote(escaped_pem).encode())
                cached = self.ca.verify_issued(cert)
            except ValueError as e:
                raise ApiError(403, f"forwarded client certificate refused: {e}") from None
            try:
                transport.tcm_agent_id = cached
            except AttributeError:
                pass
        return self.authenticate_transport(transport)

    def agent_polled(self, agent_id: str) -> None:
        """An agent in HTTP mode polled: remember when (for `tcm agents`)."""
        self.last_poll[agent_id] = self.clock.seconds()

    def http_mode_of(self, agent_id: str) -> str | None:
        """ "http" for an agent without a session that polled lately; else None."""
        last = self.last_poll.get(agent_id)
        window = 2 * float(self.settings["poll_interval"]) + float(self.settings["long_poll"])
        if last is not None and self.clock.seconds() - last <= window:
            return "http"
        return None

    def persistent_enabled(self) -> bool:
        return bool(self.settings["persistent_connections"])

    @inlineCallbacks
    def change_settings(self, changes: dict[str, Any]):
        """Validate, store and apply setting changes at run time."""
        clean = self.settings.validate(changes)
        for key, value in clean.items():
            yield self.store.set_setting(key, value)
        before = self.persistent_enabled()
        self.settings.update(clean)
        if before and not self.persistent_enabled():
            sessions = self.registry.all()
            self._log.info(
                "persistent connections switched off: closing {n} sessions", n=len(sessions)
            )
            for session in sessions + self.task_registry.all():
                session.close(codes.CLOSE_PERSISTENT_OFF)
        elif not before and self.persistent_enabled():
            self._log.info("persistent connections switched on")
        return dict(self.settings)

    # -- targets -----------------------------------------------------------------------
    @inlineCallbacks
    def agent_views(self, roots: frozenset[str] | set[str] = frozenset()):
        """The views filters are evaluated on, one per agent not revoked, built now.

        A view has `id`, `name` (the host name the agent gave), `platform`, `online` (a live
        session), `mode` ("persistent", "http" or None), `group` (its groups' names),
        `enrolled_at`, `last_seen`, and each inventory class named in `roots` (e.g. `os`,
        `memory`) as stored. Fires with a list of dicts."""
        rows = yield self.store.list_agents()
        groups = yield self.store.group_memberships()
        classes = set(roots) - VIEW_FIELDS
        inventory = (yield self.store.inventory_data(classes)) if classes else {}
        views = []
        for r in rows:
            if r["revoked"]:
                continue
            agent_id = r["id"]
            session = self.registry.get(agent_id)
            view: dict[str, Any] = dict(inventory.get(agent_id, {}))
            view.update(
                id=agent_id,
                name=r["hostname"],
                platform=r["platform"],
                online=session is not None,
                mode="persistent" if session is not None else self.http_mode_of(agent_id),
                group=groups.get(agent_id, []),
                enrolled_at=r["enrolled_at"],
                last_seen=r["last_seen"],
            )
            views.append(view)
        return views

    @inlineCallbacks
    def load_target(self, name: str):
        """The saved Target of that name; UnknownTarget when there is none."""
        row = yield self.store.get_target(name)
        if row is None:
            raise UnknownTarget(name)
        return Target.from_row(row)

    @inlineCallbacks
    def resolve_target(self, name: str):
        """The ids of a target's members now: Deferred[set[str]].

        A filter is evaluated on the agents' current views (inventory, groups, online
        state); a fixed list keeps the agents that still exist and are not revoked. Fails
        with UnknownTarget, or FilterError for a stored filter that no longer parses."""
        target = yield self.load_target(name)
        views = yield self.agent_views(target.roots())
        return target.members(views)

    @inlineCallbacks
    def resolve_targets(self, names: list[str] | None = None):
        """Members now of several targets (all saved ones by default), evaluated on one set of
        views: Deferred[dict[name, set[agent_id]]]. A target that is unknown is left out;
        one whose stored filter no longer parses has no members. With
        `targets.most_specific(result, agent_id)` this picks an agent's most specific
        target."""
        rows = yield self.store.list_targets()
        wanted = None if names is None else set(names)
        found = []
        for row in rows:
            if wanted is not None and row["name"] not in wanted:
                continue
            found.append(Target.from_row(row))
        roots: set[str] = set()
        for target in found:
            try:
                roots |= target.roots()
            except FilterError:
                pass
        views = yield self.agent_views(roots)
        out: dict[str, set[str]] = {}
        for target in found:
            try:
                out[target.name] = target.members(views)
            except FilterError:
                out[target.name] = set()
        return out

    def audit(
        self,
        who: str | Principal,
        action: str,
        obj: str = "",
        details: dict[str, Any] | None = None,
    ) -> Deferred[None]:
        """Write an audit log entry (who, what, on what, details, now); fires once it is
        committed."""
        actor = who.name if isinstance(who, Principal) else who
        return self.store.audit(actor, action, obj, details or {}, self.clock.seconds())

    # -- lifecycle ---------------------------------------------------------------------
    def tls_options(self):
        cfg = self.config
        if cfg.cert and cfg.key:
            with open(cfg.cert, "rb") as f:
                cert_pem = f.read()
            with open(cfg.key, "rb") as f:
                key_pem = f.read()
        else:
            cert_path = os.path.join(cfg.state_dir, "server.pem")
            key_path = os.path.join(cfg.state_dir, "server.key")
            names = sorted({cfg.interface, *cfg.hostnames} - {"0.0.0.0", "::", ""})
            if not os.path.exists(cert_path) or _names_changed(cert_path, names):
                key_pem, cert_pem = self.ca.issue_server_certificate(names)
                pki.write_private(key_path, key_pem)
                pki.write_public(cert_path, cert_pem)
            with open(cert_path, "rb") as f:
                cert_pem = f.read()
            with open(key_path, "rb") as f:
                key_pem = f.read()
        return server_tls_options(key_pem, cert_pem, [self.ca.cert_pem])

    @inlineCallbacks
    def start(self):
        """Migrate and open the store, then load agents, settings and unfinished jobs."""
        self._write_server_json()
        self.store.open()
        self.directory.load((yield self.store.list_agents()))
        self.tokens.load((yield self.store.list_api_tokens(include_hashes=True)))
        yield self.reload_nodes()
        stored = yield self.store.get_settings()
        self.settings.update(self.settings.validate(stored, ignore_unknown=True))
        yield self.agent_config.load()
        yield self.jobs.load()
        self.jobs.start()

    @inlineCallbacks
    def reload_nodes(self):
        self.nodes.load((yield self.store.list_nodes()))
        self.assignments.registered = len(self.nodes.task_servers())
        gateways = self.nodes.gateway_fingerprints()
        for node in list(self.nodes.links.values()):
            node.nodes(gateways)  # task servers: which gateways they may accept now

    def _write_server_json(self) -> None:
        """Where the admin CLI finds this server when given only --state-dir."""
        import json

        cfg = self.config
        host = cfg.interface if cfg.interface not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        pki.write_public(
            os.path.join(cfg.state_dir, "server.json"),
            json.dumps(
                {
                    "url": f"https://{host}:{cfg.port}",
                    # with an admin-supplied certificate the CLI trusts the system store (or
                    # --ca-cert); the tcm CA then only verifies agents
                    "ca": None if cfg.cert else "ca.pem",
                    "token": "admin.token",
                },
                indent=1,
            ).encode(),
        )

    def stop(self) -> None:
        self.jobs.stop()
        self.store.close()

    closing_everything = False  # a stop closes every session: no line or write per session

    def closing_all(self, code: int) -> tuple[int, Deferred[None]]:
        """Close every session held here (direct ones; relayed ones end with their links), at
        a stop: the agents are recorded as seen now in one store write, and one line is
        logged for all of them instead of one per session as each closes. Returns how many
        were closed, and the store write (fires once committed)."""
        self.closing_everything = True
        n = 0
        seen = []
        for registry in (self.registry, self.task_registry):
            for session in registry.all():
                if session.route is self.direct_route:
                    session.close(code)
                    n += 1
                    if registry is self.registry:
                        seen.append(session.agent_id)
        written = self.store.agents_seen(seen, self.clock.seconds()) if seen else succeed(None)
        if n:
            self._log.info("closing {n} sessions: {why}", n=n, why=codes.CLOSE_REASONS[code])
        return n, written

    def sessions_gone(self, timeout: float) -> Deferred:
        """Fires when no direct session is left, or after `timeout` seconds."""
        d: Deferred = Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            left = sum(
                1
                for r in (self.registry, self.task_registry)
                for s in r.all()
                if s.route is self.direct_route
            )
            if not left or self.clock.seconds() >= deadline:
                d.callback(left)
            else:
                self.clock.callLater(0.05, check)

        check()
        return d

    def sweep_silent_sessions(self) -> None:
        """Close sessions that sent nothing (not even a ping) for too long: half-open."""
        cfg = self.config
        deadline = self.clock.seconds() - (2 * cfg.keepalive + cfg.keepalive_timeout)
        for session in self.registry.idle_since(deadline):
            if session.route is not self.direct_route:
                continue  # relayed: the node watches its agents, the link watches the node
            self._log.info(
                "agent {agent} silent since {t:.0f}: closing",
                agent=session.agent_id,
                t=session.last_rx,
            )
            # A close frame with 4008; if the peer is really gone, Autobahn drops the TCP
            # connection when its close handshake times out (closeHandshakeTimeout).
            session.close(codes.CLOSE_KEEPALIVE)


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


def _names_changed(cert_path: str, names: list[str]) -> bool:
    from cryptography import x509

    with open(cert_path, "rb") as f:
        cert = pki.load_certificate(f.read())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return not set(names) <= have


class ServerService(service.MultiService):
    """Starts the core (store, migrations, working set) before listening."""

    _log = Logger()

    def __init__(self, core: ServerCore):
        super().__init__()
        self.core = core

    def privilegedStartService(self):
        # twistd binds ports here, before startService; the listener binds in startService
        # below instead, once the store is migrated and the working set loaded.
        service.Service.privilegedStartService(self)

    def startService(self):
        # Listen only once the store is migrated and the working set loaded.
        service.Service.startService(self)
        d = self.core.start()
        d.addCallback(lambda _: [child.startService() for child in self if self.running])
        d.addErrback(self._fatal)

    def _fatal(self, f):
        Logger().failure("server failed to start", f)
        stop_with_failure(self.core.reactor)

    listeners: list[Any] = []  # the listen endpoints (StreamServerEndpointServices), closed first

    def stopService(self):
        service.Service.stopService(self)
        from twisted.internet.defer import DeferredList, maybeDeferred

        # No new connection from here on: an agent told 4012 that came back within the
        # grace below would be served by a server about to go, and its session (a welcome
        # ends the agent's restart hint) then dropped without a 4012: it would climb its
        # backoff ladder. Refused now, it tries again every few seconds until the next
        # server listens.
        unlistened = [maybeDeferred(s.stopService) for s in self.listeners if s.running]
        # Tell the agents this is a restart: they come back every few seconds rather than
        # climbing their backoff while the server is away (docs/protocol.md, 4012). The
        # close frames need the reactor to go out: wait (a little) for the closes to finish.
        told, written = self.core.closing_all(codes.CLOSE_RESTARTING)
        closed = self.core.sessions_gone(self.RESTART_GRACE) if told else succeed(0)

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
            return DeferredList(
                unlistened
                + [maybeDeferred(c.stopService) for c in reversed(list(self)) if c.running]
            )

        def stopped(_):
            self.core.stop()

        return closed.addCallback(gone).addCallback(stop_children).addBoth(stopped)

    RESTART_GRACE = 2.0  # most seconds a stop waits for the agents to take their 4012


def make_server_service(config: ServerConfig, reactor: Any = None) -> ServerService:
    limit = raise_descriptor_limit()
    Logger().info("this process may hold about {n} connections (descriptor limit)", n=limit)
    core = ServerCore(config, reactor)
    top = ServerService(core)
    # a reconnect storm's handshakes run a few at a time, in order, instead of all at once
    gate = HandshakeGate(core.clock, config.max_handshakes) if config.max_handshakes > 0 else None
    core.handshakes = HandshakeLogger(core.site, gate)
    # every listen address: tcm: ones with the server's TLS, plain ones (an admin API behind a
    # TLS-terminating proxy) without, where no agent certificate can be presented
    endpoints = config.listen or [port_description(config.port, config.interface)]
    top.listeners = listeners(
        core.reactor, endpoints, core.tls_options(), core.handshakes, core.site
    )
    for listener in top.listeners:
        listener.setServiceParent(top)
    TimerService(config.keepalive, core.sweep_silent_sessions).setServiceParent(top)
    # tcm/server/heap.py: full garbage collections kept off long-lived objects (sessions)
    HeapSettler(lambda: len(core.registry)).setServiceParent(top)
    if config.metrics_port is not None:
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from tcm.server.metrics import server_metrics_site

        StreamServerEndpointService(
            TCP4ServerEndpoint(core.reactor, config.metrics_port, interface="127.0.0.1"),
            server_metrics_site(core),
        ).setServiceParent(top)
    return top
