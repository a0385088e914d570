"""Agents: who they are (directory, admission, enrollment) and where they are (presence).

`AgentPresence` knows the live sessions (direct, or carried by a node), the held polls and
when an agent in HTTP mode last polled. `AgentAdmission` decides who may be served: it owns
the in-memory directory every request checks, enrollment, approval and revocation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcm.interfaces import (
    IAgentAdmission,
    IAgentPresence,
    ICertificates,
    IEventPublisher,
    INodeRegistry,
    IProfiles,
    IRuntimeSettings,
)
from tcm.protocol import codes, link
from tcm.server.dispatcher import DirectRoute
from tcm.server.errors import Forbidden, Invalid, NotFound
from tcm.server.events import NO_EVENTS, agent_event
from tcm.server.polls import PollRegistry
from tcm.server.sessions import AgentSession, CloneWatch, SessionRegistry
from tcm.store import TokenRefused
from tcm.tls import pki

RE_ENROLL_WINDOW = 600.0  # seconds an enrollment can be asked for again with the same key


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
                "deleted": bool(r.get("deleted", False)),
                "approved": bool(r.get("approved", True)),
                # what it advertised last (stored), until its next session says again
                "capabilities": {c["name"]: c for c in r["capabilities"] or []} or None,
                "described": describe(r["hostname"], r["platform"], r["capabilities"]),
            }

    def add(self, agent_id: str, hostname: str, approved: bool = True) -> None:
        self._agents[agent_id] = {
            "hostname": hostname,
            "revoked": False,
            "deleted": False,
            "approved": approved,
            "capabilities": None,
        }

    def get(self, agent_id: str) -> dict[str, Any] | None:
        return self._agents.get(agent_id)

    def ids(self) -> list[str]:
        return [a for a, r in self._agents.items() if not r["revoked"]]

    def advertised(self, agent_id: str) -> dict[str, Any] | None:
        """The action handlers an agent advertised last (name -> capability with its
        argument schema), live or stored; None if it never said (or is revoked)."""
        record = self._agents.get(agent_id)
        if record is None or record["revoked"]:
            return None
        caps: dict[str, Any] | None = record.get("capabilities")
        return caps

    def revoked_ids(self) -> list[str]:
        return [a for a, r in self._agents.items() if r["revoked"]]

    def pending_ids(self) -> list[str]:
        """Agents enrolled but not approved yet."""
        return [
            a for a, r in self._agents.items() if not r.get("approved", True) and not r["revoked"]
        ]

    def __len__(self) -> int:
        return len(self._agents)


class RecentEnrollments:
    """Enrollments of the last RE_ENROLL_WINDOW seconds by public key, oldest first, so an
    agent that asks again (its first answer lost) gets the same identity. Bounded: what is
    older than the window goes at each new entry, and at most `limit` are kept."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self._entries: dict[str, tuple[float, Any]] = {}  # insertion order = time order

    def get(self, key: str) -> Any:
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def remember(self, key: str, value: Any, now: float) -> None:
        entries = self._entries
        entries.pop(key, None)
        entries[key] = (now, value)
        while True:  # the oldest first: stop at the first one still young, within the limit
            oldest = next(iter(entries))
            if now - entries[oldest][0] < RE_ENROLL_WINDOW and len(entries) <= self.limit:
                break
            del entries[oldest]

    def __len__(self) -> int:
        return len(self._entries)


def is_direct(session: AgentSession) -> bool:
    """A session on a WebSocket connection of this process (not carried by a node)."""
    return isinstance(session.route, DirectRoute)


def _fingerprint(session: AgentSession | None) -> str | None:
    """The certificate a direct session presented (behind a node: None, the node checked)."""
    if session is None or not is_direct(session):
        return None
    return pki.peer_fingerprint(session.transport.peer_transport)


@implementer(IAgentPresence)
class AgentPresence:
    """Where agents are: live sessions, held polls, the last poll of agents in HTTP mode."""

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        settings: IRuntimeSettings,
        agent_store: Any,
        keepalive: float,
        timeout: float,
    ):
        self.clock = clock
        self._settings = settings
        self._agent_store = agent_store
        self._keepalive = keepalive
        self._keepalive_timeout = timeout
        self.registry = SessionRegistry()
        self.task_registry = SessionRegistry()  # agents' task-client sessions (via nodes)
        self.polls = PollRegistry(clock)
        self.last_poll: dict[str, float] = {}
        self.closing_everything = False  # a stop closes every session: no line or write each
        self.clones = CloneWatch()
        self.on_cloned: Any = None  # called (agent_id, why) when an identity is found cloned
        self.events: IEventPublisher = NO_EVENTS  # the console's live events (set where wired)
        # {agent: node} of those agents other nodes of a cluster hold a session or a poll
        # of (ICluster.where; None: a single server)
        self.elsewhere: Callable[[list[str]], Deferred[dict[str, str]]] | None = None
        self._polls_swept_at = clock.seconds()

    def session(self, agent_id: str) -> AgentSession | None:
        """The agent's own live session here, if any."""
        return self.registry.get(agent_id)

    def capabilities_of(self, agent_id: str) -> dict[str, Any] | None:
        session = self.registry.get(agent_id)
        return session.capabilities if session is not None else None

    def agent_polled(self, agent_id: str) -> None:
        """An agent in HTTP mode polled: remember when (for `tcm agents`)."""
        if agent_id not in self.registry and self.http_mode_of(agent_id) is None:
            self.events.publish(agent_event(agent_id, mode="http", last_seen=self.clock.seconds()))
        self.last_poll[agent_id] = self.clock.seconds()

    def http_mode_of(self, agent_id: str) -> str | None:
        """ "http" for an agent without a session that polled lately; else None."""
        last = self.last_poll.get(agent_id)
        if last is not None and self.clock.seconds() - last <= self._http_window():
            return "http"
        return None

    def _http_window(self) -> float:
        return 2 * float(self._settings["poll_interval"]) + float(self._settings["long_poll"])

    def sweep_polls(self) -> Deferred[list[str]]:
        """Agents in HTTP mode whose window passed since the last sweep without a poll are
        offline now: an `agent` event says so (the console's endpoints and overview pages),
        as a session's close does for a persistent agent. Nothing else changes: `http_mode_of`
        already answers "offline" for them. Each expiry is told once (the sweep whose period
        holds it); agents with a session here, or with a session or held poll on another node
        of a cluster, are not told. Fires with the agents told offline."""
        now = self.clock.seconds()
        since, self._polls_swept_at = self._polls_swept_at, now
        window = self._http_window()
        gone = [
            agent_id
            for agent_id, last in self.last_poll.items()
            if since <= last + window < now and agent_id not in self.registry
        ]
        if not gone:
            return succeed([])
        where = self.elsewhere(gone) if self.elsewhere is not None else succeed({})

        def tell(elsewhere: dict[str, str]) -> list[str]:
            told = []
            for agent_id in gone:
                if agent_id in elsewhere or agent_id in self.registry:
                    continue
                if self.polls.get(agent_id) is not None:
                    continue
                if self.http_mode_of(agent_id) is not None:
                    continue  # it polled while the cluster was asked
                told.append(agent_id)
                self.events.publish(
                    agent_event(
                        agent_id,
                        mode="offline",
                        online=False,
                        last_seen=self.last_poll.get(agent_id),
                    )
                )
            return told

        def failed(f: Failure) -> list[str]:
            self._log.failure("could not tell HTTP agents offline", f)
            return []

        return where.addCallback(tell).addErrback(failed)

    def last_seen(self, agent_id: str, stored: float | None) -> float | None:
        """When the agent was last heard of: now if it has a session, else the later of the
        stored time and its last poll."""
        if agent_id in self.registry:
            return self.clock.seconds()
        return max(stored or 0, self.last_poll.get(agent_id, 0)) or None

    def admit_session(self, session: AgentSession) -> bool:
        """Whether an agent's own session may take its place (superseding a live one): not
        when its identity is cloned; then it and the live one are closed with 4013."""
        agent_id = session.agent_id
        live = self.registry.get(agent_id)
        supersedes = live is not None and live is not session
        why = self.clones.session_opened(
            agent_id,
            _fingerprint(session),
            _fingerprint(live) if supersedes else None,
            supersedes,
            self.clock.seconds(),
        )
        if why is not None and self.on_cloned is not None:
            self.on_cloned(agent_id, why)
        if not self.clones.is_cloned(agent_id):
            return True
        session.close(codes.CLOSE_CLONED)
        self.close_agent(agent_id, codes.CLOSE_CLONED)
        return False

    def close_agent(self, agent_id: str, code: int) -> None:
        """Close both sessions (own and task) of one agent."""
        for registry in (self.registry, self.task_registry):
            session = registry.get(agent_id)
            if session is not None:
                session.close(code)

    def persistent_switched_off(self) -> None:
        sessions = self.registry.all()
        self._log.info("persistent connections switched off: closing {n} sessions", n=len(sessions))
        for session in sessions + self.task_registry.all():
            session.close(codes.CLOSE_PERSISTENT_OFF)

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
                if is_direct(session):
                    session.close(code)
                    n += 1
                    if registry is self.registry:
                        seen.append(session.agent_id)
        written = (
            self._agent_store.agents_seen(seen, self.clock.seconds()) if seen else succeed(None)
        )
        if n:
            self._log.info("closing {n} sessions: {why}", n=n, why=codes.CLOSE_REASONS[code])
        return n, written

    def sessions_gone(self, timeout: float) -> Deferred[int]:
        """Fires (with how many are left) when no direct session is left, or after `timeout`
        seconds."""
        d: Deferred[int] = Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            left = sum(
                1 for r in (self.registry, self.task_registry) for s in r.all() if is_direct(s)
            )
            if not left or self.clock.seconds() >= deadline:
                d.callback(left)
            else:
                self.clock.callLater(0.05, check)

        check()
        return d

    def sweep_silent_sessions(self) -> None:
        """Close sessions that sent nothing (not even a ping) for too long: half-open."""
        deadline = self.clock.seconds() - (2 * self._keepalive + self._keepalive_timeout)
        for session in self.registry.idle_since(deadline):
            if not is_direct(session):
                continue  # relayed: the node watches its agents, the link watches the node
            if getattr(session.transport, "reading_paused", False):
                continue  # not read, not silent: waiting for the intake budget
            self._log.info(
                "agent {agent} silent since {t:.0f}: closing",
                agent=session.agent_id,
                t=session.last_rx,
            )
            # A close frame with 4008; if the peer is really gone, Autobahn drops the TCP
            # connection when its close handshake times out (closeHandshakeTimeout).
            session.close(codes.CLOSE_KEEPALIVE)


@implementer(IAgentAdmission)
class AgentAdmission:
    """Who may be served: enrollment, approval, revocation, and the check of every request.

    Gateways are told of each agent that awaits approval or is revoked, through `nodes`."""

    _log = Logger()
    events: IEventPublisher = NO_EVENTS  # the console's live events (set where wired)

    def __init__(
        self,
        directory: AgentDirectory,
        agent_store: Any,
        access_store: Any,
        presence: IAgentPresence,
        nodes: INodeRegistry,
        certificates: ICertificates,
        settings: IRuntimeSettings,
        profiles: IProfiles,
        clock: Any,
        cert_days: float,
    ):
        self._agents = agent_store
        self._access = access_store
        self._presence = presence
        self._nodes = nodes
        self._certificates = certificates
        self._settings = settings
        self._profiles = profiles
        self.clock = clock
        self.cert_days = cert_days
        self.directory = directory
        self.recent_enrollments = RecentEnrollments()  # an agent may ask again
        # told of the agents whose rows changed here (a cluster tells the other nodes)
        self.on_changed: Callable[[list[str]], None] | None = None
        # nodes of a cluster: an agent unknown here may have enrolled on another node a
        # moment ago (before its change message came): its row is read for its next attempt
        self.shared = False
        self._looking_up: set[str] = set()

    def _look_up(self, agent_id: str) -> None:
        if agent_id in self._looking_up or len(self._looking_up) > 1000:
            return
        self._looking_up.add(agent_id)
        d = self.refresh([agent_id])
        d.addErrback(lambda f: None)
        d.addBoth(lambda _: self._looking_up.discard(agent_id))

    def _changed(self, agent_id: str) -> None:
        if self.on_changed is not None:
            self.on_changed([agent_id])

    @inlineCallbacks
    def refresh(self, agent_ids: list[str] | None):
        """Read agents' rows again (all: None), changed by another node of the cluster:
        enrolled, approved, revoked, deleted. A revoked agent's session here is closed."""
        if agent_ids is None:
            rows = yield self._agents.list_agents()
        else:
            rows = []
            for agent_id in agent_ids:
                row = yield self._agents.get_agent(agent_id)
                if row is not None:
                    rows.append(row)
        self.directory.load(rows)
        for row in rows:
            if row["revoked"]:
                self._presence.close_agent(row["id"], codes.CLOSE_REVOKED)
        return len(rows)

    @inlineCallbacks
    def load(self):
        self.directory.load((yield self._agents.list_agents()))

    # -- the directory -------------------------------------------------------------------
    def known_ids(self) -> list[str]:
        """Agents not revoked."""
        return self.directory.ids()

    def advertised(self, agent_id: str) -> dict[str, Any] | None:
        """The action handlers an agent advertised last (name -> capability with its
        argument schema), live or stored; None if it never said (or is revoked)."""
        record = self._agents.get(agent_id)
        if record is None or record["revoked"]:
            return None
        caps: dict[str, Any] | None = record.get("capabilities")
        return caps

    def revoked_ids(self) -> list[str]:
        return self.directory.revoked_ids()

    def pending_ids(self) -> list[str]:
        return self.directory.pending_ids()

    def count(self) -> int:
        """Enrolled agents (revoked ones too)."""
        return len(self.directory)

    def check_known(self, ids: list[str], field: str = "agents") -> None:
        """Invalid naming the ids that are no agent (or a revoked one)."""
        unknown = sorted(set(ids) - set(self.directory.ids()))
        if unknown:
            raise Invalid(field, "unknown agent ids", unknown=unknown[:50])

    def list_agents(self) -> Deferred[list[dict[str, Any]]]:
        """Every agent's stored row."""
        return self._agents.list_agents()

    def agents_page(
        self, after: str | None, limit: int, include_deleted: bool, state: str | None
    ) -> Deferred[tuple[list[dict[str, Any]], str | None]]:
        """A page of stored rows in id order, and the cursor of the next (AgentStore)."""
        return self._agents.agents_page(after, limit, include_deleted, state)

    @inlineCallbacks
    def get_agent(self, agent_id: str):
        """An agent's stored row; NotFound without it."""
        row = yield self._agents.get_agent(agent_id)
        if row is None:
            raise NotFound(f"no such agent: {agent_id}")
        return row

    # -- checks --------------------------------------------------------------------------
    def check_agent(self, agent_id: str) -> str:
        """The agent id if this agent may be served now: known, not revoked, approved."""
        record = self.directory.get(agent_id)
        if record is None:
            if self.shared:  # enrolled on another node a moment ago? read it for next time
                self._look_up(agent_id)
            raise Forbidden(f"unknown agent {agent_id}: enroll again")
        if record["revoked"]:
            raise Forbidden(f"agent {agent_id} is revoked")
        if self._presence.clones.is_cloned(agent_id):
            raise Forbidden(
                f"agent {agent_id} is cloned (two agents, one identity): revoke it and "
                f"enroll each machine with its own token"
            )
        if not record.get("approved", True):
            raise Forbidden(
                f"agent {agent_id} is awaiting approval (tcm agents approve {agent_id})"
            )
        return agent_id

    def authenticate_transport(self, transport: Any) -> str:
        """The agent id of a connection's verified client certificate, or Forbidden.

        The subject is read once per connection and kept on it; whether the agent is known
        and not revoked is checked on every request."""
        agent_id = getattr(transport, "tcm_agent_id", None)
        if agent_id is None:
            agent_id = pki.peer_common_name(transport)
            if agent_id is None:
                raise Forbidden("client certificate required: enroll first")
            try:
                transport.tcm_agent_id = agent_id
            except AttributeError:  # a transport that takes no attributes: read it each time
                pass
        return self.check_agent(agent_id)

    def authenticate_proxied(self, transport: Any, escaped_pem: str | bytes) -> str:
        """The agent id of a client certificate a TLS-terminating reverse proxy (nginx's
        `$ssl_client_escaped_cert`) forwards in X-Tcm-Client-Cert. Taken only from a
        registered node (its own client certificate `node:NAME`, enrolled like a gateway),
        and only for a certificate this server's CA issued."""
        from urllib.parse import unquote

        cached = getattr(transport, "tcm_agent_id", None)
        if cached is None:
            cn = pki.peer_common_name(transport)
            if cn is None or not cn.startswith(link.NODE_PREFIX):
                raise Forbidden("X-Tcm-Client-Cert is only taken from an enrolled node")
            node = cn[len(link.NODE_PREFIX) :]
            refusal = self._nodes.refusal(node, pki.peer_fingerprint(transport))
            if refusal is not None:
                raise Forbidden(refusal)
            if isinstance(escaped_pem, bytes):
                escaped_pem = escaped_pem.decode("latin-1")
            try:
                cert = pki.load_certificate(unquote(escaped_pem).encode())
                cached = self._certificates.verify_issued(cert)
            except ValueError as e:
                raise Forbidden(f"forwarded client certificate refused: {e}") from None
            try:
                transport.tcm_agent_id = cached
            except AttributeError:
                pass
        return self.authenticate_transport(transport)

    # -- enrollment, approval, revocation ------------------------------------------------
    @inlineCallbacks
    def enroll(self, token: str, csr: str, hostname: str):
        """Sign an agent's CSR against an enrollment token: fires with
        (asked_again, {"agent_id", "certificate", "ca"})."""
        now = self.clock.seconds()
        # The same key and token again within minutes: an agent that gave up waiting for
        # the answer (a busy server) and asks again gets the same identity, and the token is
        # not used twice. The CSR's signature proves it holds the key.
        key_id = pki.csr_key_id(csr.encode())
        again = self.recent_enrollments.get(key_id) if key_id is not None else None
        if again is not None and again[0] == token and now - again[1] < RE_ENROLL_WINDOW:
            self._log.info(
                "agent {agent} asked again for its enrollment", agent=again[2]["agent_id"]
            )
            return True, again[2]
        agent_id = "a-" + os.urandom(10).hex()
        try:  # the CSR is checked first: a refused request does not use up the token
            cert_pem = self._certificates.sign_agent(csr.encode(), agent_id, self.cert_days)
        except ValueError as e:
            raise Invalid("csr", f"bad certificate request: {e}") from None
        try:
            token_row = yield self._access.consume_token_row(token, now)
        except TokenRefused as e:
            self._log.warn("enrollment refused for {host}: {why}", host=hostname, why=str(e))
            raise Forbidden(str(e)) from None
        fingerprint = pki.fingerprint(pki.load_certificate(cert_pem))
        approved = not self._settings["require_approval"]
        yield self._agents.add_agent(agent_id, hostname, fingerprint, now, approved)
        self.directory.add(agent_id, hostname, approved)
        self._changed(agent_id)
        if not approved:
            self._log.info("agent {agent} awaits approval", agent=agent_id)
            self._nodes.tell_pending([agent_id])
        if token_row.get("profile"):
            yield self._profiles.set_enrollment_profile(agent_id, token_row["profile"])
        self._log.info("agent {agent} enrolled ({host})", agent=agent_id, host=hostname)
        self.events.publish(agent_event(agent_id, new=True))
        reply = {
            "agent_id": agent_id,
            "certificate": cert_pem.decode(),
            "ca": self._certificates.ca_pem.decode(),
        }
        if key_id is not None:
            self.recent_enrollments.remember(key_id, (token, now, reply), now)
        return False, reply

    def renew(self, agent_id: str, csr: str) -> dict[str, str]:
        """A new certificate for an enrolled agent's new key (its CSR), same identity, no
        token: the agent proves who it is with its current, still valid certificate."""
        self.check_agent(agent_id)
        try:
            cert_pem = self._certificates.sign_agent(csr.encode(), agent_id, self.cert_days)
        except ValueError as e:
            raise Invalid("csr", f"bad certificate request: {e}") from None
        cert = pki.load_certificate(cert_pem)
        self._log.info(
            "agent {agent} renewed its certificate (serial {serial:x}, until {until})",
            agent=agent_id,
            serial=cert.serial_number,
            until=cert.not_valid_after_utc.isoformat(),
        )
        return {"certificate": cert_pem.decode(), "ca": self._certificates.ca_pem.decode()}

    @inlineCallbacks
    def approve(self, agent_id: str):
        """Approve an agent that enrolled while approval was required; gateways are told.
        Fires with whether anything changed."""
        record = self.directory.get(agent_id)
        if record is None:
            raise NotFound(f"no agent {agent_id}")
        if record.get("approved", True):
            return False
        yield self._agents.approve_agent(agent_id)
        record["approved"] = True
        self._changed(agent_id)
        self._log.info("agent {agent} approved", agent=agent_id)
        self.events.publish(agent_event(agent_id, state="ok", approved=True))
        self._nodes.tell_pending([], approved=[agent_id])
        return True

    @inlineCallbacks
    def revoke(self, agent_id: str):
        """Revoke an agent: stored, refused from now on, its sessions closed with 4007, and
        every gateway told (it refuses the agent at the upgrade). Fires with whether anything
        changed."""
        record = self.directory.get(agent_id)
        if record is None:
            raise NotFound(f"no agent {agent_id}")
        if record["revoked"]:
            return False
        yield self._agents.revoke_agent(agent_id)
        record["revoked"] = True
        self._changed(agent_id)
        self._log.info("agent {agent} revoked", agent=agent_id)
        self.events.publish(agent_event(agent_id, state="revoked", revoked=True))
        self._presence.close_agent(agent_id, codes.CLOSE_REVOKED)
        self._presence.clones.forget(agent_id)  # re-keyed: revoked says it all from now on
        self._nodes.tell_revoked([agent_id])
        return True

    @inlineCallbacks
    def delete(self, agent_id: str):
        """Delete an agent: revoked (sessions closed, gateways told) and hidden from
        listings; its jobs and audit entries are kept. Fires with whether anything changed."""
        record = self.directory.get(agent_id)
        if record is None:
            raise NotFound(f"no agent {agent_id}")
        if record.get("deleted"):
            return False
        yield self.revoke(agent_id)
        yield self._agents.delete_agent(agent_id)
        record["deleted"] = True
        self._changed(agent_id)
        self._log.info("agent {agent} deleted", agent=agent_id)
        return True

    @inlineCallbacks
    def label(
        self,
        agent_id: str,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        untag: list[str] | None = None,
        reset_name: bool = False,
    ):
        """Set an agent's display name (`reset_name`: back to its hostname) and tags (added
        or replaced; `untag` removes keys). Fires with its stored row after."""
        row = yield self.get_agent(agent_id)
        current = dict(row.get("tags") or {})
        for key in untag or ():
            current.pop(key, None)
        current.update(tags or {})
        display = None if reset_name else (name if name is not None else row["display_name"])
        yield self._agents.set_agent_label(agent_id, display, current)
        return {**row, "display_name": display, "tags": current}

    # -- sessions --------------------------------------------------------------------------
    def session_seen(self, agent_id: str, hello: dict[str, Any], capabilities: Any) -> None:
        """An agent opened its session: stored as seen now, with what its hello says when
        that changed (one batched row otherwise)."""
        record = self.directory.get(agent_id)
        if record is not None:
            record["capabilities"] = capabilities
        now = self.clock.seconds()
        listed = list(capabilities.values())
        described = describe(hello.get("hostname", ""), hello.get("platform", ""), listed)
        if record is not None and record.get("described") == described:
            self._agents.agent_seen(agent_id, now)  # unchanged: one batched row
        else:
            self._agents.agent_seen(
                agent_id,
                now,
                hostname=hello.get("hostname"),
                platform=hello.get("platform"),
                capabilities=listed,
            )
            if record is not None:
                record["described"] = described

    def session_left(self, agent_id: str) -> None:
        """An agent's session closed: stored as seen now."""
        self._agents.agent_seen(agent_id, self.clock.seconds())
