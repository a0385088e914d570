"""The agent's task client: its second persistent connection, to its task server.

The management server assigns each agent a task server (in `welcome`, and with a
`notify` of topic `task_server` when it moves the agent). The task client is a second
`ClientService` inside the agent daemon with the same identity, protocol, keepalive and
backoff as the core session; tasks pushed through the task server arrive on it, and their
output and results go back on it while it is open (else on the core session, else HTTPS:
the spool keeps each result until the server has stored it).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from tcm import compat
from tcm.agent.backoff import backoff_policy
from tcm.agent.config import AgentConfig
from tcm.agent.connection import describe_close
from tcm.agent.link import Identity, server_endpoint
from tcm.agent.session import AgentClientFactory, SessionRefused
from tcm.interfaces import IAgentAPI, IServerConnection, ISessionHost, ISessionObserver
from tcm.protocol import codes


@implementer(ISessionObserver)
class TaskClient:
    """Connects to the assigned task server and keeps that session up."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        identity: Identity,
        api: IAgentAPI,
        host: ISessionHost,
        connection: IServerConnection,
    ):
        self.reactor = reactor
        self.clock = reactor
        self.config = config
        self.identity = identity
        self._api = api
        self._host = host
        self._connection = connection
        self.assigned: dict[str, Any] | None = None
        self.assignment_status = "no task server assigned yet"
        self.service: ClientService | None = None
        self.protocol: Any = None
        self.connected_since: float | None = None
        self.reconnects = 0
        self.last_refusal: str | None = None
        self.counting: Any = None

    # -- what the core session and the server say ----------------------------------------
    def session_opened(self, welcome: dict[str, Any]) -> None:
        if "task_server" in welcome:
            self.assign(welcome["task_server"], welcome.get("task_server_status"))

    def session_lost(self, reason: str, switched_off: bool) -> None:
        if switched_off:  # no task session either; the next welcome assigns one again
            self.assign(None, reason)

    def polling_started(self) -> None:
        """Polls do not assign task servers (a `notify` does, `notified`)."""

    def notified(self, data: dict[str, Any]) -> None:
        """The server moved this agent to another task server (or to none)."""
        task_server = data.get("task_server")
        self.assign(
            task_server if isinstance(task_server, dict) else None,
            str(data.get("task_server_status") or ""),
        )

    def task_session_lost(self, protocol: Any, code: int | None, reason: str | None) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.connected_since = None
        self._api.task_session = None
        self._log.info("task session closed: {why}", why=describe_close(code, reason))
        if code == codes.CLOSE_PERSISTENT_OFF:
            self.assign(None, "persistent connections are switched off")

    # -- assignment --------------------------------------------------------------------
    def assign(self, task_server: dict[str, Any] | None, status: str | None) -> None:
        """Use this task server from now on (None: none; tasks come on the core session)."""
        self.assignment_status = status or ("assigned" if task_server else "none")
        url: str | None = (task_server or {}).get("url")
        if url and self.assigned and self.assigned.get("url") == url and self.service:
            self.assigned = task_server
            return
        previous = self.assigned
        self.assigned = task_server if url else None
        if previous is not None:
            self._log.info(
                "leaving task server {name} ({why})",
                name=previous.get("name"),
                why=self.assignment_status,
            )
            self.stop()
        if self.assigned is None or url is None:
            self._log.info("no task server: {why}", why=self.assignment_status)
            return
        if self._connection.user_disconnected:
            return
        self._log.info(
            "task server {name} at {url} ({why})",
            name=self.assigned.get("name"),
            url=url,
            why=self.assignment_status,
        )
        self.start(url)

    def start(self, url: str) -> None:
        cfg = self.config
        https_url = "https://" + url.split("://", 1)[1].split("/", 1)[0]
        endpoint, self.counting = server_endpoint(
            self.reactor,
            https_url,
            self.identity,
            self._connection.proxy,
            count=True,
            bind=cfg.bind_address,
        )
        factory = AgentClientFactory(
            self._host,
            self.task_session_lost,
            url,
            cfg.keepalive or self._connection.session_keepalive(),
            cfg.keepalive_timeout,
            cfg.max_message_size,
        )
        self.service = ClientService(
            endpoint,
            factory,
            retryPolicy=backoff_policy(cfg.backoff_initial, 2.0, cfg.backoff_max),
            clock=self.reactor,
            prepareConnection=self._ready,
        )
        self.service.startService()

    def stop(self) -> Deferred | None:
        service, self.service = self.service, None
        self.protocol = None
        self.connected_since = None
        self._api.task_session = None
        if service is not None and service.running:
            return service.stopService()
        return None

    def _ready(self, protocol: Any) -> Deferred:
        d = protocol.connection.welcomed

        def welcomed(conn):
            self.protocol = conn.protocol
            # the task server (or gateway) the agent's TLS ends at sealed a token for it:
            # kept for the next connection there, as the core session keeps its own
            self.identity.remember_tls_session(
                getattr(conn.protocol, "transport", None), conn.welcome.get("resume")
            )
            self.connected_since = self.clock.seconds()
            self.last_refusal = None
            self._api.task_session = conn
            self._log.info(
                "task session open with {name} (session {sid})",
                name=(self.assigned or {}).get("name"),
                sid=conn.welcome.get("session"),
            )
            self._connection.adopt_keepalive(conn.protocol, conn.welcome.get("keepalive"))
            self._host.deliver_results()
            return conn

        def refused(f):
            f.trap(SessionRefused)
            compat.ignore_lost_notification(protocol)
            self.reconnects += 1
            self.last_refusal = describe_close(f.value.code, f.value.reason)
            self._log.warn("task session refused: {why}", why=self.last_refusal)
            return f

        return d.addCallbacks(welcomed, refused)

    def status(self) -> dict[str, Any]:
        proto = self.protocol
        conn = proto.connection if proto is not None else None
        traffic = self.counting.current if self.counting is not None else None
        return {
            "task_server": (self.assigned or {}).get("name"),
            "url": (self.assigned or {}).get("url"),
            "assignment": self.assignment_status,
            "connected": proto is not None,
            "connected_since": self.connected_since,
            "session": (conn.welcome or {}).get("session") if conn else None,
            "tls": proto.tls_info() if proto is not None else None,
            "bytes_sent": traffic.sent if traffic and proto is not None else 0,
            "bytes_received": traffic.received if traffic and proto is not None else 0,
            "reconnect_attempts": self.reconnects,
            "last_refusal": self.last_refusal,
        }
