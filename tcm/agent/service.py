"""The agent daemon's composition root: `make_agent` builds and wires one agent's parts.

`AgentService` enrolls first (enrollment.py), then calls `make_agent`, which gives each part
only the collaborators it uses, typed by the interfaces in tcm/interfaces.py:

    part                      gets
    ActionRunner (runner.py)  handlers, ledger, the agent API (IAgentAPI), reactor
    PolicyEngine              policy handlers, IAgentAPI, clock, IPolicyAgent (LocalActions)
    ProfileKeeper             IAgentAPI; tells IProfileFollower (the connection) its settings
    SessionHost (host.py)     runner, handlers, policy types, the profile in force
    ServerConnection          config, identity, the link, ISessionHost; owns session
                              service, destinations, poller, mode, restart hint
    TaskClient                config, identity, IAgentAPI, ISessionHost, IServerConnection
    control socket            IAgentControl (Agent, below)

The connection tells its `ISessionObserver`s (task client, runner, profile keeper, policy
engine, in that order) when a session opens or is lost, and when polling reaches the server;
`notify` topics go from the session host to the part that subscribed to the topic.
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcm.agent.config import DEFAULT_KEEPALIVE, AgentConfig
from tcm.agent.connection import ServerConnection, describe_close, parse_proxy, switched_off
from tcm.agent.control import control_service
from tcm.agent.enrollment import (
    AgentState,
    EnrollmentError,
    EnrollmentUnavailable,
    enroll,
    enroll_if_needed,
)
from tcm.agent.host import LocalActions, SessionHost
from tcm.agent.ledger import FINISHED, Ledger
from tcm.agent.link import HttpsClient, Identity, ServerLink
from tcm.agent.policies import PolicyEngine, load_policy_handlers
from tcm.agent.profile import ProfileKeeper
from tcm.agent.renewal import CertificateRenewal
from tcm.agent.runner import ActionRunner, load_handlers
from tcm.agent.taskclient import TaskClient
from tcm.heap import QuietSettler
from tcm.interfaces import (
    IAgentAPI,
    IAgentControl,
    IPolicyAgent,
    IProfileFollower,
    IServerConnection,
    ISessionHost,
    ISessionObserver,
)
from tcm.process import stop_with_failure

__all__ = [
    "DEFAULT_KEEPALIVE",
    "Agent",
    "AgentConfig",
    "AgentService",
    "AgentState",
    "EnrollmentError",
    "EnrollmentUnavailable",
    "describe_close",
    "enroll",
    "make_agent",
    "make_agent_service",
    "switched_off",
]


@implementer(IAgentControl)
class Agent:
    """One enrolled agent, wired: what its service starts and stops, and what its control
    socket and a swarm read."""

    __slots__ = (  # one per agent, thousands in a swarm process: no __dict__
        "agent_id",
        "state_dir",
        "connection",
        "task_client",
        "runner",
        "ledger",
        "profile",
        "policies",
        "local",
        "renewal",
    )

    def __init__(
        self,
        agent_id: str,
        state_dir: str,
        connection: ServerConnection,
        task_client: TaskClient,
        runner: ActionRunner,
        ledger: Ledger,
        profile: ProfileKeeper,
        policies: PolicyEngine,
        local: LocalActions,
        renewal: CertificateRenewal,
    ):
        self.agent_id = agent_id
        self.state_dir = state_dir
        self.connection = connection
        self.task_client = task_client
        self.runner = runner
        self.ledger = ledger
        self.profile = profile
        self.policies = policies
        self.local = local
        self.renewal = renewal

    def start(self, parent: service.MultiService, control_socket: bool) -> None:
        """Recover interrupted jobs, open the control socket, put the stored policies in
        force, connect, and send waiting results on a timer."""
        self.runner.recover()
        if control_socket:
            control_service(self.connection.reactor, self, self.state_dir).setServiceParent(parent)
        if self.renewal.expired():  # only a token helps: say so rather than fail TLS forever
            self.renewal.start()
            return
        self.renewal.start()
        self.policies.restore()
        self.connection.start(parent)
        self.local.start_flush_loop()

    def stop(self) -> None:
        """Before the services under the agent's stop: polls, task session, policies, timer."""
        self.connection.stop()
        self.task_client.stop()
        self.runner.stop()  # the jobs' commands end with the agent
        self.policies.stop_all()
        self.local.stop_flush_loop()
        self.renewal.stop()

    # -- local control (tcm-agent status / disconnect / reconnect) -----------------------
    def user_disconnect(self) -> dict[str, Any]:
        return self.connection.user_disconnect()

    def user_reconnect(self) -> dict[str, Any]:
        return self.connection.user_reconnect()

    def status(self) -> dict[str, Any]:
        """The Network Status: where the agent connects, how, and what is waiting."""
        c = self.connection.status()
        return {
            "agent_id": self.agent_id,
            "server": c["server"],
            "proxy": c["proxy"],
            "mode": c["mode"],
            "mode_since": c["mode_since"],
            "persistent": c["persistent"],
            "http": c["http"],
            "task": self.task_client.status(),
            "reconnect_attempts": c["reconnect_attempts"],
            "last_refusal": c["last_refusal"],
            "certificate": self.renewal.status(),
            "results_waiting": self.ledger.count(FINISHED),
            "jobs_running": len(self.runner.running_jobs()),
            "mode_history": c["mode_history"],
            "profile": self.profile.status(),
            "policies": {
                name: dict(entry, type=self.policies.policies.get(name, {}).get("type"))
                for name, entry in sorted(self.policies.status.items())
            },
        }


def make_agent(
    config: AgentConfig,
    reactor: Any,
    state: AgentState,
    identity: Identity,
    handlers: dict[str, Any],
    policy_handlers: dict[str, Any],
    activity: Any = None,
) -> Agent:
    """Build one enrolled agent's parts and wire them (the module's docstring has the map).
    `activity` is called when a session opened, a job concluded or its result was
    acknowledged (the process's QuietSettler, in an agent process of its own)."""
    meta = state.meta()
    server = config.server or meta["server"]
    if not config.servers and not config.server:
        config.servers = [u for u in meta.get("servers", []) if u != server]
    proxy = parse_proxy(config.proxy)
    ledger = Ledger(state.path("jobs"), fsync=config.spool_fsync)
    link = ServerLink(HttpsClient(reactor, server, identity, proxy, bind=config.bind_address))
    runner = ActionRunner(handlers, ledger, link, reactor, FilePath(state.dir), activity)
    local = LocalActions(reactor, config, handlers, runner, ledger, state.dir)
    policies = PolicyEngine(policy_handlers, state.dir, link, reactor, local)
    profile = ProfileKeeper(state.dir, link)
    host = SessionHost(reactor, runner, handlers, policy_handlers, profile)
    connection = ServerConnection(reactor, config, identity, link, host, server, proxy)
    task_client = TaskClient(reactor, config, identity, link, host, connection)
    renewal = CertificateRenewal(
        reactor,
        state.dir,
        identity,
        link,
        config.renew_fraction,
        on_expired=lambda why: _stop_connecting(connection),
    )
    verifyObject(IAgentAPI, link)
    verifyObject(IPolicyAgent, local)
    verifyObject(ISessionHost, host)
    verifyObject(IServerConnection, connection)
    verifyObject(IProfileFollower, connection)

    host.on_notify("policies", policies.notified)
    host.on_notify("profile", profile.notified)
    host.on_notify("task_server", task_client.notified)
    for observer in (task_client, runner, profile, policies, renewal):  # the order told in
        verifyObject(ISessionObserver, observer)
        connection.subscribe(observer)
    profile.subscribe(connection)
    profile.restore()  # may set server, proxy and timings before the first connection

    agent_id = meta["agent_id"]
    agent = Agent(
        agent_id,
        state.dir,
        connection,
        task_client,
        runner,
        ledger,
        profile,
        policies,
        local,
        renewal,
    )
    verifyObject(IAgentControl, agent)
    Logger(namespace=__name__).info(
        "agent {agent} for {server}; {n} results waiting in the spool",
        agent=agent.agent_id,
        server=connection.server,
        n=ledger.count(FINISHED),
    )
    return agent


def _stop_connecting(connection: ServerConnection) -> None:
    """An expired certificate: no session nor poll can succeed, only a new enrollment."""
    if connection.session_service is not None and connection.session_service.running:
        connection.session_service.stopService()
    connection.stop()


class AgentService(service.MultiService):
    """Enrolls, then runs the session, the control socket and the spool timer.

    `settles_heap`: the agent has the process to itself (`twistd tcm-agent`, not a swarm's
    member): its heap is settled once quiet after its start, each session opened and each job
    (tcm.heap.QuietSettler; 1.1 MiB of an idle agent's RSS, docs/performance.md)."""

    _log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        reactor: Any = None,
        handlers: dict[str, Any] | None = None,
        policy_handlers: dict[str, Any] | None = None,
        exit_on_failure: bool = True,
        settles_heap: bool = False,
    ):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.config = config
        self.state = AgentState(config.state_dir)
        # a swarm's agents share one set of handlers, loaded once
        self.handlers = handlers if handlers is not None else load_handlers()
        self.policy_handlers = (
            policy_handlers if policy_handlers is not None else load_policy_handlers()
        )
        self.exit_on_failure = exit_on_failure  # a swarm member's failure ends only itself
        self.agent: Agent | None = None  # once enrolled
        self.settler = QuietSettler(self.reactor) if settles_heap else None

    def startService(self):
        service.Service.startService(self)
        proxy = parse_proxy(self.config.proxy)
        d = enroll_if_needed(self.reactor, self.config, self.state, proxy)
        d.addCallback(self._enrolled)
        d.addErrback(self._failed)

    def _enrolled(self, identity: Identity) -> None:
        if not self.running:
            return
        poke = self.settler.poke if self.settler is not None else None
        self.agent = make_agent(
            self.config,
            self.reactor,
            self.state,
            identity,
            self.handlers,
            self.policy_handlers,
            activity=poke,
        )
        self.agent.start(self, self.config.control_socket)
        if poke is not None:
            poke()  # what starting left behind, settled even if no session opens soon

    def _failed(self, f):
        if f.check(EnrollmentError):
            self._log.error("{why}", why=f.getErrorMessage())
        else:
            self._log.failure("agent failed to start", f)
        if self.exit_on_failure:
            stop_with_failure(self.reactor)

    def stopService(self):
        service.Service.stopService(self)
        if self.settler is not None:
            self.settler.stop()
        if self.agent is not None:
            self.agent.stop()
        return DeferredList(
            [maybeDeferred(c.stopService) for c in reversed(list(self)) if c.running]
        )


def make_agent_service(config: AgentConfig, reactor: Any = None) -> AgentService:
    """The service of `twistd tcm-agent`: one agent with the process to itself."""
    return AgentService(config, reactor, settles_heap=True)
