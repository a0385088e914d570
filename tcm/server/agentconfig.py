"""Policies and connection profiles: what each agent should run and how it should connect.

A *policy* is a versioned document of a type that a plugin on the agent handles
(`IPolicyHandler`), assigned to targets. A *connection profile* is a versioned set of
connection settings (`tcm.protocol.schemas.PROFILE_SETTINGS`), assigned to targets with a
priority. Both live in memory (a few hundred at most) and in the store: `PolicyService`
(tcm/server/policies.py) and `ProfileService` (tcm/server/profiles.py); this module holds what
they share (`AgentConfigBook`) and the rules both check.

Agents are told at once when what applies to them changes: a `notify` envelope (topic
`policies` or `profile`) goes through the dispatcher to each affected agent's session or
held long-poll; an agent between plain polls gets it in its next poll's answer. The agent then
fetches (`GET /agent/v1/policies`, `GET /agent/v1/profile`) and reports what it runs.

Which profile an agent gets ("most specific wins"):
  1. among the target assignments whose target holds the agent: the highest priority; on a
     tie, the target with the fewest members; on a tie, the profile name (alphabetically);
  2. else the profile named by the enrollment token the agent enrolled with;
  3. else none (the agent keeps its command-line settings).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import fastjsonschema
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from tcm.protocol.envelope import Envelope, encode
from tcm.protocol.schemas import NAME_PATTERN, PROFILE_SETTINGS
from tcm.server.dispatcher import Dispatcher
from tcm.server.errors import DomainError, Invalid

NAME = re.compile(NAME_PATTERN)
PUSHED, NOT_CONNECTED, EMPTY, FAILED = "pushed", "not connected", "empty policy", "failed"
DEFAULT_PUSH_WAIT = 10.0
MEMBERS_TTL = 2.0  # seconds a target's members may be reused for agents' fetches
_profile_validator = fastjsonschema.compile(PROFILE_SETTINGS)

ResolveTarget = Callable[[str], Deferred]  # target name -> Deferred[set of agent ids]


def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise Invalid("name", f"{kind} name must match {NAME_PATTERN}, got {name!r}")
    return name


def check_fields(body: dict[str, Any], kind: str, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Invalid(
            None, f"unknown field(s) {', '.join(unknown)} for a {kind}", known=sorted(allowed)
        )


def check_profile_settings(settings: Any) -> dict[str, Any]:
    """A profile's settings, checked; Invalid naming the bad key or value."""
    if not isinstance(settings, dict):
        raise Invalid("settings", "profile 'settings' must be a JSON object")
    unknown = sorted(set(settings) - set(PROFILE_SETTINGS["properties"]))
    if unknown:
        raise Invalid(
            "settings",
            f"unknown profile setting(s) {', '.join(unknown)}",
            known=sorted(PROFILE_SETTINGS["properties"]),
        )
    try:
        _profile_validator(settings)
    except fastjsonschema.JsonSchemaValueException as e:
        raise Invalid("settings", f"bad profile setting: {e.message}") from None
    low, high = settings.get("backoff_initial"), settings.get("backoff_max")
    if low is not None and high is not None and low > high:
        raise Invalid("settings", "bad profile setting: backoff_initial is above backoff_max")
    return settings


def choose_profile(
    candidates: Iterable[tuple[str, int, int]], enrollment_profile: str | None
) -> str | None:
    """The profile that wins for one agent. Pure.

    `candidates`: (profile, priority, members of the assignment's target) for each assignment
    whose target holds the agent."""
    ranked = sorted(candidates, key=lambda c: (-c[1], c[2], c[0]))
    if ranked:
        return ranked[0][0]
    return enrollment_profile


def policy_types_on_server() -> dict[str, Any]:
    """Policy type -> handler of the IPolicyHandler plugins installed beside the server (for
    checking documents); types only the agents have are learnt from their hellos."""
    from twisted.plugin import getPlugins

    import tcm.plugins
    from tcm.interfaces import IPolicyHandler

    return {p.type: p for p in getPlugins(IPolicyHandler, tcm.plugins)}


class AgentConfigBook:
    """What policies and profiles share: each agent's config row (what it reports running,
    its enrollment profile), the notices it missed, and target members resolved for it."""

    _log = Logger()

    def __init__(
        self, agent_store: Any, dispatcher: Dispatcher, clock: Any, resolve_target: ResolveTarget
    ):
        self.agent_store = agent_store
        self.dispatcher = dispatcher
        self.clock = clock
        self.resolve_target = resolve_target
        self.agents: dict[str, dict[str, Any]] = {}  # agent -> agent_config row
        self.pending: dict[str, set[str]] = {}  # agent -> topics to tell at its next poll
        self._members_cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._resolving: dict[str, tuple[float, list[Deferred]]] = {}
        self._opened_at: dict[str, float] = {}  # agent -> when its session was registered

    @inlineCallbacks
    def load(self):
        self.agents = {r["agent_id"]: r for r in (yield self.agent_store.load_agent_config())}

    def forget_members(self) -> None:
        """Targets changed (on another node of the cluster): resolve them again."""
        self._members_cache.clear()

    def row(self, agent_id: str) -> dict[str, Any]:
        """The agent's config row (made when it has none)."""
        return self.agents.setdefault(agent_id, {"agent_id": agent_id, "policies": {}})

    def resolve(self, target: str, since: float | None = None) -> Deferred:
        """A target's members; none (logged) for a target deleted or broken since it was
        assigned, so one bad assignment does not keep agents from their other policies.

        With `since` (agents fetching: thousands at once in a reconnect storm) the answer may
        come from a resolution that started at or after `since` (the fetching agent's session
        start, so a filter on `online` sees it) and is at most MEMBERS_TTL seconds old, or
        share one under way; without, (a change an admin makes) it is resolved afresh."""
        if since is not None:
            hit = self._members_cache.get(target)
            now = self.clock.seconds()
            if hit is not None and hit[0] >= since and now - hit[0] < MEMBERS_TTL:
                return succeed(hit[1])
            running = self._resolving.get(target)
            if running is not None and running[0] >= since:
                shared: Deferred = Deferred()
                running[1].append(shared)
                return shared
        started = self.clock.seconds()
        waiters: list[Deferred] = []
        self._resolving[target] = (started, waiters)

        def missing(f: Any) -> set[str]:
            f.trap(LookupError, ValueError)
            self._log.warn("target {t} is assigned but gives no agents: {e}", t=target, e=f.value)
            return set()

        def done(result: Any) -> Any:
            if self._resolving.get(target, (None, None))[1] is waiters:
                del self._resolving[target]
            if isinstance(result, Failure):
                for w in waiters:
                    w.errback(result)
                return result
            members = frozenset(result)
            if started >= self._members_cache.get(target, (float("-inf"),))[0]:
                self._members_cache[target] = (started, members)
            for w in waiters:
                w.callback(members)
            return members

        return self.resolve_target(target).addErrback(missing).addBoth(done)

    @inlineCallbacks
    def members(self, targets: Iterable[str], since: float | None = None):
        """Agent ids in any of the targets (see _resolve for `since`)."""
        out: set[str] = set()
        for target in targets:
            out |= set((yield self.resolve(target, since)))
        return out

    @inlineCallbacks
    def check_targets(self, targets: Any):
        if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
            raise Invalid("targets", "'targets' must be a list of target names")
        for target in targets:
            try:
                yield self.resolve_target(target)
            except DomainError as e:
                raise Invalid("targets", f"target {target!r}: {e.message}") from None
            except LookupError:
                raise Invalid("targets", f"no such target: {target!r}") from None
            except ValueError as e:  # a stored filter that no longer parses
                raise Invalid("targets", f"target {target!r}: {e}") from None
        return list(dict.fromkeys(targets))

    def since_for(self, agent_id: str) -> float:
        """How fresh target members must be for an agent's fetch: from its session's start
        (a session's agent is online in every resolution since), else now (HTTP mode)."""
        if agent_id in self.dispatcher.registry and agent_id in self._opened_at:
            return self._opened_at[agent_id]
        return self.clock.seconds()

    def running(self, agent_id: str) -> dict[str, Any]:
        """What an agent last reported it runs (for the admin's agent view)."""
        row = self.agents.get(agent_id) or {}
        profile = None
        if row.get("profile"):
            profile = {"name": row["profile"], "version": row.get("profile_version")}
        return {
            "profile": profile,
            "enrollment_profile": row.get("enrollment_profile"),
            "policies": row.get("policies") or {},
        }

    def notify(
        self, agents: Iterable[str], topic: str, version: int | None, name: str | None
    ) -> tuple[list[str], list[str]]:
        """Tell agents to fetch `topic` again: at once where they have a session or a held
        long-poll; at their next poll (or session start) otherwise."""
        agents = list(agents)
        if not agents:
            return [], []
        data: dict[str, Any] = {"topic": topic, "version": version}
        if name is not None:
            data["name"] = name
        frame = encode(Envelope(type="notify", data=data))
        sent, offline = self.dispatcher.push(frame, agents)
        for agent_id in offline:
            self.pending.setdefault(agent_id, set()).add(topic)
        return sent, offline

    def notices_for(self, agent_id: str) -> list[dict[str, Any]]:
        """Notifications an agent missed between polls (given with its next poll's answer)."""
        topics = self.pending.pop(agent_id, None)
        return [Envelope(type="notify", data={"topic": t}).to_dict() for t in sorted(topics or ())]

    def session_opened(self, agent_id: str) -> None:
        """An agent fetches policies and profile at session start: nothing is pending."""
        self._opened_at[agent_id] = self.clock.seconds()
        self.pending.pop(agent_id, None)
