"""The agent's connection to its server: one object for its whole lifecycle.

`ServerConnection` owns what decides how the agent reaches its server:
    the persistent session  a ClientService whose prepareConnection waits for the welcome
    destinations            the server, else its gateways in turn (gateways.py)
    the poller              HTTPS polling while there is no session (poller.py)
    the connection mode     persistent / http / disconnected, with reasons (modes.py)
    the restart hint        short retries after the server said it restarts (backoff.py)
and tells its subscribers (`ISessionObserver`: the runner, the task client, the profile keeper,
the policy engine) that a session opened or was lost, or that polling reached the server. It
follows the connection profile in force (`IProfileFollower`) and obeys `tcm-agent
disconnect/reconnect`. Nothing else starts, stops or reads the session.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application import service
from twisted.application.internet import ClientService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from tcm import compat
from tcm.agent.backoff import RestartHint, backoff_policy
from tcm.agent.config import DEFAULT_KEEPALIVE, AgentConfig
from tcm.agent.gateways import Destinations, RotatingEndpoint, ws_url
from tcm.agent.link import HttpsClient, Identity, ServerLink, server_endpoint
from tcm.agent.modes import ConnectionMode
from tcm.agent.poller import Poller
from tcm.agent.profile import gateway_base
from tcm.agent.session import AgentClientFactory, SessionRefused
from tcm.interfaces import IProfileFollower, IServerConnection, ISessionHost, ISessionObserver
from tcm.protocol import codes
from tcm.tls import pki

if TYPE_CHECKING:
    from tcm.agent.proxy import HTTPProxy

# proxy.py is imported only by an agent that has a proxy (issue 17: an idle agent's memory)
PROXY_ERROR = "tcm.agent.proxy.ProxyError"


@implementer(IServerConnection, IProfileFollower)
class ServerConnection:
    """How one agent reaches its server now: session, destinations, polling, mode."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        identity: Identity,
        link: ServerLink,
        host: ISessionHost,
        server: str,
        proxy: HTTPProxy | None,
    ):
        self.reactor = reactor
        self.config = config
        self._defaults = attrs.evolve(config)  # what a connection profile does not name
        self._default_server = server
        self.identity = identity
        self.link = link
        self._host = host
        self.server = server
        self.proxy = proxy
        self.mode = ConnectionMode(reactor, self._mode_changed)
        self.poller = Poller(
            reactor, link, host, self._poll_answered, self._poll_failed, config.long_poll
        )
        self.restart_hint = RestartHint(reactor)
        self.destinations: Destinations | None = None
        self.session_service: ClientService | None = None
        self._session_factory: AgentClientFactory | None = None
        self._observers: list[ISessionObserver] = []
        self.protocol: Any = None  # the live WebSocket protocol, if any
        self.counting: Any = None  # the session's CountingEndpoint
        self.connected_since: float | None = None
        self.reconnects = 0
        self.last_refusal: str | None = None
        self.user_disconnected = False
        self.profile_persistent = True  # the connection profile allows persistent connections
        self._keepalive: float | None = None  # the server's, from its welcome

    def subscribe(self, observer: ISessionObserver) -> None:
        """Tell `observer` from now on when a session opens or is lost (in this order)."""
        self._observers.append(observer)

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, parent: service.MultiService) -> None:
        """Start the session service under `parent` (or HTTPS polling, as the profile says)."""
        session = self.make_session_service()
        session.setServiceParent(parent)
        if not self.profile_persistent:
            session.stopService()
            self.mode.event("profile_http", "persistent connections off in the profile")
            self._fall_back("persistent connections off in the connection profile", at_once=True)

    def stop(self) -> None:
        """The agent stops (its services stop the session): no more polls."""
        self.poller.stop()

    def make_session_service(self) -> ClientService:
        cfg = self.config
        endpoint, url = self._session_endpoint()
        factory = AgentClientFactory(
            self._host,
            self.session_lost,
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
    def _session_endpoint(self) -> tuple[Any, str]:
        """The session's endpoint and URL: the server, or with --gateway a rotation of the
        server (first, preferred) and the gateways (tcm/agent/gateways.py)."""
        cfg = self.config
        identity = self.identity

        def endpoint_for(base: str) -> Any:
            endpoint, self.counting = server_endpoint(
                self.reactor, base, identity, self.proxy, count=True, bind=cfg.bind_address
            )
            return endpoint

        if not cfg.gateways and not cfg.servers:
            self.destinations = None
            return endpoint_for(self.server), ws_url(self.server)
        # the server first, then the other nodes of its cluster, then its gateways
        servers = [self.server, *(u for u in cfg.servers if u != self.server)]
        self.destinations = Destinations([*servers, *cfg.gateways], servers=len(servers))
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
        self.link.https.base_url = base

    def _https_client(self) -> HttpsClient:
        return HttpsClient(
            self.reactor, self.server, self.identity, self.proxy, bind=self.config.bind_address
        )

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

    def _poll_answered(self, first: bool) -> None:
        self.mode.event("poll_ok", "HTTPS poll answered")
        if first:
            for observer in self._observers:
                observer.polling_started()

    def _poll_failed(self, why: str) -> None:
        self.mode.event("poll_failed", why)

    def _switched_off(self, reason: str) -> None:
        """Persistent connections are off on this agent (its user or its profile)."""
        for observer in self._observers:
            observer.session_lost(reason, True)

    # -- the session -------------------------------------------------------------------
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
            self.identity.remember_tls_session(
                getattr(conn.protocol, "transport", None), conn.welcome.get("resume")
            )
            self.connected_since = self.reactor.seconds()
            self.last_refusal = None
            self.restart_hint.reconnected()
            self.link.session = conn
            self._log.info(
                "persistent session open (session {sid})", sid=conn.welcome.get("session")
            )
            self.poller.stop()
            self.mode.event("session_open", "persistent session open")
            if self.config.keepalive is None:
                self.adopt_keepalive(conn.protocol, conn.welcome.get("keepalive"))
            for observer in self._observers:
                observer.session_opened(conn.welcome)
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

    def adopt_keepalive(self, protocol: Any, keepalive: Any) -> None:
        """Ping as often as the server asks (it closes sessions that stay silent for
        2 x keepalive + timeout), from this connection's next ping on."""
        if not isinstance(keepalive, (int, float)) or keepalive <= 0:
            return
        keepalive = self._keepalive = float(keepalive)
        if self._session_factory is not None:
            self._session_factory.set_keepalive(keepalive)  # later connections
        _reschedule_ping(self.reactor, protocol, keepalive)

    def session_lost(self, protocol: Any, code: int | None, reason: str | None) -> None:
        """The session's protocol closed (the session factory tells)."""
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.connected_since = None
        self.link.session = None
        why = describe_close(code, reason)
        self._log.info("persistent session closed: {why}", why=why)
        if code in (codes.CLOSE_RESTARTING, codes.CLOSE_DRAIN):
            # restarting, or draining (a gateway or task server at its stop; the next
            # destination, if any, is tried first): back in moments, here or there
            self.restart_hint.server_restarting()
        if self.destinations is not None:
            self.destinations.session_ended(code)
        self.mode.event("session_lost", why)
        for observer in self._observers:
            observer.session_lost(f"persistent session closed: {why}", False)
        self._fall_back(
            f"persistent session closed: {why}", at_once=code == codes.CLOSE_PERSISTENT_OFF
        )

    # -- connection profile --------------------------------------------------------------
    def persistent_allowed(self) -> bool:
        return not self.user_disconnected and self.profile_persistent

    def follow_profile(self, settings: dict[str, Any], live: bool) -> None:
        """Set the connection's settings from a profile's (the command line's where unnamed)."""
        s = settings
        d = self._defaults
        cfg = self.config
        server = s["servers"][0] if s.get("servers") else self._default_server
        proxy_text = s["proxy"] if "proxy" in s else d.proxy
        reconnect = []
        if server != self.server:
            reconnect.append(f"server {self.server} -> {server}")
            self.server = server
        # a profile's further servers: the other nodes of the cluster, tried in turn
        servers = list(s["servers"][1:]) if s.get("servers") else d.servers
        if servers != cfg.servers:
            cfg.servers = servers
            reconnect.append(f"servers {', '.join([server, *servers])}")
        if (proxy_text or None) != (str(self.proxy) if self.proxy is not None else None):
            self.proxy = parse_proxy(proxy_text)
            reconnect.append(f"proxy {proxy_text or 'none'}")
        gateways = [gateway_base(u) for u in s["gateways"]] if "gateways" in s else d.gateways
        if gateways != cfg.gateways:
            cfg.gateways = list(gateways)
            reconnect.append(f"gateways {', '.join(gateways) or 'none'}")
        cfg.keepalive = s.get("keepalive", d.keepalive)
        cfg.keepalive_timeout = s.get("keepalive_timeout", d.keepalive_timeout)
        cfg.backoff_initial = s.get("backoff_initial", d.backoff_initial)
        cfg.backoff_max = s.get("backoff_max", d.backoff_max)
        cfg.fallback_delay = s.get("fallback_delay", d.fallback_delay)
        self.poller.profile_poll_interval = s.get("poll_interval")
        if s.get("poll_interval"):
            self.poller.poll_interval = float(s["poll_interval"])
        self.poller.use_long_poll = s.get("long_poll", d.long_poll)
        on = self.profile_persistent = bool(s.get("persistent_connections", True))
        if not live:
            if reconnect:  # before the first connection: HTTPS calls go there from the start
                self.link.https = self._https_client()
            return
        if cfg.keepalive is not None and self.protocol is not None:
            self.adopt_keepalive(self.protocol, cfg.keepalive)
        if reconnect and self.session_service is not None:
            self.rebuild_connections("; ".join(reconnect))
        if not on and (self.protocol is not None or _running(self.session_service)):
            self.set_persistent(False, "persistent connections off in the connection profile")
        elif on and not _running(self.session_service):
            self.set_persistent(True, "persistent connections on in the connection profile")

    def set_persistent(self, on: bool, reason: str) -> None:
        """A connection profile switches persistent connections on or off (no restart)."""
        service = self.session_service
        if not on:
            if self.protocol is not None:
                self.link.session = None  # calls from here on go over HTTPS
                self.protocol.sendClose(
                    codes.CLOSE_BY_PROFILE, codes.CLOSE_REASONS[codes.CLOSE_BY_PROFILE]
                )
            if service is not None and service.running:
                service.stopService()
            self._switched_off(reason)  # the next welcome assigns a task server again
            self.mode.event("profile_http", reason)
            self._fall_back(reason, at_once=True)
        elif not self.user_disconnected and service is not None and not service.running:
            self._log.info("persistent connections on again ({reason})", reason=reason)
            service.startService()

    def rebuild_connections(self, reason: str) -> None:
        """Servers or proxy changed: new HTTPS client and a new session service."""
        self._log.info("reconnecting: {reason}", reason=reason)
        self.link.https = self._https_client()
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
        new = self.make_session_service()
        if parent is not None:
            new.setServiceParent(parent)  # starts it: the parent runs
            if not self.persistent_allowed():
                new.stopService()

    # -- local control (tcm-agent disconnect / reconnect) ---------------------------------
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
            self._switched_off("terminated by tcm-agent disconnect")
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
        """The connection's part of the Network Status."""
        proto = self.protocol
        traffic = self.counting.current if self.counting is not None else None
        conn = proto.connection if proto is not None else None
        poller = self.poller
        https = self.link.https.traffic
        return {
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
                "bytes_sent": https.sent,
                "bytes_received": https.received,
            },
            "reconnect_attempts": self.reconnects,
            "last_refusal": self.last_refusal,
            "mode_history": list(self.mode.history)[-5:],
        }


def _running(service: Any) -> bool:
    return service is not None and bool(service.running)


def _reschedule_ping(clock: Any, protocol: Any, keepalive: float) -> None:
    """Ping every `keepalive` seconds on `protocol` from its next ping."""
    old = getattr(protocol, "autoPingInterval", None)
    if old == keepalive:
        return
    protocol.autoPingInterval = keepalive
    # the first ping was scheduled at open with the old value
    compat.reschedule_auto_ping(protocol, clock, keepalive)


def parse_proxy(text: str | None) -> HTTPProxy | None:
    """The proxy a URL names (None for none), importing proxy.py only then."""
    if not text:
        return None
    from tcm.agent.proxy import HTTPProxy

    return HTTPProxy.parse(text)


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
                self._on_failure(pki.describe_tls_error(f.value), bool(f.check(PROXY_ERROR)))
            return f

        return self._inner.connect(factory).addErrback(failed)
