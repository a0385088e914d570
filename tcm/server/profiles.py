"""Connection profiles: agent settings (servers, gateways, polling, backoff) assigned to
targets with a priority; the most specific assignment wins for each agent, an enrollment
token's profile when none does."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import IProfiles
from tcm.server.agentconfig import (
    AgentConfigBook,
    check_fields,
    check_name,
    check_profile_settings,
    choose_profile,
)
from tcm.server.errors import Conflict, Invalid, NotFound


@implementer(IProfiles)
class ProfileService:
    """Connection profiles: storage, assignment to agents, agents' reports."""

    _log = Logger()

    def __init__(self, book: AgentConfigBook, config_store: Any, clock: Any):
        self.book = book
        self.store = config_store
        self.clock = clock
        self.profiles: dict[str, dict[str, Any]] = {}

    @inlineCallbacks
    def load(self):
        self.profiles = {p["name"]: p for p in (yield self.store.load_profiles())}

    def session_opened(self, agent_id: str, hello: dict[str, Any]) -> None:
        """What the agent runs from its first message on (it reports again after
        fetching)."""
        running = hello.get("profile")
        if "profile" in hello and (running or None) != self._profile_ref(agent_id):
            name = running["name"] if running else None
            version = running.get("version") if running else None
            self.report_profile(agent_id, {"name": name, "version": version})

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
        targets = yield self.book.check_targets(body.get("targets", [a["target"] for a in old]))
        priority = body.get("priority", old[0]["priority"] if old else 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise Invalid("priority", "'priority' must be an integer")
        return [{"target": x, "priority": priority} for x in targets]

    @inlineCallbacks
    def create_profile(self, body: dict[str, Any]):
        check_fields(body, "profile", {"name", "settings", "targets", "priority"})
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
        agents |= {a for a, row in self.book.agents.items() if row.get("profile") in changed}
        self.book.notify(agents, "profile", None, None)

    @inlineCallbacks
    def _profile_map(self):
        """agent id -> the name of the profile that wins for it, for every agent that has one."""
        size: dict[str, set[str]] = {}
        candidates: dict[str, list[tuple[str, int, int]]] = {}
        for profile in self.profiles.values():
            for a in profile["assignments"]:
                target = a["target"]
                if target not in size:
                    size[target] = set((yield self.book.resolve(target)))
                for agent_id in size[target]:
                    candidates.setdefault(agent_id, []).append(
                        (profile["name"], a["priority"], len(size[target]))
                    )
        out: dict[str, str | None] = {}
        for agent_id in set(candidates) | set(self.book.agents):
            enrolled = self.book.agents.get(agent_id, {}).get("enrollment_profile")
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
        since = self.book.since_for(agent_id)
        for profile in self.profiles.values():
            for a in profile["assignments"]:
                members = set((yield self.book.resolve(a["target"], since)))
                if agent_id in members:
                    candidates.append((profile["name"], a["priority"], len(members)))
        enrolled = self.book.agents.get(agent_id, {}).get("enrollment_profile")
        chosen = choose_profile(candidates, enrolled if enrolled in self.profiles else None)
        self.book.pending.get(agent_id, set()).discard("profile")
        if chosen is None:
            return None
        p = self.profiles[chosen]
        return {"name": p["name"], "version": p["version"], "settings": p["settings"]}

    def set_enrollment_profile(self, agent_id: str, profile: str | None) -> Deferred:
        row = self.book.row(agent_id)
        row["enrollment_profile"] = profile
        return self.book.agent_store.set_agent_config(agent_id, enrollment_profile=profile)

    def report_profile(self, agent_id: str, body: dict[str, Any]) -> dict[str, Any]:
        name, version = body.get("name"), body.get("version")
        if name is not None and not isinstance(name, str):
            raise Invalid("name", "'name' must be a profile name or null")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise Invalid("version", "'version' must be an integer or null")
        row = self.book.row(agent_id)
        row.update(profile=name, profile_version=version, reported_at=self.clock.seconds())
        self.book.agent_store.set_agent_config(
            agent_id, profile=name, profile_version=version, reported_at=row["reported_at"]
        )
        return {"stored": True}

    def _profile_ref(self, agent_id: str) -> dict[str, Any] | None:
        row = self.book.agents.get(agent_id) or {}
        if not row.get("profile"):
            return None
        return {"name": row["profile"], "version": row.get("profile_version")}
