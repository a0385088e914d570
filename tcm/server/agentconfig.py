"""Policies and connection profiles: what each agent should run and how it should connect.

A *policy* is a versioned document of a type that a plugin on the agent handles
(`IPolicyHandler`), assigned to targets. A *connection profile* is a versioned set of
connection settings (`tcm.protocol.schemas.PROFILE_SETTINGS`), assigned to targets with a
priority. Both live in memory here (a few hundred at most) and in the store.

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
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcm.interfaces import IPolicies, IProfiles
from tcm.protocol.envelope import Envelope, encode
from tcm.protocol.schemas import NAME_PATTERN, PROFILE_SETTINGS
from tcm.schedule import Cron, ScheduleError
from tcm.server import inventory
from tcm.server.dispatcher import Dispatcher
from tcm.server.errors import Conflict, DomainError, Invalid, NotFound

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


def _only(body: dict[str, Any], kind: str, allowed: set[str]) -> None:
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


@implementer(IPolicies, IProfiles)
class ConfigService:
    """Policies and connection profiles: storage, resolution, notification, PushPolicy."""

    _log = Logger()

    def __init__(
        self,
        config_store: Any,
        dispatcher: Dispatcher,
        clock: Any,
        resolve_target: ResolveTarget,
        policy_handlers: dict[str, Any] | None = None,
        agent_store: Any = None,
        inventory_store: Any = None,
    ):
        # the store's areas: policies and profiles; agents' config rows; inventory (what
        # an inventory policy collects). One Store object has all three.
        self.store = config_store
        self.agent_store = agent_store if agent_store is not None else config_store
        self.inventory_store = inventory_store if inventory_store is not None else config_store
        self.dispatcher = dispatcher
        self.clock = clock
        self.resolve_target = resolve_target
        self.policy_handlers = (
            policy_handlers if policy_handlers is not None else policy_types_on_server()
        )
        self._validators: dict[str, Any] = {}
        self.agent_policy_types: dict[str, set[str]] = {}  # agent -> types from its hello
        self.policies: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, dict[str, Any]] = {}
        self.agents: dict[str, dict[str, Any]] = {}  # agent -> agent_config row
        self.pending: dict[str, set[str]] = {}  # agent -> topics to tell at its next poll
        self._waiters: dict[tuple[str, str], list[tuple[int, Deferred]]] = {}
        self._members_cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._resolving: dict[str, tuple[float, list[Deferred]]] = {}
        self._opened_at: dict[str, float] = {}  # agent -> when its session was registered

    @inlineCallbacks
    def load(self):
        self.policies = {p["name"]: p for p in (yield self.store.load_policies())}
        self.profiles = {p["name"]: p for p in (yield self.store.load_profiles())}
        self.agents = {r["agent_id"]: r for r in (yield self.agent_store.load_agent_config())}

    # -- targets -----------------------------------------------------------------------
    def _resolve(self, target: str, since: float | None = None) -> Deferred:
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
            out |= set((yield self._resolve(target, since)))
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

    # -- policies ----------------------------------------------------------------------
    def known_policy_types(self) -> set[str]:
        known = set(self.policy_handlers)
        for types in self.agent_policy_types.values():
            known |= types
        return known

    def check_document(self, policy_type: Any, document: Any) -> None:
        if not isinstance(policy_type, str) or not NAME.match(policy_type):
            raise Invalid("type", f"policy 'type' must be a policy type name, got {policy_type!r}")
        if policy_type not in self.known_policy_types():
            raise Invalid(
                "type",
                f"unknown policy type {policy_type!r}",
                known=sorted(self.known_policy_types()),
            )
        if not isinstance(document, dict):
            raise Invalid("document", "policy 'document' must be a JSON object")
        handler = self.policy_handlers.get(policy_type)
        if handler is None or not document:  # an empty document is allowed: nothing to do
            return
        validator = self._validators.get(policy_type)
        if validator is None:
            validator = self._validators[policy_type] = fastjsonschema.compile(handler.schema)
        try:
            validator(document)
        except fastjsonschema.JsonSchemaValueException as e:
            raise Invalid("document", f"bad {policy_type} document: {e.message}") from None
        if "cron" in (handler.schema.get("properties") or {}) and "cron" in document:
            try:
                Cron.parse(document["cron"])
            except ScheduleError as e:
                raise Invalid("document", f"bad {policy_type} document: {e}") from None

    def policy_view(self, policy: dict[str, Any]) -> dict[str, Any]:
        return {k: policy[k] for k in ("name", "type", "version", "document", "targets")} | {
            "created_at": policy["created_at"],
            "updated_at": policy["updated_at"],
        }

    def get_policy(self, name: str) -> dict[str, Any]:
        policy = self.policies.get(name)
        if policy is None:
            raise NotFound(f"no such policy: {name}")
        return policy

    @inlineCallbacks
    def create_policy(self, body: dict[str, Any]):
        _only(body, "policy", {"name", "type", "document", "targets"})
        name = check_name("policy", body.get("name"))
        if name in self.policies:
            raise Conflict(f"policy {name} exists; use update")
        self.check_document(body.get("type"), body.get("document", {}))
        targets = yield self.check_targets(body.get("targets", []))
        now = self.clock.seconds()
        policy = {
            "name": name,
            "type": body["type"],
            "document": body.get("document", {}),
            "version": 1,
            "created_at": now,
            "updated_at": now,
        }
        yield self.store.save_policy(policy, targets)
        self.policies[name] = {**policy, "targets": targets}
        yield self._policies_changed(targets, name, 1)
        return self.policy_view(self.policies[name])

    @inlineCallbacks
    def update_policy(self, name: str, body: dict[str, Any]):
        old = self.get_policy(name)
        unknown = set(body) - {"document", "targets", "type"}
        if unknown:
            raise Invalid(None, f"cannot update {', '.join(sorted(unknown))} of a policy")
        policy_type = body.get("type", old["type"])
        document = body.get("document", old["document"])
        self.check_document(policy_type, document)
        targets = old["targets"]
        if "targets" in body:
            targets = yield self.check_targets(body["targets"])
        new = {
            **{k: old[k] for k in ("name", "created_at")},
            "type": policy_type,
            "document": document,
            "version": old["version"] + 1,
            "updated_at": self.clock.seconds(),
        }
        yield self.store.save_policy(new, targets)
        self.policies[name] = {**new, "targets": targets}
        yield self._policies_changed(set(old["targets"]) | set(targets), name, new["version"])
        return self.policy_view(self.policies[name])

    @inlineCallbacks
    def delete_policy(self, name: str):
        old = self.get_policy(name)
        yield self.store.delete_policy(name)
        del self.policies[name]
        yield self._policies_changed(old["targets"], name, None)
        return {"deleted": name}

    @inlineCallbacks
    def _policies_changed(self, targets: Iterable[str], name: str, version: int | None):
        agents = yield self.members(targets)
        self.notify(agents, "policies", version, name)

    def _since(self, agent_id: str) -> float:
        """How fresh target members must be for an agent's fetch: from its session's start
        (a session's agent is online in every resolution since), else now (HTTP mode)."""
        if agent_id in self.dispatcher.registry and agent_id in self._opened_at:
            return self._opened_at[agent_id]
        return self.clock.seconds()

    @inlineCallbacks
    def policies_for(self, agent_id: str):
        """The policies that apply to one agent (what GET /agent/v1/policies answers)."""
        out = []
        since = self._since(agent_id)
        for policy in sorted(self.policies.values(), key=lambda p: p["name"]):
            if agent_id in (yield self.members(policy["targets"], since)):
                out.append({k: policy[k] for k in ("name", "type", "version", "document")})
        self.pending.get(agent_id, set()).discard("policies")
        return out

    @inlineCallbacks
    def push(self, name: str, wait: float = DEFAULT_PUSH_WAIT):
        """PushPolicy: deliver a policy to its agents now; per agent `pushed` (applied there),
        `not connected`, `empty policy` or `failed` (with the agent's reason)."""
        policy = self.get_policy(name)
        agents = sorted((yield self.members(policy["targets"])))
        version = policy["version"]
        results: dict[str, dict[str, Any]] = {}
        if not policy["document"]:
            for agent_id in agents:
                results[agent_id] = {"status": EMPTY, "reason": "the policy document is empty"}
            return {"policy": name, "version": version, "agents": results}
        waits = {a: self._wait_report(a, name, version, wait) for a in agents}
        sent, offline = self.notify(agents, "policies", version, name)
        for agent_id in offline:
            self._drop_waiter(agent_id, name, waits.pop(agent_id))
            results[agent_id] = {
                "status": NOT_CONNECTED,
                "reason": "no session and no waiting poll; it gets the policy when it returns",
            }
        reports = yield gatherResults([waits[a] for a in sent]) if sent else succeed([])
        for agent_id, report in zip(sent, reports, strict=True):
            if report is None:
                results[agent_id] = {
                    "status": FAILED,
                    "reason": f"no report from the agent within {wait:g} s",
                }
            elif report.get("state") == "applied":
                results[agent_id] = {"status": PUSHED, "version": report.get("version")}
            else:
                results[agent_id] = {
                    "status": FAILED,
                    "reason": report.get("error") or f"agent reports {report.get('state')}",
                }
        self._log.info(
            "policy {name} v{version} pushed to {n} agents: {statuses}",
            name=name,
            version=version,
            n=len(agents),
            statuses=sorted({r["status"] for r in results.values()}),
        )
        return {"policy": name, "version": version, "agents": dict(sorted(results.items()))}

    def _wait_report(self, agent_id: str, name: str, version: int, wait: float) -> Deferred:
        d: Deferred = Deferred()
        entry = (version, d)
        self._waiters.setdefault((agent_id, name), []).append(entry)
        timer = self.clock.callLater(wait, self._timeout_waiter, agent_id, name, entry)

        def cancel_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(cancel_timer)
        return d

    def _drop_waiter(self, agent_id: str, name: str, d: Deferred) -> None:
        waiters = self._waiters.get((agent_id, name), [])
        self._waiters[(agent_id, name)] = [w for w in waiters if w[1] is not d]
        if not self._waiters[(agent_id, name)]:
            del self._waiters[(agent_id, name)]
        d.callback(None)

    def _timeout_waiter(self, agent_id: str, name: str, entry: tuple[int, Deferred]) -> None:
        if entry in self._waiters.get((agent_id, name), []):
            self._drop_waiter(agent_id, name, entry[1])

    def report_policies(self, agent_id: str, reports: Any) -> dict[str, Any]:
        """An agent says which policies it runs: {name: {version, state, error, at, last_run}}."""
        if not isinstance(reports, dict) or not all(isinstance(v, dict) for v in reports.values()):
            raise Invalid(
                "policies", "'policies' must be an object of policy name -> status object"
            )
        for name, report in reports.items():
            if report.get("state") not in ("applied", "failed", "removed"):
                raise Invalid(
                    "policies", f"policy {name}: 'state' must be applied, failed or removed"
                )
            if not isinstance(report.get("version"), int):
                raise Invalid("policies", f"policy {name}: 'version' must be an integer")
        row = self.agents.setdefault(agent_id, {"agent_id": agent_id, "policies": {}})
        merged = dict(row.get("policies") or {})
        for name, report in reports.items():
            report = self._keep_inventory(agent_id, name, report)
            if report["state"] == "removed":
                merged.pop(name, None)
            else:
                merged[name] = {**merged.get(name, {}), **report}
            for version, d in self._waiters.pop((agent_id, name), []):
                if report["version"] >= version or report["state"] == "removed":
                    d.callback(report)
                else:
                    self._waiters.setdefault((agent_id, name), []).append((version, d))
        row["policies"] = merged
        row["reported_at"] = self.clock.seconds()
        self.agent_store.set_agent_config(agent_id, policies=merged, reported_at=row["reported_at"])
        return {"stored": len(reports)}

    def _keep_inventory(self, agent_id: str, name: str, report: dict[str, Any]) -> dict:
        """An inventory.schedule run's result goes where inventory.collect jobs' results go
        (the per-class inventory store); the policy keeps only which classes it collected."""
        policy = self.policies.get(name)
        run = report.get("last_run")
        if policy is None or policy["type"] != "inventory.schedule" or not isinstance(run, dict):
            return report
        result = run.get("result")
        if not run.get("ok") or not isinstance(result, dict):
            return report
        now = self.clock.seconds()
        collected = inventory.read_result(result, now)
        if collected is not None:
            self.inventory_store.store_inventory(agent_id, collected, now).addErrback(
                lambda f: self._log.failure("storing inventory of {agent}", f, agent=agent_id)
            )
        classes = sorted(result.get("classes") or {})
        return {**report, "last_run": {**run, "result": {"classes": classes}}}

    # -- connection profiles -----------------------------------------------------------
    def get_profile(self, name: str) -> dict[str, Any]:
        profile = self.profiles.get(name)
        if profile is None:
            raise NotFound(f"no such profile: {name}")
        return profile

    def profile_view(self, profile: dict[str, Any]) -> dict[str, Any]:
        return {
            k: profile[k]
            for k in ("name", "version", "settings", "assignments", "created_at", "updated_at")
        }

    @inlineCallbacks
    def _check_assignments(self, body: dict[str, Any], old: list[dict[str, Any]]):
        if "targets" not in body and "priority" not in body:
            return old
        targets = yield self.check_targets(body.get("targets", [a["target"] for a in old]))
        priority = body.get("priority", old[0]["priority"] if old else 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise Invalid("priority", "'priority' must be an integer")
        return [{"target": x, "priority": priority} for x in targets]

    @inlineCallbacks
    def create_profile(self, body: dict[str, Any]):
        _only(body, "profile", {"name", "settings", "targets", "priority"})
        name = check_name("profile", body.get("name"))
        if name in self.profiles:
            raise Conflict(f"profile {name} exists; use update")
        settings = check_profile_settings(body.get("settings", {}))
        assignments = yield self._check_assignments(body, [])
        now = self.clock.seconds()
        profile = {
            "name": name,
            "settings": settings,
            "version": 1,
            "created_at": now,
            "updated_at": now,
        }
        before = yield self._profile_map()
        yield self.store.save_profile(profile, assignments)
        self.profiles[name] = {**profile, "assignments": assignments}
        yield self._profiles_changed(before, {name})
        return self.profile_view(self.profiles[name])

    @inlineCallbacks
    def update_profile(self, name: str, body: dict[str, Any]):
        old = self.get_profile(name)
        unknown = set(body) - {"settings", "targets", "priority", "unset"}
        if unknown:
            raise Invalid(None, f"cannot update {', '.join(sorted(unknown))} of a profile")
        settings = dict(old["settings"])
        changes = body.get("settings", {})
        if not isinstance(changes, dict):
            raise Invalid("settings", "profile 'settings' must be a JSON object")
        settings.update(changes)
        unset = body.get("unset", [])
        if not isinstance(unset, list):
            raise Invalid("unset", "'unset' must be a list of setting names")
        for key in unset:
            settings.pop(key, None)
        check_profile_settings(settings)
        assignments = yield self._check_assignments(body, old["assignments"])
        new = {
            "name": name,
            "settings": settings,
            "version": old["version"] + 1,
            "created_at": old["created_at"],
            "updated_at": self.clock.seconds(),
        }
        before = yield self._profile_map()
        yield self.store.save_profile(new, assignments)
        self.profiles[name] = {**new, "assignments": assignments}
        yield self._profiles_changed(before, {name})
        return self.profile_view(self.profiles[name])

    @inlineCallbacks
    def delete_profile(self, name: str):
        self.get_profile(name)
        before = yield self._profile_map()
        yield self.store.delete_profile(name)
        del self.profiles[name]
        yield self._profiles_changed(before, {name})
        return {"deleted": name}

    @inlineCallbacks
    def _profiles_changed(self, before: dict[str, str | None], changed: set[str]):
        """Tell every agent whose profile (or its version) changed."""
        after = yield self._profile_map()
        agents = {
            a
            for a in set(before) | set(after)
            if before.get(a) != after.get(a) or after.get(a) in changed
        }
        # ... and every agent that says it runs a changed profile, member or not now: an
        # agent that left the profile's target meanwhile (a filter on a field that the
        # profile itself changes, such as `online`) must not keep a deleted profile.
        agents |= {a for a, row in self.agents.items() if row.get("profile") in changed}
        self.notify(agents, "profile", None, None)

    @inlineCallbacks
    def _profile_map(self):
        """agent id -> the name of the profile that wins for it, for every agent that has one."""
        size: dict[str, set[str]] = {}
        candidates: dict[str, list[tuple[str, int, int]]] = {}
        for profile in self.profiles.values():
            for a in profile["assignments"]:
                target = a["target"]
                if target not in size:
                    size[target] = set((yield self._resolve(target)))
                for agent_id in size[target]:
                    candidates.setdefault(agent_id, []).append(
                        (profile["name"], a["priority"], len(size[target]))
                    )
        out: dict[str, str | None] = {}
        for agent_id in set(candidates) | set(self.agents):
            enrolled = self.agents.get(agent_id, {}).get("enrollment_profile")
            if enrolled not in self.profiles:
                enrolled = None
            chosen = choose_profile(candidates.get(agent_id, []), enrolled)
            if chosen is not None:
                out[agent_id] = chosen
        return out

    @inlineCallbacks
    def profile_for(self, agent_id: str):
        """The profile that applies to one agent ({name, version, settings}) or None."""
        candidates = []
        since = self._since(agent_id)
        for profile in self.profiles.values():
            for a in profile["assignments"]:
                members = set((yield self._resolve(a["target"], since)))
                if agent_id in members:
                    candidates.append((profile["name"], a["priority"], len(members)))
        enrolled = self.agents.get(agent_id, {}).get("enrollment_profile")
        chosen = choose_profile(candidates, enrolled if enrolled in self.profiles else None)
        self.pending.get(agent_id, set()).discard("profile")
        if chosen is None:
            return None
        p = self.profiles[chosen]
        return {"name": p["name"], "version": p["version"], "settings": p["settings"]}

    def set_enrollment_profile(self, agent_id: str, profile: str | None) -> Deferred:
        row = self.agents.setdefault(agent_id, {"agent_id": agent_id, "policies": {}})
        row["enrollment_profile"] = profile
        return self.agent_store.set_agent_config(agent_id, enrollment_profile=profile)

    def report_profile(self, agent_id: str, body: dict[str, Any]) -> dict[str, Any]:
        name, version = body.get("name"), body.get("version")
        if name is not None and not isinstance(name, str):
            raise Invalid("name", "'name' must be a profile name or null")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise Invalid("version", "'version' must be an integer or null")
        row = self.agents.setdefault(agent_id, {"agent_id": agent_id, "policies": {}})
        row.update(profile=name, profile_version=version, reported_at=self.clock.seconds())
        self.agent_store.set_agent_config(
            agent_id, profile=name, profile_version=version, reported_at=row["reported_at"]
        )
        return {"stored": True}

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

    # -- telling agents ----------------------------------------------------------------
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

    def session_opened(self, agent_id: str, hello: dict[str, Any]) -> None:
        """An agent fetches policies and profile at session start: nothing is pending."""
        self._opened_at[agent_id] = self.clock.seconds()
        self.pending.pop(agent_id, None)
        types = hello.get("policy_types")
        if isinstance(types, list):
            self.agent_policy_types[agent_id] = set(types)
        running = hello.get("profile")
        if "profile" in hello and (running or None) != self._profile_ref(agent_id):
            # what the agent runs from its first message on (it reports again after fetching)
            name = running["name"] if running else None
            version = running.get("version") if running else None
            self.report_profile(agent_id, {"name": name, "version": version})

    def _profile_ref(self, agent_id: str) -> dict[str, Any] | None:
        row = self.agents.get(agent_id) or {}
        if not row.get("profile"):
            return None
        return {"name": row["profile"], "version": row.get("profile_version")}
