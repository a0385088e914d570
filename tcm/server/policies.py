"""Policies: documents of a policy type applied by the agents in their targets.

Stored in the store's config area and kept in memory (a few hundred at most); an agent
fetches the policies that apply to it and reports what it runs; PushPolicy delivers a
version now and waits for each agent's report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import fastjsonschema
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import IEventPublisher, IPolicies
from tcm.schedule import Cron, ScheduleError
from tcm.server import inventory
from tcm.server.agentconfig import (
    DEFAULT_PUSH_WAIT,
    EMPTY,
    FAILED,
    NAME,
    NOT_CONNECTED,
    PUSHED,
    AgentConfigBook,
    check_fields,
    check_name,
    policy_types_on_server,
)
from tcm.server.errors import Conflict, Invalid, NotFound
from tcm.server.events import NO_EVENTS, policy_event

# PushPolicy with wait 0: notified over its session or poll, its report not awaited.
SENT = "sent"


@implementer(IPolicies)
class PolicyService:
    """Policies: storage, resolution to agents, PushPolicy, agents' reports."""

    _log = Logger()
    events: IEventPublisher = NO_EVENTS  # the console's live events (set where wired)

    def __init__(
        self,
        book: AgentConfigBook,
        config_store: Any,
        inventory_store: Any,
        clock: Any,
        policy_handlers: dict[str, Any] | None = None,
        known_digests: inventory.KnownDigests | None = None,
        max_class_bytes: int = inventory.DEFAULT_MAX_CLASS_BYTES,
    ):
        self.book = book
        # what the store holds of each agent's inventory (shared with the jobs): told back to
        # an agent after its scheduled collection, so its next run sends only what changed
        self.known_digests = inventory.KnownDigests() if known_digests is None else known_digests
        self.max_class_bytes = max_class_bytes
        self.store = config_store
        self.inventory_store = inventory_store
        self.clock = clock
        self.policy_handlers = (
            policy_handlers if policy_handlers is not None else policy_types_on_server()
        )
        self._validators: dict[str, Any] = {}
        self.agent_policy_types: dict[str, frozenset[str]] = {}  # agent -> types from its hello
        self._type_sets: dict[frozenset[str], frozenset[str]] = {}  # one shared set per kind
        self.policies: dict[str, dict[str, Any]] = {}
        self._waiters: dict[tuple[str, str], list[tuple[int, Deferred]]] = {}
        # nodes of a cluster (tcm/server/cluster): which agents other nodes hold, telling the
        # other nodes to notify theirs, and each report stored here (for waits elsewhere)
        self.elsewhere: Callable[[list[str]], Deferred] | None = None
        self.on_push: Callable[[], None] | None = None
        self.on_report: Callable[[dict[str, Any]], None] | None = None

    @inlineCallbacks
    def load(self):
        self.policies = {p["name"]: p for p in (yield self.store.load_policies())}

    def members(self, targets: Iterable[str], since: float | None = None) -> Deferred:
        """Agent ids in any of the targets."""
        return self.book.members(targets, since)

    def running(self, agent_id: str) -> dict[str, Any]:
        """What an agent last reported it runs (for the admin's agent view)."""
        return self.book.running(agent_id)

    def notices_for(self, agent_id: str) -> list[dict[str, Any]]:
        """Notifications an agent missed between polls (policies and profile)."""
        return self.book.notices_for(agent_id)

    def session_opened(self, agent_id: str, hello: dict[str, Any]) -> None:
        """An agent's session opened: nothing is pending; the policy types it knows."""
        self.book.session_opened(agent_id)
        types = hello.get("policy_types")
        if isinstance(types, list):
            kind = frozenset(t for t in types if isinstance(t, str))
            if len(self._type_sets) > 1024:  # agents of many versions: stay bounded
                self._type_sets.clear()
            # most agents know the same types: they share one set
            self.agent_policy_types[agent_id] = self._type_sets.setdefault(kind, kind)

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
        check_fields(body, "policy", {"name", "type", "document", "targets"})
        name = check_name("policy", body.get("name"))
        if name in self.policies:
            raise Conflict(f"policy {name} exists; use update")
        self.check_document(body.get("type"), body.get("document", {}))
        targets = yield self.book.check_targets(body.get("targets", []))
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
            targets = yield self.book.check_targets(body["targets"])
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
        agents = yield self.book.members(targets)
        self.book.notify(agents, "policies", version, name)

    @inlineCallbacks
    def policies_for(self, agent_id: str):
        """The policies that apply to one agent (what GET /agent/v1/policies answers)."""
        out = []
        since = self.book.since_for(agent_id)
        for policy in sorted(self.policies.values(), key=lambda p: p["name"]):
            if agent_id in (yield self.book.members(policy["targets"], since)):
                out.append({k: policy[k] for k in ("name", "type", "version", "document")})
        self.book.pending.get(agent_id, set()).discard("policies")
        return out

    @inlineCallbacks
    def push(self, name: str, wait: float = DEFAULT_PUSH_WAIT):
        """PushPolicy: deliver a policy to its agents now; per agent `pushed` (applied there),
        `not connected`, `empty policy` or `failed` (with the agent's reason). With `wait` 0
        nothing is awaited: each notified agent is `sent`."""
        policy = self.get_policy(name)
        agents = sorted((yield self.book.members(policy["targets"])))
        version = policy["version"]
        results: dict[str, dict[str, Any]] = {}
        if not policy["document"]:
            for agent_id in agents:
                results[agent_id] = {"status": EMPTY, "reason": "the policy document is empty"}
            return {"policy": name, "version": version, "agents": results}
        if wait <= 0:
            sent, offline = self.book.notify(agents, "policies", version, name)
            for agent_id in sent:
                results[agent_id] = {
                    "status": SENT,
                    "reason": "notified; its report was not awaited (wait 0)",
                }
            for agent_id in offline:
                results[agent_id] = {
                    "status": NOT_CONNECTED,
                    "reason": "no session and no waiting poll; it gets the policy when it returns",
                }
            return {"policy": name, "version": version, "agents": dict(sorted(results.items()))}
        waits = {a: self._wait_report(a, name, version, wait) for a in agents}
        sent, offline = self.book.notify(agents, "policies", version, name)
        if offline and self.elsewhere is not None:
            # sessions on other nodes: those nodes notify them, their reports come as events
            held = yield self.elsewhere(offline)
            if held and self.on_push is not None:
                self.on_push()
            sent = sorted([*sent, *(a for a in offline if a in held)])
            offline = [a for a in offline if a not in held]
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

    def report_policies(self, agent_id: str, reports: Any) -> Any:
        """An agent says which policies it runs: {name: {version, state, error, at, last_run}}.
        Answers {"stored": n}, and after a scheduled inventory collection (once it is stored)
        with `inventory_known` too: the digests the server holds for the agent's next run."""
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
        row = self.book.row(agent_id)
        merged = dict(row.get("policies") or {})
        stored_inventory: list[Deferred] = []
        for name, report in reports.items():
            report, storing = self._keep_inventory(agent_id, name, report)
            if storing is not None:
                stored_inventory.append(storing)
            if report["state"] == "removed":
                merged.pop(name, None)
            else:
                merged[name] = {**merged.get(name, {}), **report}
            self.events.publish(
                policy_event(
                    agent_id,
                    name,
                    state=report["state"],
                    version=report["version"],
                    error=(report.get("error") or None),
                )
            )
            self._report_heard(agent_id, name, report)
        if self.on_report is not None:
            self.on_report({"type": "policy.report", "agent": agent_id, "reports": reports})
        row["policies"] = merged
        row["reported_at"] = self.clock.seconds()
        self.book.agent_store.set_agent_config(
            agent_id, policies=merged, reported_at=row["reported_at"]
        )
        answer: dict[str, Any] = {"stored": len(reports)}
        if not stored_inventory:
            return answer
        # After a scheduled collection: once it is stored, tell the agent the digests the
        # server now holds, the `known` of its next run (issue 18: deltas by default).
        known = self.known_digests

        def told(_: Any) -> dict[str, Any]:
            return {**answer, "inventory_known": known.known(agent_id)}

        return gatherResults(stored_inventory).addCallback(told)

    def _report_heard(self, agent_id: str, name: str, report: dict[str, Any]) -> None:
        for version, d in self._waiters.pop((agent_id, name), []):
            if report.get("version", -1) >= version or report.get("state") == "removed":
                d.callback(report)
            else:
                self._waiters.setdefault((agent_id, name), []).append((version, d))

    def reports_elsewhere(self, event: dict[str, Any]) -> None:
        """An agent's policy report stored by another node of the cluster: a PushPolicy
        waiting here for it is answered."""
        reports = event.get("reports")
        if not isinstance(reports, dict):
            return
        for name, report in reports.items():
            if isinstance(report, dict):
                self._report_heard(str(event.get("agent")), str(name), report)

    def _keep_inventory(
        self, agent_id: str, name: str, report: dict[str, Any]
    ) -> tuple[dict[str, Any], Deferred | None]:
        """An inventory.schedule run's result goes where inventory.collect jobs' results go
        (the per-class inventory store, once); the policy keeps which classes changed and
        their digests. Returns the report to keep and the Deferred of the store's write."""
        policy = self.policies.get(name)
        run = report.get("last_run")
        if policy is None or policy["type"] != "inventory.schedule" or not isinstance(run, dict):
            return report, None
        result = run.get("result")
        if not run.get("ok") or not isinstance(result, dict):
            return report, None
        now = self.clock.seconds()
        collected = inventory.read_result(
            result,
            now,
            self.max_class_bytes,
            inventory.CLASSES,
            self.known_digests.known(agent_id),
        )
        if collected is None:
            return report, None
        known = self.known_digests

        def stored(missing: Any) -> None:
            known.stored(agent_id, collected)
            for cls in missing or ():
                known.forget(agent_id, cls)

        def failed(f: Any) -> None:
            self._log.failure("storing inventory of {agent}", f, agent=agent_id)

        d = self.inventory_store.store_inventory(agent_id, collected, now)
        d.addCallbacks(stored, failed)
        kept = {
            "classes": sorted(collected.changed),
            "inventory": collected.summary(),
        }
        run = {**run, "result": kept}
        problem = collected.problem()
        if problem is not None:
            run = {**run, "error": problem}
        return {**report, "last_run": run}, d
