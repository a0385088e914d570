"""Policies on the agent: fetched from the server, kept on disk, put in force by plugins.

The agent keeps the policies that apply to it in `policies.json` in its state directory, so
they survive restarts and keep running while the server is out of reach. At start the stored
ones are applied again (`restored`); when the server says the policies changed (a `notify`
on the session or in a poll's answer), at session start and at the first poll of HTTP mode,
the agent fetches `GET /agent/v1/policies`, applies new versions, stops removed ones and
reports each policy's state (`POST /agent/v1/policies/status`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import attrs
import fastjsonschema
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcm.agent.runner import validator_for
from tcm.interfaces import (
    ActionFailed,
    IAgentAPI,
    IAppliedPolicy,
    IPolicyAgent,
    IPolicyContext,
    IPolicyHandler,
    ISessionObserver,
)
from tcm.schedule import Schedule, ScheduleError
from tcm.tls import pki

APPLIED, FAILED, REMOVED = "applied", "failed", "removed"


def _key(entry: dict[str, Any]) -> tuple[Any, Any]:
    return (entry.get("version"), entry.get("state"))


def load_policy_handlers() -> dict[str, Any]:
    """Discover every IPolicyHandler plugin; verify each; type -> handler."""
    from twisted.plugin import getPlugins

    import tcm.plugins

    handlers: dict[str, Any] = {}
    for plugin in getPlugins(IPolicyHandler, tcm.plugins):
        verifyObject(IPolicyHandler, plugin)
        if plugin.type in handlers:
            raise ValueError(f"two policy handlers for type {plugin.type!r}")
        handlers[plugin.type] = plugin
    return handlers


class ScheduledRun:
    """Runs a function on a Schedule with the reactor's clock; never two runs at once."""

    _log = Logger()

    def __init__(self, clock: Any, schedule: Schedule, run: Any, what: str):
        self.clock = clock
        self.schedule = schedule
        self._run = run
        self.what = what
        self.runs = 0
        self._call: Any = None
        self._stopped = False

    def start(self, now: bool) -> ScheduledRun:
        if now:
            self._call = self.clock.callLater(0, self._fire)
        else:
            self._plan()
        return self

    def _plan(self) -> None:
        if self._stopped:
            return
        at = self.schedule.next_after(self.clock.seconds())
        self._call = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._fire)

    def _fire(self) -> None:
        self._call = None
        self.runs += 1
        d = maybeDeferred(self._run)
        d.addErrback(
            lambda f: self._log.failure("scheduled run of {what} failed", f, what=self.what)
        )
        d.addBoth(lambda _: self._plan())

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@implementer(IPolicyContext)
@attrs.define
class PolicyContext:
    """One policy version's view of the agent."""

    policy: str
    version: int
    restored: bool
    reactor: Any
    state_dir: Any
    _engine: PolicyEngine

    def schedule(self, spec: dict, run: Any, now: bool = False) -> ScheduledRun:
        try:
            schedule = Schedule.parse(spec)
        except ScheduleError as e:
            raise ActionFailed(f"bad schedule: {e}") from None
        return ScheduledRun(self.reactor, schedule, run, f"policy {self.policy}").start(now)

    def run_action(self, name: str, args: dict) -> Deferred:
        return self._engine.agent.run_action(name, args)

    def report(self, result: dict | None = None, error: str | None = None) -> Deferred:
        return self._engine.run_reported(self.policy, self.version, result, error)

    def set_agent_settings(self, settings: dict) -> None:
        self._engine.agent.set_agent_settings(settings)


@implementer(ISessionObserver)
class PolicyEngine:
    """The agent's policies: stored, applied, fetched and reported through `api`; what
    they run, they run through `agent` (`IPolicyAgent`)."""

    _log = Logger()

    def __init__(
        self,
        handlers: dict[str, Any],
        state_dir: str,
        api: IAgentAPI,
        reactor: Any,
        agent: IPolicyAgent,
    ):
        self.handlers = handlers
        self.state_dir = state_dir
        self._api = api
        self.reactor = reactor
        self.agent = agent
        self.path = os.path.join(state_dir, "policies.json")
        self.policies: dict[str, dict[str, Any]] = {}  # name -> {name, type, version, document}
        self.applied: dict[str, Any] = {}  # name -> IAppliedPolicy
        self.status: dict[str, dict[str, Any]] = {}  # name -> {version, state, error, at, ...}
        self.fetches = 0
        self._fetching: Deferred | None = None
        self._again = False
        self._again_all = False
        self._reported: dict[str, tuple[Any, Any]] = {}  # name -> (version, state) acknowledged

    # -- stored --------------------------------------------------------------------------
    def restore(self) -> None:
        """At start: apply the policies stored by an earlier run (they run offline too)."""
        try:
            with open(self.path, "rb") as f:
                stored = json.load(f)
        except FileNotFoundError:
            return
        except ValueError as e:
            self._log.warn("ignoring unreadable {path}: {e}", path=self.path, e=e)
            return
        for policy in stored.get("policies", []) if isinstance(stored, dict) else []:
            if not (
                isinstance(policy, dict)
                and isinstance(policy.get("name"), str)
                and isinstance(policy.get("type"), str)
                and isinstance(policy.get("version"), int)
            ):
                self._log.warn("ignoring a malformed stored policy: {p!r}", p=policy)
                continue
            self.policies[policy["name"]] = policy
            self._apply(policy, restored=True)

    def _save(self) -> None:
        body = {"policies": sorted(self.policies.values(), key=lambda p: p["name"])}
        pki.write_public(self.path, json.dumps(body, indent=1).encode())

    # -- applying ------------------------------------------------------------------------
    def _apply(self, policy: dict[str, Any], restored: bool) -> Deferred:
        name, version = policy["name"], policy["version"]
        handler = self.handlers.get(policy["type"])
        if handler is None:
            return self._set(
                name, version, FAILED, f"no handler for policy type {policy['type']!r}"
            )
        if not policy.get("document"):
            return self._set(name, version, APPLIED, None)  # an empty policy: nothing to do
        try:
            validator_for(handler)(policy["document"])  # compiled once per handler
        except fastjsonschema.JsonSchemaValueException as e:
            return self._set(name, version, FAILED, f"invalid document: {e.message}")
        ctx = PolicyContext(name, version, restored, self.reactor, FilePath(self.state_dir), self)
        d = maybeDeferred(handler.apply, ctx, policy["document"])

        def applied(running: Any) -> None:
            if running is not None and not IAppliedPolicy.providedBy(running):
                self._set(name, version, FAILED, f"handler returned {running!r}, not a policy")
                return
            if running is not None:
                self.applied[name] = running
            self._set(name, version, APPLIED, None)

        def failed(f: Any) -> None:
            why = f.value.reason if f.check(ActionFailed) else f.getErrorMessage()
            if not f.check(ActionFailed):
                self._log.failure("policy {name} failed to apply", f, name=name)
            self._set(name, version, FAILED, why)

        return d.addCallbacks(applied, failed)

    def _set(self, name: str, version: int, state: str, error: str | None) -> Deferred:
        previous = self.status.get(name, {})
        entry = {
            "version": version,
            "state": state,
            "error": error,
            "at": self.reactor.seconds(),
        }
        if "last_run" in previous and previous.get("version") == version:
            entry["last_run"] = previous["last_run"]
        self.status[name] = entry
        self._log.info(
            "policy {name} v{version} {state}{why}",
            name=name,
            version=version,
            state=state,
            why=f": {error}" if error else "",
        )
        return succeed(None)

    def _stop(self, name: str) -> Deferred:
        running = self.applied.pop(name, None)
        if running is None:
            return succeed(None)
        return maybeDeferred(running.stop).addErrback(
            lambda f: self._log.failure("stopping policy {name} failed", f, name=name)
        )

    @inlineCallbacks
    def reconcile(self, policies: list[dict[str, Any]]):
        """Bring the policies in force to what the server says applies; returns the report."""
        wanted = {p["name"]: p for p in policies}
        report: dict[str, dict[str, Any]] = {}
        for name in sorted(set(self.policies) - set(wanted)):
            yield self._stop(name)
            old = self.policies.pop(name)
            self.status.pop(name, None)
            report[name] = {"version": old["version"], "state": REMOVED, "error": None}
        for name, policy in sorted(wanted.items()):
            current = self.policies.get(name)
            if (
                current is not None
                and current["version"] == policy["version"]
                and (current["type"] == policy["type"])
            ):
                report[name] = self.status.get(name) or {"version": policy["version"]}
                continue
            yield self._stop(name)
            self.policies[name] = policy
            yield self._apply(policy, restored=False)
            report[name] = self.status[name]
        self._save()
        return report

    # -- when to fetch: told by the agent's connection and by the server -----------------
    def session_opened(self, welcome: dict[str, Any]) -> None:
        # a welcome saying the server has no policies spares the fetch when the agent has
        # none either (a reconnect storm on a server without policies costs nothing more)
        if not (welcome.get("policy_count") == 0 and not self.policies):
            self.fetch("session start")

    def session_lost(self, reason: str, switched_off: bool) -> None:
        """Policies stay in force without a session (they run offline too)."""

    def polling_started(self) -> None:
        self.fetch("HTTP mode")

    def notified(self, data: dict[str, Any]) -> None:
        what = data.get("name") or "policies"
        self.fetch(f"the server notified a change of {what}", report_all=True)

    # -- talking to the server ---------------------------------------------------------------
    def fetch(self, why: str, report_all: bool = False) -> Deferred:
        """Fetch what applies and reconcile; a fetch asked for while one runs runs after it.

        Reported are the policies whose version or state the server has not acknowledged
        yet; with `report_all` (the server notified: perhaps a PushPolicy waiting for this
        agent's answer) every policy."""
        if self._fetching is not None:
            self._again = True
            self._again_all = self._again_all or report_all
            return self._fetching
        self._log.info("fetching policies ({why})", why=why)
        self.fetches += 1
        d = self._api.call("GET", "/agent/v1/policies")

        def got(response: Any) -> Any:
            if response.status != 200:
                raise ActionFailed(f"policies answered {response.status}: {response.body}")
            return self.reconcile(list((response.body or {}).get("policies", [])))

        def send(report: dict[str, Any]) -> Any:
            if not report_all:
                report = {
                    name: entry
                    for name, entry in report.items()
                    if self._reported.get(name) != _key(entry)
                }
            if not report:
                return None
            d = self._api.call("POST", "/agent/v1/policies/status", {"policies": report})

            def acknowledged(response: Any) -> None:
                if response.status == 200:
                    for name, entry in report.items():
                        if entry.get("state") == REMOVED:
                            self._reported.pop(name, None)
                        else:
                            self._reported[name] = _key(entry)

            return d.addCallback(acknowledged)

        def done(result: Any) -> Any:
            self._fetching = None
            if self._again:
                again_all, self._again, self._again_all = self._again_all, False, False
                self.fetch("changed while fetching", again_all)
            return result

        d.addCallback(got)
        d.addCallback(send)
        d.addErrback(
            lambda f: self._log.warn("policy fetch failed: {why}", why=f.getErrorMessage())
        )
        d.addBoth(done)
        self._fetching = d
        return d

    def run_reported(
        self, name: str, version: int, result: dict | None, error: str | None
    ) -> Deferred:
        """A handler reports one run: keep it, and send it to the server (best effort);
        fires with the server's answer, or None when it was not delivered."""
        entry = self.status.get(name)
        if entry is None or entry.get("version") != version:
            return succeed(None)
        entry["last_run"] = {
            "at": self.reactor.seconds(),
            "ok": error is None,
            "error": error,
            "result": result,
        }
        d = self._api.call("POST", "/agent/v1/policies/status", {"policies": {name: dict(entry)}})
        d.addErrback(
            lambda f: self._log.info(
                "run report of policy {name} not delivered: {why}",
                name=name,
                why=f.getErrorMessage(),
            )
        )
        return d

    def stop_all(self) -> None:
        for name in list(self.applied):
            self._stop(name)
