"""What agent sessions and node links call on the server (`SessionHub` and the link hub)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Site

import tcm
from tcm.interfaces import (
    IAgentAdmission,
    IAgentPresence,
    IEventPublisher,
    IJobs,
    INodeRegistry,
    IPolicies,
    IProfiles,
    IRuntimeSettings,
)
from tcm.protocol.envelope import Envelope
from tcm.server.agents import is_direct
from tcm.server.config import ServerConfig
from tcm.server.envelope_http import serve_envelope
from tcm.server.events import NO_EVENTS, agent_event, node_event
from tcm.server.sessions import AgentSession, SessionState
from tcm.server.web import JsonRouter
from tcm.tls import pki
from tcm.tls.resumption import ResumptionKeys, issue_token


def resume_field(session: AgentSession, keys: ResumptionKeys | None, now: float) -> dict[str, Any]:
    """A welcome's `resume`: the resumption token sealed by the process the agent's TLS
    ends at. This one for a direct session, with `keys` (None: no token); behind a relay
    node (a gateway, a task server), the node, with its own keys, sent in the connection's
    `open` (the route's `token_of`). {} without a token."""
    if is_direct(session):
        token = issue_token(
            keys, pki.resumption_peer(session.transport.peer_transport), session.agent_id, now
        )
    else:
        token = session.route.token_of(session)
    return {} if token is None else {"resume": token}


class AgentRequests:
    """Serves agents' requests (over a session, or carried by a gateway) with the handlers
    of the site's resource tree: the same handlers answer them as over HTTPS, called
    directly where the agent API allows (`serve_envelope`). The site and the agent API are
    set once built (the site holds the WebSocket endpoint whose sessions call this)."""

    site: Site | None = None
    api: JsonRouter | None = None  # the agent API, whose `direct` routes skip HTTP

    def render(
        self, peer: Any, env: Envelope, carried_by: bytes = b"websocket"
    ) -> Deferred[Envelope]:
        assert self.site is not None, "the site is set by make_server_service"
        return serve_envelope(self.api, self.site, peer, env, carried_by=carried_by)


class AgentHub:
    """What agent sessions and node links call on the server."""

    _log = Logger()
    events: IEventPublisher = NO_EVENTS  # the console's live events (set where wired)
    # a node of a cluster: the cluster's nodes ({"node", "url", "state"}), told to the relay
    # nodes linked here (they link to every node); None for a server alone
    cluster_members: list[dict[str, str]] | None = None
    # seals the resumption tokens of welcomes (tcm.tls.resumption); None: no token
    resumption: ResumptionKeys | None = None

    def __init__(
        self,
        config: ServerConfig,
        name: str,
        clock: Any,
        settings: IRuntimeSettings,
        presence: IAgentPresence,
        admission: IAgentAdmission,
        nodes: INodeRegistry,
        jobs: IJobs,
        policies: IPolicies,
        profiles: IProfiles,
        requests: AgentRequests,
    ):
        self._config = config
        self._name = name
        self._clock = clock
        self._settings = settings
        self._presence = presence
        self._admission = admission
        self._nodes = nodes
        self._jobs = jobs
        self._policies = policies
        self._profiles = profiles
        self._requests = requests
        self.max_in_flight = config.max_in_flight
        self.rebalance_rate = config.taskserver_rebalance_rate  # agents moved per second
        self._rebalancing: Any = None  # the next rebalancing step (an IDelayedCall)

    def welcome_for(self, session: AgentSession) -> dict[str, Any]:
        cfg = self._config
        return {
            "session": session.id,
            "agent_id": session.agent_id,
            "keepalive": cfg.keepalive,
            "poll_interval": self._settings["poll_interval"],
            "long_poll": self._settings["long_poll"],
            "max_message_size": cfg.max_message_size,
            "max_in_flight": cfg.max_in_flight,
            "server_version": tcm.__version__,
            "server_time": self._clock.seconds(),
            **(self.task_server_for(session) if session.channel == "core" else {}),
            # none of either: an agent that has none need not fetch them at session start
            "policy_count": len(self._policies.policies),
            "profile_count": len(self._profiles.profiles),
            **resume_field(session, self.resumption, self._clock.seconds()),
        }

    # -- node links ----------------------------------------------------------------------
    @property
    def link_keepalive(self) -> float:
        return self._config.keepalive / 2

    def persistent_enabled(self) -> bool:
        return self._settings.persistent_enabled()

    @property
    def server_name(self) -> str:
        return self._name

    def pending_agents(self) -> list[str]:
        """Agents a gateway must refuse until an admin approves them."""
        return self._admission.pending_ids()

    def revoked_agents(self) -> list[str]:
        """Agents a gateway must refuse (sent at link welcome; changes follow)."""
        return self._admission.revoked_ids()

    def render_relayed(self, view: Any, env: Envelope) -> Deferred[Envelope]:
        """An agent's HTTPS call carried by a gateway: the same resource tree answers it."""
        return self._requests.render(view, env, carried_by=b"https")

    def authenticate_agent_id(self, agent_id: str) -> str:
        """A node vouches for an agent it verified: may that agent be served?"""
        return self._admission.check_agent(agent_id)

    def gateway_fingerprints(self, previous: bool = False) -> dict[str, str]:
        """The gateways a task server may accept links from (name -> certificate; with
        `previous`, the certificate each renewed last)."""
        return self._nodes.gateway_fingerprints(previous)

    def task_server_for(self, session: AgentSession) -> dict[str, Any]:
        """Assign the agent a task server (or say why there is none), for welcome/notify.

        An agent that reaches the server through a gateway keeps its task session on that
        gateway too: task servers are inside the network the gateway stands in front of. It
        is assigned, by the same policy, one of the task servers that gateway links to (its
        `reach`), at `/taskserver/NAME/task/v1/ws` on the gateway; with none reachable (or
        all full) its task session goes through the gateway to this server (`/task/v1/ws`)."""
        route: Any = session.route
        assignments = self._nodes.assignments
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
                            "url": self._to_this_node(f"{base}/taskserver/{name}/task/v1/ws"),
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
            "task_server": {"name": name, "url": self._to_this_node(assignments.url_of(name))},
            "task_server_status": why,
        }

    def _to_this_node(self, url: str | None) -> str | None:
        """A task server URL naming this node when it is a node of a cluster (?node=NAME):
        the task server, linked to every node, takes the task session on to this one, where
        the agent's own session is (one node holds both)."""
        if self.cluster_members is None or not url:
            return url
        return url + ("&" if "?" in url else "?") + "node=" + quote(self._name, safe="")

    def cluster_changed(self, members: list[dict[str, str]]) -> None:
        """The cluster's nodes changed (one joined, went down, came back): every relay node
        linked here is told, and links to the nodes that are up."""
        self.cluster_members = members
        for node in list(self._nodes.links.values()):
            node.cluster(members)

    def link_opened(self, node: Any) -> None:
        self._log.info(
            "{role} {name} linked ({url}, max {max} clients)",
            role=node.role,
            name=node.name,
            url=node.url,
            max=node.max_clients,
        )
        self._nodes.link_up(node)
        self.events.publish(node_event(node.name, role=node.role, linked=True))
        if node.role != "taskserver":
            return
        # Agents that found no task server so far get this one (behind a gateway: if that
        # gateway links to it).
        assignments = self._nodes.assignments
        for session in self._presence.registry.all():
            if not is_direct(session) and node.name not in getattr(session.route, "reach", ()):
                continue
            if assignments.of(session.agent_id) is None:
                self._tell_task_server(session, "a task server became available")
        self._rebalance_soon()

    # -- rebalancing: at a bounded rate when a task server returns or joins ------------------
    def _rebalance_soon(self) -> None:
        if self._rebalancing is None and self.rebalance_rate > 0:
            self._rebalancing = self._clock.callLater(1.0, self._rebalance_step)

    def _rebalance_step(self) -> None:
        """Move at most `rebalance_rate` agents (this second) toward the policy's target and
        tell each; again in a second while there may be more to move. Agents behind a
        gateway stay: they can reach only the task servers their gateway links to."""
        self._rebalancing = None
        registry = self._presence.registry
        movable = [s.agent_id for s in registry.all() if is_direct(s)]
        moves = self._nodes.assignments.rebalance(self.rebalance_rate, movable)
        for move in moves:
            session = registry.get(move.agent_id)
            if session is not None:
                self._tell_task_server(session, "rebalancing")
        if moves:
            self._log.info(
                "rebalancing: moved {n} agents (at most {rate} a second)",
                n=len(moves),
                rate=self.rebalance_rate,
            )
        if len(moves) == self.rebalance_rate:
            self._rebalance_soon()

    def stop_rebalancing(self) -> None:
        """Cancel a pending rebalancing step (the server stops)."""
        if self._rebalancing is not None and self._rebalancing.active():
            self._rebalancing.cancel()
        self._rebalancing = None

    def reach_changed(self, gateway: Any) -> None:
        """A gateway links to other task servers now: its agents' task sessions follow."""
        self._log.info(
            "gateway {name} links to task servers: {reach}",
            name=gateway.key,
            reach=", ".join(gateway.reach) or "none",
        )
        for session in list(gateway.sessions.values()):
            if session.channel != "core" or session.state is not SessionState.OPEN:
                continue
            current = self._nodes.assignments.of(session.agent_id)
            if current is None or current not in gateway.reach:
                self._tell_task_server(session, f"gateway {gateway.name} reach changed")

    def link_closed(self, node: Any) -> None:
        moved = self._nodes.link_down(node)
        self.events.publish(node_event(node.name, role=node.role, linked=False))
        for agent_id in moved or ():
            session = self._presence.registry.get(agent_id)
            if session is not None:
                self._tell_task_server(session, f"task server {node.name} is down")

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

    # -- sessions ------------------------------------------------------------------------
    def session_opened(self, session: AgentSession, hello: dict[str, Any]) -> None:
        presence = self._presence
        if session.channel == "task":
            presence.task_registry.add(session)
            self._log.info(
                "agent {agent} task session open via {via}", agent=session.agent_id, via=session.via
            )
            self._jobs.session_opened(session.agent_id, channel="task")
            return
        if not presence.admit_session(session):  # a cloned identity (sessions.py CloneWatch)
            return
        presence.registry.add(session)
        self._admission.session_seen(session.agent_id, hello, session.capabilities)
        self._log.info(
            "agent {agent} session open via {via} ({n} sessions)",
            agent=session.agent_id,
            via=session.via,
            n=len(presence.registry),
        )
        self._policies.session_opened(session.agent_id, hello)
        self._profiles.session_opened(session.agent_id, hello)
        self._jobs.session_opened(session.agent_id)
        now = self._clock.seconds()
        self.events.publish(
            agent_event(
                session.agent_id,
                mode="persistent",
                online=True,
                via=session.via,
                task_server=self._nodes.assignments.of(session.agent_id),
                connected_since=session.connected_at,
                last_seen=now,
            )
        )

    def session_closed(self, session: AgentSession) -> None:
        presence = self._presence
        if session.channel == "task":
            if presence.task_registry.remove(session):
                self._log.info("agent {agent} task session closed", agent=session.agent_id)
            return
        if presence.registry.remove(session):
            self._nodes.assignments.release(session.agent_id)
            if presence.closing_everything:
                return  # a stop: seen and logged once for all sessions (closing_all)
            self._admission.session_left(session.agent_id)
            self._log.info("agent {agent} session closed", agent=session.agent_id)
            self.events.publish(
                agent_event(
                    session.agent_id,
                    mode=presence.http_mode_of(session.agent_id) or "offline",
                    online=False,
                    via=None,
                    task_server=None,
                    connected_since=None,
                    last_seen=self._clock.seconds(),
                )
            )

    def handle_request(self, session: AgentSession, env: Envelope) -> Deferred[Envelope]:
        return self._requests.render(session.transport.peer_transport, env)
