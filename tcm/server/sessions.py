"""Agent sessions on the server: the session state machine and the registry of live sessions.

`AgentSession` knows nothing of sockets: it gets decoded envelopes and talks to an
`ISessionTransport`-like object (send bytes, close with a code). The Autobahn protocol in
`websocket.py` is a thin adapter around it; tests drive it with a fake transport.

Session rules (docs/protocol.md):
- The first message must be `hello` within the handshake timeout, or the session is closed
  with 4001; any other first message closes it with 4002.
- A new session of an agent supersedes the old one: the old one is closed with 4000. One rule,
  whoever connects last wins: a reconnecting agent is never locked out by its own half-open
  old session.
- A message that fails to decode gets an `error` naming its id; the session lives on.
"""

from __future__ import annotations

import enum
import json
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.logger import Logger

from tcm.protocol import codes
from tcm.protocol.envelope import Envelope, ProtocolError, decode, encode, error_for, new_id


class Interner:
    """Shares equal, read-only dicts between sessions: most agents declare the same
    capabilities, run the same version and negotiate the same TLS, and at tens of thousands
    of sessions one copy each is what memory per session is made of."""

    def __init__(self, limit: int = 4096):
        self._cache: dict[str, Any] = {}
        self._limit = limit

    def __call__(self, value: Any) -> Any:
        key = json.dumps(value, sort_keys=True, separators=(",", ":"))
        shared = self._cache.get(key)
        if shared is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            shared = self._cache[key] = value
        return shared


intern = Interner()


class SessionTransport(Protocol):
    """What a session needs from its connection."""

    peer_transport: Any  # the connection under the session (peer certificate, address)

    def send_frame(self, frame: bytes) -> None: ...
    def send_prepared(self, prepared: Any) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    def dropConnection(self, abort: bool = False) -> None: ...


class SessionState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    OPEN = "open"
    CLOSED = "closed"


class AgentSession:
    """One agent's persistent session, from hello to close."""

    _log = Logger()
    # One of these per connected agent, tens of thousands per process: no instance dict,
    # and the message handlers looked up by name on the class, not bound per session.
    __slots__ = (
        "agent_id",
        "route",
        "transport",
        "hub",
        "via",
        "max_message_size",
        "id",
        "state",
        "connected_at",
        "last_rx",
        "capabilities",
        "hostname",
        "in_flight",
        "info",
        "tls",
        "channel",
    )
    _HANDLERS = {"hello": "_on_hello", "request": "_on_request", "error": "_on_error"}

    def __init__(
        self,
        agent_id: str,
        transport: SessionTransport,
        hub: SessionHub,
        now: float,
        route: Any,
        via: str = "direct",
        max_message_size: int = 1024 * 1024,
    ):
        self.agent_id = agent_id
        self.route = route
        self.transport = transport
        self.hub = hub
        self.via = via
        self.max_message_size = max_message_size
        self.id = new_id()[:16]
        self.state = SessionState.AWAITING_HELLO
        self.connected_at = now
        self.last_rx = now
        self.capabilities: dict[str, dict[str, Any]] = {}
        self.hostname = ""
        self.in_flight = 0
        self.info: dict[str, Any] = {}
        self.channel = "core"  # or "task": a task-client session, carried by a task server
        self.tls: dict[str, Any] | None = None

    # -- input -------------------------------------------------------------------------
    def frame_received(self, payload: bytes, now: float) -> Any:
        """One text frame from the agent. Returns, for a request, the Deferred that fires
        once it is answered (a result: once committed); else None (handled already)."""
        self.last_rx = now
        try:
            env = decode(payload, self.max_message_size)
        except ProtocolError as e:
            self._log.info(
                "agent {agent} sent a bad message: {code}: {msg}",
                agent=self.agent_id,
                code=e.code,
                msg=e.message,
            )
            self.send(error_for(e))
            if self.state is SessionState.AWAITING_HELLO:
                self.close(codes.CLOSE_PROTOCOL_ERROR, "first message must be a valid hello")
            return None
        if self.state is SessionState.AWAITING_HELLO and env.type != "hello":
            self.send(env.error_reply(codes.ERR_UNEXPECTED, "first message must be hello"))
            self.close(codes.CLOSE_PROTOCOL_ERROR, "first message must be hello")
            return None
        name = self._HANDLERS.get(env.type)
        if name is None:
            self.send(env.error_reply(codes.ERR_UNEXPECTED, f"agents may not send {env.type!r}"))
            return None
        handler: Callable[[Envelope], Any] = getattr(self, name)
        try:
            return handler(env)
        except Exception:
            self._log.failure(
                "handling {type} {id} from agent {agent}",
                type=env.type,
                id=env.id,
                agent=self.agent_id,
            )
            self.send(
                env.error_reply(codes.ERR_INTERNAL, "the server failed to handle this message")
            )
            return None

    def _on_hello(self, env: Envelope) -> None:
        if self.state is not SessionState.AWAITING_HELLO:
            self.send(env.error_reply(codes.ERR_UNEXPECTED, "hello already received"))
            return
        data = env.data
        self.capabilities = intern({c["name"]: c for c in data["capabilities"]})
        self.hostname = data.get("hostname", "")
        self.info = intern(
            {"agent_version": data["agent_version"], "platform": data.get("platform", "")}
        )
        self.state = SessionState.OPEN
        welcome = self.hub.welcome_for(self)
        self.send(env.reply("welcome", welcome))
        self.hub.session_opened(self, data)

    def _on_request(self, env: Envelope) -> Any:
        if self.in_flight >= self.hub.max_in_flight:
            self.send(
                env.error_reply(
                    codes.ERR_IN_FLIGHT, f"more than {self.hub.max_in_flight} requests in flight"
                )
            )
            return None
        self.in_flight += 1

        def answered(response: Envelope) -> None:
            self.in_flight -= 1
            if self.state is not SessionState.CLOSED:
                self.send(response)

        def failed(f) -> Envelope:
            self._log.failure(
                "request {path} from agent {agent} failed",
                f,
                path=env.data.get("path"),
                agent=self.agent_id,
            )
            return env.error_reply(codes.ERR_INTERNAL, "the server failed to answer this request")

        return self.hub.handle_request(self, env).addErrback(failed).addCallback(answered)

    def _on_error(self, env: Envelope) -> None:
        self._log.info(
            "agent {agent} reports error for {ref}: {code}: {msg}",
            agent=self.agent_id,
            ref=env.in_reply_to,
            code=env.data["code"],
            msg=env.data["message"],
        )

    # -- output ------------------------------------------------------------------------
    def send(self, env: Envelope) -> None:
        self.transport.send_frame(encode(env))

    def close(self, code: int, reason: str | None = None) -> None:
        if self.state is SessionState.CLOSED:
            return
        self.transport.close(code, reason or codes.CLOSE_REASONS.get(code, ""))

    def connection_lost(self) -> None:
        """The connection is gone (closed by either side, or dropped)."""
        if self.state is SessionState.CLOSED:
            return
        was_open = self.state is SessionState.OPEN
        self.state = SessionState.CLOSED
        if was_open:
            self.hub.session_closed(self)


class SessionHub(Protocol):
    """What sessions call on the server (implemented by server.service.AgentHub)."""

    max_in_flight: int

    def welcome_for(self, session: AgentSession) -> dict[str, Any]: ...
    def session_opened(self, session: AgentSession, hello: dict[str, Any]) -> None: ...
    def session_closed(self, session: AgentSession) -> None: ...
    def handle_request(self, session: AgentSession, env: Envelope) -> Any: ...


class SessionRegistry:
    """Live sessions by agent id, with the supersede rule."""

    _log = Logger()

    def __init__(self) -> None:
        self._sessions: dict[str, AgentSession] = {}

    def add(self, session: AgentSession) -> AgentSession | None:
        """Register an open session; returns the session it superseded, if any (closed)."""
        old = self._sessions.get(session.agent_id)
        self._sessions[session.agent_id] = session
        if old is not None and old is not session:
            self._log.info(
                "agent {agent} opened a new session; closing the old one", agent=session.agent_id
            )
            old.close(codes.CLOSE_SUPERSEDED)
            return old
        return None

    def remove(self, session: AgentSession) -> bool:
        """Forget a closed session (but not its successor). True if it was the live one."""
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
            return True
        return False

    def get(self, agent_id: str) -> AgentSession | None:
        return self._sessions.get(agent_id)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[AgentSession]:
        return list(self._sessions.values())

    def idle_since(self, deadline: float) -> list[AgentSession]:
        """Sessions that received nothing since `deadline` (half-open, most likely)."""
        return [s for s in self._sessions.values() if s.last_rx < deadline]


#: Supersedes of one identity within `CLONE_WINDOW` seconds that mark it cloned.
CLONE_SUPERSEDES = 6
CLONE_WINDOW = 120.0


class CloneWatch:
    """Tells a cloned identity (one agent's state directory copied to a second machine) from
    an agent that reconnects: pure bookkeeping, time passed in.

    - *Alternating sessions*: two live agents of one identity supersede each other at every
      reconnect; `limit` supersedes within `window` seconds mark it cloned. A reconnecting
      agent supersedes its half-open old session once per reconnect, far below that.
    - *Two keys*: a session presents a certificate (fingerprint) the identity had before
      another one. A renewing agent moves to its new key and never back.

    A cloned identity is refused (close 4013) until the operator re-keys it; the mark is kept
    in memory (a restart forgets it, and the clones are found again)."""

    _log = Logger()

    def __init__(self, limit: int = CLONE_SUPERSEDES, window: float = CLONE_WINDOW):
        self.limit = limit
        self.window = window
        self._supersedes: dict[str, deque[float]] = {}
        self._keys: dict[str, list[str]] = {}  # fingerprints in the order they came, last 4
        self.cloned: dict[str, str] = {}  # agent id -> why
        self.superseded_total = 0

    def is_cloned(self, agent_id: str) -> bool:
        return agent_id in self.cloned

    def forget(self, agent_id: str) -> None:
        """The identity was re-keyed (revoked): nothing of it is kept."""
        self._supersedes.pop(agent_id, None)
        self._keys.pop(agent_id, None)
        self.cloned.pop(agent_id, None)

    def session_opened(
        self,
        agent_id: str,
        fingerprint: str | None,
        replaced: str | None,
        supersedes: bool,
        now: float,
    ) -> str | None:
        """A session of `agent_id` opens with certificate `fingerprint`, replacing a live one
        (`supersedes`) whose certificate was `replaced`: why the identity is found cloned now,
        or None (also when it was marked before). Keys are only kept for identities that
        supersede, so a fleet that does not costs nothing here."""
        if agent_id in self.cloned or not supersedes:
            return None
        self.superseded_total += 1
        why = self._two_keys(agent_id, replaced, fingerprint) or self._alternating(agent_id, now)
        if why is not None:
            self.cloned[agent_id] = why
            self._log.warn("agent {agent} is cloned: {why}", agent=agent_id, why=why)
        return why

    def _two_keys(self, agent_id: str, replaced: str | None, fingerprint: str | None) -> str | None:
        if fingerprint is None or replaced is None:  # behind a node: the node checked it
            return None
        keys = self._keys.setdefault(agent_id, [replaced[:16]])
        new = fingerprint[:16]
        if keys[-1] == new:
            return None
        if new in keys:
            return f"two certificates alternate ({keys[-1]}, {new})"
        keys.append(new)
        del keys[:-4]
        return None

    def _alternating(self, agent_id: str, now: float) -> str | None:
        times = self._supersedes.setdefault(agent_id, deque())
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return f"{len(times)} sessions superseded each other within {self.window:.0f} s"
        return None
