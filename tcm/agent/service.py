"""The agent daemon: identity, enrollment, persistent session, runner, spool.

State directory layout:
    agent.json   agent id, server URL (written at enrollment)
    key.pem      private key (0600), made here, never leaves the machine
    cert.pem     certificate signed by the server's CA; its subject is the agent id
    ca.pem       the CA this agent trusts for its server
    jobs/        the ledger and result spool (ledger.py)
    policies.json  the policies in force (policies.py)
    profile.json   the connection profile in force (profile.py)
"""

from __future__ import annotations

import json
import random
import socket
from typing import Any

import attrs
import treq
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.web.client import Agent
from zope.interface import implementer

from tcm import compat
from tcm.agent.backoff import RestartHint, backoff_policy
from tcm.agent.control import control_service
from tcm.agent.gateways import Destinations, RotatingEndpoint, ws_url
from tcm.agent.ledger import FINISHED, Ledger
from tcm.agent.link import HttpsClient, Identity, ServerLink, _EndpointFactory, server_endpoint
from tcm.agent.modes import ConnectionMode
from tcm.agent.policies import PolicyEngine, load_policy_handlers
from tcm.agent.poller import Poller
from tcm.agent.profile import ProfileKeeper
from tcm.agent.proxy import HTTPProxy, ProxyError
from tcm.agent.runner import ActionContext, ActionRunner, load_handlers, validator_for
from tcm.agent.session import AgentClientFactory, SessionRefused
from tcm.agent.taskclient import TaskClient
from tcm.interfaces import ActionFailed
from tcm.process import stop_with_failure
from tcm.protocol import codes
from tcm.statedir import StateDir
from tcm.tls import pki

DEFAULT_KEEPALIVE = 50.0


class EnrollmentError(Exception):
    """Enrollment was refused or could not be done; the message says why."""


class EnrollmentUnavailable(EnrollmentError):
    """The server could not be reached, or was busy (5xx): worth trying again."""


@attrs.define
class AgentConfig:
    state_dir: str
    server: str | None = None
    ca_cert: str | None = None
    token: str | None = None
    keepalive: float | None = None  # None: as the server's welcome says (50 s until then)
    keepalive_timeout: float = 20.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_message_size: int = 1024 * 1024
    spool_fsync: bool = True
    flush_interval: float = 30.0
    proxy: str | None = None  # http://[user:pass@]host:port, for WSS and HTTPS alike
    long_poll: bool = True  # use long-polls in HTTP mode where the server allows them
    control_socket: bool = True
    bind_address: str | None = None  # source address of connections (swarm)
    fallback_delay: float = 60.0  # seconds (jittered) before polling after a session loss
    gateways: list[str] = attrs.field(factory=list)  # tried in turn when the server is not


class AgentState(StateDir):
    """The agent's files in its state directory."""

    META = "agent.json"

    def enrolled(self) -> bool:
        return self.read("cert.pem") is not None and "agent_id" in self.meta()

    def identity(self) -> Identity:
        ca = self.read("ca.pem")
        if ca is None:
            raise EnrollmentError(f"no CA certificate in {self.dir}: give --ca-cert")
        return Identity(ca_pem=ca, cert_pem=self.read("cert.pem"), key_pem=self.read("key.pem"))


def _untrusted(error: BaseException) -> bool:
    """Did the TLS handshake fail on the server's certificate (not on the network)?"""
    from OpenSSL import SSL
    from service_identity import VerificationError

    causes = [error]
    for reason in getattr(error, "reasons", None) or []:  # twisted.web's ResponseNeverReceived
        causes.append(getattr(reason, "value", reason))
    return any(
        isinstance(c, VerificationError)
        or (isinstance(c, SSL.Error) and "certificate verify failed" in pki.describe_tls_error(c))
        for c in causes
    )


@inlineCallbacks
def enroll(
    reactor: Any,
    state: AgentState,
    server: str,
    ca_pem: bytes,
    token: str,
    bind: str | None = None,
    proxy: Any = None,
):
    """Make a key, send a CSR with the token, keep the signed certificate."""
    log = Logger(namespace="tcm.agent.enroll")
    key_pem = state.read("key.pem")
    if key_pem is None:
        key_pem = pki.key_to_pem(pki.generate_key())
        pki.write_private(state.path("key.pem"), key_pem)
    csr = pki.make_csr(pki.load_key(key_pem))
    identity = Identity(ca_pem=ca_pem)
    http = treq.client.HTTPClient(
        Agent.usingEndpointFactory(reactor, _EndpointFactory(reactor, identity, proxy, bind))
    )
    url = server.rstrip("/") + "/agent/v1/enroll"
    body = {"token": token, "csr": csr.decode(), "hostname": socket.gethostname()}
    try:
        resp = yield http.post(url, json=body, timeout=30)
        payload = yield resp.json()
    except Exception as e:
        if _untrusted(e):  # a wrong --ca-cert (or not our server): trying again cannot help
            raise EnrollmentError(
                f"cannot enroll with {server}: its certificate is not trusted with the given "
                f"--ca-cert ({pki.describe_tls_error(e)})"
            ) from None
        raise EnrollmentUnavailable(
            f"cannot reach {server} to enroll: {pki.describe_tls_error(e)}"
        ) from None
    if resp.code >= 500:
        raise EnrollmentUnavailable(
            f"{server} could not enroll this agent now: {payload.get('error', payload)} "
            f"({resp.code})"
        )
    if resp.code != 201:
        raise EnrollmentError(
            f"enrollment refused by {server}: {payload.get('error', payload)} ({resp.code})"
        )
    pki.write_public(state.path("ca.pem"), ca_pem)
    pki.write_public(state.path("cert.pem"), payload["certificate"].encode())
    pki.write_public(
        state.path("agent.json"),
        json.dumps({"agent_id": payload["agent_id"], "server": server}, indent=1).encode(),
    )
    log.info("enrolled with {server} as {agent}", server=server, agent=payload["agent_id"])
    return payload["agent_id"]


class AgentCore:
    """Everything one agent holds, shared by its session, runner and control."""

    _log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        reactor: Any = None,
        handlers: dict | None = None,
        policy_handlers: dict | None = None,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.clock = reactor
        self.config = config
        self.state = AgentState(config.state_dir)
        self.handlers = handlers if handlers is not None else load_handlers()
        self.ledger = Ledger(self.state.path("jobs"), fsync=config.spool_fsync)
        self.agent_id: str | None = None
        self.server: str | None = None
        self.link: ServerLink | None = None
        self.runner: ActionRunner | None = None
        self.protocol: Any = None  # the live WebSocket protocol, if any
        self.mode = ConnectionMode(self.clock, self._mode_changed)
        self.poller = Poller(self, long_poll=config.long_poll)
        self.proxy: Any = None
        self.session_service: ClientService | None = None
        self.counting: Any = None
        self.connected_since: float | None = None
        self.reconnects = 0
        self.last_refusal: str | None = None
        self.user_disconnected = False
        self.identity: Identity | None = None
        self.task_client = TaskClient(self)
        self.restart_hint = RestartHint(self.clock)
        self.defaults = attrs.evolve(config)  # what an agent.settings or a profile changes
        self.policies = PolicyEngine(
            self,
            policy_handlers if policy_handlers is not None else load_policy_handlers(),
            self.state.dir,
        )
        self.profile = ProfileKeeper(self)
        self.flush_loop: LoopingCall | None = None

    def state_filepath(self) -> FilePath:
        return FilePath(self.state.dir)

    def capabilities(self) -> list[dict[str, Any]]:
        return [
            {"name": h.name, "streams": bool(h.streams), "task": bool(h.task)}
            for h in sorted(self.handlers.values(), key=lambda h: h.name)
        ]

    @inlineCallbacks
    def prepare(self):
        """Enroll if needed, then build the link and runner."""
        cfg = self.config
        if cfg.proxy:
            self.proxy = HTTPProxy.parse(cfg.proxy)
        if not self.state.enrolled():
            if not (cfg.server and cfg.token and cfg.ca_cert):
                raise EnrollmentError("not enrolled yet: give --server, --ca-cert and --token")
            with open(cfg.ca_cert, "rb") as f:
                ca_pem = f.read()
            # Unreachable or busy (a thousand agents enrolling at once): try again with the
            # session's backoff; refused (a bad or used token): give up at once, with why.
            delay = backoff_policy(cfg.backoff_initial, 2.0, cfg.backoff_max)
            attempt = 0
            while True:
                try:
                    yield enroll(
                        self.reactor,
                        self.state,
                        cfg.server,
                        ca_pem,
                        cfg.token,
                        cfg.bind_address,
                        self.proxy,
                    )
                    break
                except EnrollmentUnavailable as e:
                    wait = delay(attempt)
                    attempt += 1
                    self._log.warn("{why}; trying again in {wait:.1f} s", why=str(e), wait=wait)
                    yield deferLater(self.reactor, wait, lambda: None)
        meta = self.state.meta()
        self.agent_id = meta["agent_id"]
        self.server = cfg.server or meta["server"]
        self.profile.restore()  # may set server, proxy and timings before the first connection
        identity = self.identity = self.state.identity()
        https = HttpsClient(self.reactor, self.server, identity, self.proxy, bind=cfg.bind_address)
        self.link = ServerLink(https)
        self.runner = ActionRunner(
            self.handlers, self.ledger, self.link, self.reactor, FilePath(self.state.dir)
        )
        self._log.info(
            "agent {agent} for {server}; {n} results waiting in the spool",
            agent=self.agent_id,
            server=self.server,
            n=self.ledger.count(FINISHED),
        )
        return identity

    def make_session_service(self, identity: Identity) -> ClientService:
        cfg = self.config
        assert self.server is not None
        endpoint, url = self._session_endpoint(identity)
        factory = AgentClientFactory(
            self,
            url,
            cfg.keepalive or DEFAULT_KEEPALIVE,
            cfg.keepalive_timeout,
            cfg.max_message_size,
        )
        self._session_factory = factory
        self.session_service = ClientService(
            _AttemptWatcher(endpoint, self._attempt_failed),
            factory,
            # read at each attempt: a connection profile may change the backoff at run time,
            # and a server that said it restarts is tried again every few seconds
            retryPolicy=lambda attempt: self.restart_hint.delay(
                attempt,
                backoff_policy(self.config.backoff_initial, 2.0, self.config.backoff_max),
            ),
            clock=self.reactor,
            prepareConnection=self._session_ready,
        )
        return self.session_service

    # -- server and gateways ----------------------------------------------------------
    destinations: Destinations | None = None
    _session_factory: Any = None

    def _session_endpoint(self, identity: Identity) -> tuple[Any, str]:
        """The session's endpoint and URL: the server, or with --gateway a rotation of the
        server (first, preferred) and the gateways (tcm/agent/gateways.py)."""
        cfg = self.config
        assert self.server is not None

        def endpoint_for(base: str) -> Any:
            endpoint, self.counting = server_endpoint(
                self.reactor, base, identity, self.proxy, count=True, bind=cfg.bind_address
            )
            return endpoint

        if not cfg.gateways:
            self.destinations = None
            return endpoint_for(self.server), ws_url(self.server)
        self.destinations = Destinations([self.server, *cfg.gateways])
        rotating = RotatingEndpoint(self.destinations, endpoint_for, self._destination_switched)
        return rotating, ws_url(self.server)

    def _destination_switched(self, base: str) -> None:
        """Sessions and HTTPS calls go to `base` from now on."""
        self._log.info("connecting through {base}", base=base)
        if self._session_factory is not None:
            f = self._session_factory  # Autobahn resets what is not given again
            f.setSessionParameters(
                url=ws_url(base),
                origin=f.origin,
                protocols=f.protocols,
                useragent=f.useragent,
                headers=f.headers,
                proxy=f.proxy,
            )
        if self.link is not None:
            self.link.https.base_url = base

    # -- mode changes -----------------------------------------------------------------
    def _mode_changed(self, old: str, new: str, reason: str) -> None:
        self._log.info("connection mode {old} -> {new}: {reason}", old=old, new=new, reason=reason)

    def _fall_back(self, reason: str, at_once: bool = False) -> None:
        """No session: work over HTTPS until the session is back.

        When the server (or a proxy, or the endpoint's owner) says no on purpose, polling
        starts at once. After a session that was simply lost (a server restart, a network
        blip) the first poll waits `fallback_delay` seconds, jittered: the session usually
        comes back first, and ten thousand agents polling while they also reconnect would
        double the load of a reconnect storm."""
        delay = 0.0 if at_once else self.config.fallback_delay * (0.5 + 0.5 * random.random())
        self.poller.start(reason, delay)

    def _attempt_failed(self, reason: str, deliberate: bool = False) -> None:
        """A connection attempt failed before the WebSocket opened (TCP, TLS, proxy).
        `deliberate`: something said no on purpose (a proxy refusing CONNECT), not a
        server that is down or busy."""
        self.reconnects += 1
        self.last_refusal = reason
        self._log.warn("persistent connection attempt failed: {why}", why=reason)
        self._fall_back(f"persistent connection failed: {reason}", at_once=deliberate)

    def _session_ready(self, protocol: Any) -> Deferred:
        """ClientService waits on this: a session counts only once the server welcomed it."""
        d = protocol.connection.welcomed

        def welcomed(conn):
            # ClientService hands us a proxy of the protocol; keep the protocol itself.
            self.protocol = conn.protocol
            self.connected_since = self.clock.seconds()
            self.last_refusal = None
            self.restart_hint.reconnected()
            assert self.link is not None and self.runner is not None
            self.link.session = conn
            self._log.info(
                "persistent session open (session {sid})", sid=conn.welcome.get("session")
            )
            self.poller.stop()
            self.mode.event("session_open", "persistent session open")
            if self.config.keepalive is None:
                self.adopt_keepalive(conn.protocol, conn.welcome.get("keepalive"))
            if "task_server" in conn.welcome:
                self.task_client.assign(
                    conn.welcome["task_server"], conn.welcome.get("task_server_status")
                )
            self.runner.flush()
            # the hello told the server which profile this agent runs
            self.profile.reported = {
                "name": (self.profile.current or {}).get("name"),
                "version": (self.profile.current or {}).get("version"),
            }
            self.fetch_config("session start", conn.welcome)
            return conn

        def refused(f):
            f.trap(SessionRefused)
            if self.destinations is not None:
                self.destinations.move_on(f"refused the session ({f.value.code})")
            # The session failed while ClientService still waits on this Deferred: it will
            # count a failed attempt (and back off). It has no transition for the lost
            # connection that follows, so that one notification is not passed on.
            compat.ignore_lost_notification(protocol)
            self.reconnects += 1
            why = describe_close(f.value.code, f.value.reason)
            self.last_refusal = why
            self._log.warn("persistent session refused: {why}", why=why)
            self._fall_back(f"persistent session refused: {why}", at_once=switched_off(f.value))
            return f

        return d.addCallbacks(welcomed, refused)

    def session_keepalive(self) -> float:
        """The keepalive the core session runs with now (the server's, once welcomed)."""
        return float(self.config.keepalive or self._keepalive or DEFAULT_KEEPALIVE)

    _keepalive: float | None = None

    def adopt_keepalive(self, protocol: Any, keepalive: Any) -> None:
        """Ping as often as the server asks (it closes sessions that stay silent for
        2 x keepalive + timeout), from this connection's next ping on."""
        if not isinstance(keepalive, (int, float)) or keepalive <= 0:
            return
        keepalive = self._keepalive = float(keepalive)
        type(protocol).autoPingInterval = keepalive  # later connections (wsbase.bind_options)
        if protocol.autoPingInterval == keepalive:
            return
        protocol.autoPingInterval = keepalive
        # the first ping was scheduled at open with the old value
        compat.reschedule_auto_ping(protocol, self.clock, keepalive)

    def session_lost(self, protocol: Any, code: int | None, reason: str | None) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.connected_since = None
        assert self.link is not None
        self.link.session = None
        why = describe_close(code, reason)
        self._log.info("persistent session closed: {why}", why=why)
        if code == codes.CLOSE_RESTARTING:
            self.restart_hint.server_restarting()
        if self.destinations is not None:
            self.destinations.session_ended(code)
        self.mode.event("session_lost", why)
        self._fall_back(
            f"persistent session closed: {why}", at_once=code == codes.CLOSE_PERSISTENT_OFF
        )

    def notified(self, data: dict[str, Any]) -> None:
        """The server says something changed: fetch it again."""
        topic = data.get("topic")
        self._log.info("server notifies {topic}", topic=topic)
        if topic == "policies":
            what = data.get("name") or "policies"
            self.policies.fetch(f"the server notified a change of {what}", report_all=True)
        elif topic == "profile":
            self.profile.fetch("the server notified a profile change")
        elif topic == "task_server":
            task_server = data.get("task_server")
            self.task_client.assign(
                task_server if isinstance(task_server, dict) else None,
                str(data.get("task_server_status") or ""),
            )

    def fetch_config(self, why: str, welcome: dict[str, Any] | None = None) -> None:
        """At session start and when HTTP mode starts: fetch profile and policies. A
        welcome saying the server has none of one kind spares the fetch when the agent has
        none either (a reconnect storm on a server without policies costs nothing more)."""
        welcome = welcome or {}
        if not (welcome.get("profile_count") == 0 and self.profile.current is None):
            self.profile.fetch(why)
        if not (welcome.get("policy_count") == 0 and not self.policies.policies):
            self.policies.fetch(why)

    def polling_started(self) -> None:
        """The first poll of an HTTP-mode period was answered."""
        self.fetch_config("HTTP mode")

    # -- what policies may use ----------------------------------------------------------
    def run_action_locally(self, name: str, args: dict[str, Any]) -> Deferred:
        """Run one of this agent's actions for a policy (no job, no server round trip)."""
        handler = self.handlers.get(name)
        if handler is None:
            raise ActionFailed(f"no action {name!r} on this agent")
        try:
            validator_for(handler)(args)
        except Exception as e:
            raise ActionFailed(f"invalid arguments for {name}: {e}") from None
        assert self.runner is not None
        context = ActionContext(
            f"policy-{name}", None, self.reactor, self.state_filepath(), self.runner, local=True
        )
        return maybeDeferred(handler.run, context, args)

    def set_agent_settings(self, settings: dict[str, Any]) -> None:
        """Apply an agent.settings document; {} restores the defaults."""
        interval = settings.get("flush_interval", self.defaults.flush_interval)
        fsync = settings.get("spool_fsync", self.defaults.spool_fsync)
        self.ledger.fsync = bool(fsync)
        if interval != self.config.flush_interval:
            self.config.flush_interval = float(interval)
            if self.flush_loop is not None and self.flush_loop.running:
                self.flush_loop.stop()
                self.flush_loop.start(self.config.flush_interval, now=False)
        self._log.info(
            "agent settings: flush every {interval} s, spool fsync {fsync}",
            interval=self.config.flush_interval,
            fsync=self.ledger.fsync,
        )

    def start_flush_loop(self) -> None:
        assert self.runner is not None
        self.flush_loop = LoopingCall(self.runner.flush)
        self.flush_loop.clock = self.reactor
        self.flush_loop.start(self.config.flush_interval, now=True)

    # -- connection profile --------------------------------------------------------------
    def persistent_allowed(self) -> bool:
        return not self.user_disconnected and self.profile.persistent_connections()

    def set_persistent(self, on: bool, reason: str) -> None:
        """A connection profile switches persistent connections on or off (no restart)."""
        service = self.session_service
        if not on:
            if self.protocol is not None:
                assert self.link is not None
                self.link.session = None  # calls from here on go over HTTPS
                self.protocol.sendClose(
                    codes.CLOSE_BY_PROFILE, codes.CLOSE_REASONS[codes.CLOSE_BY_PROFILE]
                )
            if service is not None and service.running:
                service.stopService()
            self.task_client.assign(None, reason)  # the next welcome assigns one again
            self.mode.event("profile_http", reason)
            self._fall_back(reason, at_once=True)
        elif not self.user_disconnected and service is not None and not service.running:
            self._log.info("persistent connections on again ({reason})", reason=reason)
            service.startService()

    def rebuild_connections(self, reason: str) -> None:
        """Servers or proxy changed: new HTTPS client and a new session service."""
        self._log.info("reconnecting: {reason}", reason=reason)
        assert self.identity is not None and self.link is not None and self.server is not None
        cfg = self.config
        self.link.https = HttpsClient(
            self.reactor, self.server, self.identity, self.proxy, bind=cfg.bind_address
        )
        old = self.session_service
        parent = old.parent if old is not None else None
        if old is not None:
            if self.protocol is not None:
                self.link.session = None
                self.protocol.sendClose(codes.CLOSE_NORMAL, "connection profile changed")
            if parent is not None:
                old.disownServiceParent()  # stops it
            elif old.running:
                old.stopService()
        new = self.make_session_service(self.identity)
        if parent is not None:
            new.setServiceParent(parent)  # starts it: the parent runs
            if not self.persistent_allowed():
                new.stopService()

    # -- local control (tcm-agent status / disconnect / reconnect) -----------------------
    def user_disconnect(self) -> dict[str, Any]:
        if not self.user_disconnected:
            self.user_disconnected = True
            self._log.info("persistent connection terminated on the agent (tcm-agent disconnect)")
            if self.protocol is not None:
                self.protocol.sendClose(
                    codes.CLOSE_BY_AGENT_USER, codes.CLOSE_REASONS[codes.CLOSE_BY_AGENT_USER]
                )
            if self.session_service is not None and self.session_service.running:
                self.session_service.stopService()
            self.task_client.assign(None, "terminated by tcm-agent disconnect")
            self.mode.event("user_disconnect", "terminated by tcm-agent disconnect")
            self._fall_back("persistent connection terminated on the agent", at_once=True)
        return {"mode": self.mode.state, "persistent_disabled": True}

    def user_reconnect(self) -> dict[str, Any]:
        if self.user_disconnected:
            self.user_disconnected = False
            self._log.info("persistent connection allowed again (tcm-agent reconnect)")
            if (
                self.session_service is not None
                and not self.session_service.running
                and self.persistent_allowed()
            ):
                self.session_service.startService()
        return {"mode": self.mode.state, "persistent_disabled": False}

    def status(self) -> dict[str, Any]:
        """The Network Status: where the agent connects, how, and what is waiting."""
        proto = self.protocol
        traffic = self.counting.current if self.counting is not None else None
        conn = proto.connection if proto is not None else None
        poller = self.poller
        return {
            "agent_id": self.agent_id,
            "server": self.server,
            "proxy": str(self.proxy) if self.proxy is not None else None,
            "mode": self.mode.state,
            "mode_since": self.mode.since,
            "persistent": {
                "connected": proto is not None,
                "connected_since": self.connected_since,
                "session": (conn.welcome or {}).get("session") if conn else None,
                "tls": proto.tls_info() if proto is not None else None,
                "bytes_sent": traffic.sent if traffic and proto is not None else 0,
                "bytes_received": traffic.received if traffic and proto is not None else 0,
                "disabled_by_user": self.user_disconnected,
            },
            "http": {
                "polling": poller.running,
                "long_poll": poller.long_poll if poller.use_long_poll else 0,
                "poll_interval": poller.poll_interval,
                "polls": poller.polls,
                "last_poll": poller.last_poll,
                "last_poll_ok": poller.last_poll_ok,
                "last_error": poller.last_error,
                "bytes_sent": self.link.https.traffic.sent if self.link else 0,
                "bytes_received": self.link.https.traffic.received if self.link else 0,
            },
            "task": self.task_client.status(),
            "reconnect_attempts": self.reconnects,
            "last_refusal": self.last_refusal,
            "results_waiting": self.ledger.count(FINISHED),
            "jobs_running": len(self.runner.running_jobs()) if self.runner else 0,
            "mode_history": list(self.mode.history)[-5:],
            "profile": self.profile.status(),
            "policies": {
                name: dict(entry, type=self.policies.policies.get(name, {}).get("type"))
                for name, entry in sorted(self.policies.status.items())
            },
        }


def switched_off(refusal: Any) -> bool:
    """Did the server refuse the session because persistent connections are off?"""
    text = f"{refusal.code} {refusal.reason or ''}"
    return refusal.code == codes.CLOSE_PERSISTENT_OFF or "[503]" in text


def describe_close(code: int | None, reason: str | None) -> str:
    """A close code and reason as one line, with tcm's meaning of the code."""
    meaning = codes.CLOSE_REASONS.get(code or 0)
    text = f"{code}" if code is not None else "no close code"
    if reason:
        text += f" {reason}"
    if meaning and (not reason or meaning not in reason):
        text += f" ({meaning})"
    return text


@implementer(IStreamClientEndpoint)
class _AttemptWatcher:
    """Tells the agent when a connection attempt fails below the WebSocket (TCP, TLS,
    proxy), so it can fall back at once while ClientService retries."""

    def __init__(self, inner: Any, on_failure: Any):
        self._inner = inner
        self._on_failure = on_failure

    def connect(self, factory: Any):
        def failed(f):
            if not f.check(CancelledError):
                self._on_failure(pki.describe_tls_error(f.value), bool(f.check(ProxyError)))
            return f

        return self._inner.connect(factory).addErrback(failed)


class AgentService(service.MultiService):
    """Enrolls, then runs the session, the control socket and the spool timer."""

    _log = Logger()

    def __init__(self, core: AgentCore, exit_on_failure: bool = True):
        super().__init__()
        self.core = core
        self.exit_on_failure = exit_on_failure  # a swarm member's failure ends only itself

    def startService(self):
        service.Service.startService(self)
        d = self.core.prepare()
        d.addCallback(self._prepared)
        d.addErrback(self._failed)

    def _prepared(self, identity: Identity) -> None:
        if not self.running:
            return
        core = self.core
        assert core.runner is not None
        core.runner.recover()
        if core.config.control_socket:
            control_service(core, core.state.dir).setServiceParent(self)
        core.policies.restore()
        session = core.make_session_service(identity)
        session.setServiceParent(self)
        if not core.profile.persistent_connections():
            session.stopService()
            core.mode.event("profile_http", "persistent connections off in the profile")
            core._fall_back("persistent connections off in the connection profile", at_once=True)
        core.start_flush_loop()

    def _failed(self, f):
        if f.check(EnrollmentError):
            self._log.error("{why}", why=f.getErrorMessage())
        else:
            self._log.failure("agent failed to start", f)
        if self.exit_on_failure:
            stop_with_failure(self.core.reactor)

    def stopService(self):
        service.Service.stopService(self)
        self.core.poller.stop()
        self.core.task_client.stop()
        self.core.policies.stop_all()
        if self.core.flush_loop is not None and self.core.flush_loop.running:
            self.core.flush_loop.stop()
        return DeferredList(
            [maybeDeferred(c.stopService) for c in reversed(list(self)) if c.running]
        )


def make_agent_service(config: AgentConfig, reactor: Any = None) -> AgentService:
    return AgentService(AgentCore(config, reactor))
