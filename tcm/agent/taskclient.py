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

from tcm import compat
from tcm.agent.backoff import backoff_policy
from tcm.agent.link import server_endpoint
from tcm.agent.session import AgentClientFactory, SessionRefused
from tcm.protocol import codes


class TaskClient:
    """Connects to the assigned task server and keeps that session up."""

    _log = Logger()

    def __init__(self, core: Any):
        self.core = core
        self.clock = core.clock
        self.assigned: dict[str, Any] | None = None
        self.assignment_status = "no task server assigned yet"
        self.service: ClientService | None = None
        self.protocol: Any = None
        self.connected_since: float | None = None
        self.reconnects = 0
        self.last_refusal: str | None = None
        self.counting: Any = None

    # -- what the session calls on its agent (as AgentCore for the core session) ----------
    @property
    def runner(self) -> Any:
        return self.core.runner

    def capabilities(self) -> list[dict[str, Any]]:
        return self.core.capabilities()

    @property
    def policies(self) -> Any:
        return self.core.policies

    @property
    def profile(self) -> Any:
        return self.core.profile

    def notified(self, data: dict[str, Any]) -> None:
        self.core.notified(data)

    def session_lost(self, protocol: Any, code: int | None, reason: str | None) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.connected_since = None
        self.core.link.task_session = None
        from tcm.agent.service import describe_close

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
        if self.core.user_disconnected:
            return
        self._log.info(
            "task server {name} at {url} ({why})",
            name=self.assigned.get("name"),
            url=url,
            why=self.assignment_status,
        )
        self.start(url)

    def start(self, url: str) -> None:
        core = self.core
        cfg = core.config
        https_url = "https://" + url.split("://", 1)[1].split("/", 1)[0]
        endpoint, self.counting = server_endpoint(
            core.reactor, https_url, core.identity, core.proxy, count=True, bind=cfg.bind_address
        )
        factory = AgentClientFactory(
            self,
            url,
            cfg.keepalive or core.session_keepalive(),
            cfg.keepalive_timeout,
            cfg.max_message_size,
        )
        self.service = ClientService(
            endpoint,
            factory,
            retryPolicy=backoff_policy(cfg.backoff_initial, 2.0, cfg.backoff_max),
            clock=core.reactor,
            prepareConnection=self._ready,
        )
        self.service.startService()

    def stop(self) -> Deferred | None:
        service, self.service = self.service, None
        self.protocol = None
        self.connected_since = None
        if self.core.link is not None:
            self.core.link.task_session = None
        if service is not None and service.running:
            return service.stopService()
        return None

    def _ready(self, protocol: Any) -> Deferred:
        d = protocol.connection.welcomed

        def welcomed(conn):
            self.protocol = conn.protocol
            self.connected_since = self.clock.seconds()
            self.last_refusal = None
            self.core.link.task_session = conn
            self._log.info(
                "task session open with {name} (session {sid})",
                name=(self.assigned or {}).get("name"),
                sid=conn.welcome.get("session"),
            )
            self.core.adopt_keepalive(conn.protocol, conn.welcome.get("keepalive"))
            self.core.runner.flush()
            return conn

        def refused(f):
            f.trap(SessionRefused)
            compat.ignore_lost_notification(protocol)
            self.reconnects += 1
            from tcm.agent.service import describe_close

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
