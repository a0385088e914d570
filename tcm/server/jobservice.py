"""JobService: creates jobs, delivers them, and records what agents report.

Glue between the pure JobBook (jobs.py), the Store and the Dispatcher. Every push of a job,
to a live session or to a poller, goes through `Dispatcher.push`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import jsonschema_rs
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tcm.interfaces import IEventPublisher, IJobs
from tcm.process import MemoryReleaser
from tcm.protocol.envelope import Envelope, encode
from tcm.server import inventory
from tcm.server.dispatcher import Dispatcher
from tcm.server.errors import Conflict, Forbidden, Invalid, NotFound, TooLarge
from tcm.server.events import NO_EVENTS, finished_event, job_event, output_event, target_event
from tcm.server.jobs import (
    DEFAULT_MAX_OUTPUT,
    NOT_CONNECTED,
    TERMINAL,
    Accept,
    Change,
    Job,
    JobBook,
    OutputAllowance,
    TargetState,
    output_admitted,
    summarize,
)

TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)

MAX_TTL = 30 * 24 * 3600.0
# A job's status shows the inventory its targets collected up to this many bytes of data;
# past it, each class left out is named in its target's `omitted` (read it per agent with
# `tcm inventory show`): a status of 10,000 package lists is not built in memory.
SHOWN_INVENTORY_BYTES = 64 * 1024 * 1024
DEFAULT_TTL = 3600.0


_STATES = {s.value: s for s in TargetState}  # a target state by its name


@implementer(IJobs)
class JobService:
    """Jobs from creation to stored results."""

    _log = Logger()
    events: IEventPublisher = NO_EVENTS  # the console's live events (set where wired)

    def __init__(
        self,
        job_store: Any,
        dispatcher: Dispatcher,
        clock: Any,
        capabilities_of: Callable[[str], dict[str, Any] | None],
        known_agents: Callable[[], list[str]],
        inventory_store: Any,
        advertised: Callable[[str], dict[str, Any] | None] | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_message_size: int | None = None,
        known_digests: inventory.KnownDigests | None = None,
        max_class_bytes: int = inventory.DEFAULT_MAX_CLASS_BYTES,
        shared: bool = False,
    ):
        # the store's jobs area (db.jobs) and its inventory area (db.inventory: results of
        # inventory.collect)
        self.store = job_store
        self.inventory_store = inventory_store
        self.dispatcher = dispatcher
        self.clock = clock
        self.book = JobBook()
        self._capabilities_of = capabilities_of
        self._known_agents = known_agents
        # what each enrolled agent advertised last, live or stored (None: never said)
        self._advertised = advertised or capabilities_of
        self._validators: dict[str, Any] = {}  # canonical schema JSON -> compiled validator
        self._committing: dict[tuple[str, str], Deferred] = {}  # results not yet committed
        self._output_waiters: dict[str, list[Deferred]] = {}  # job -> followers waiting
        self._expiry = LoopingCall(self.expire)
        # output: a cap per target; jobs loaded at startup may have output stored already
        self.outputs = OutputAllowance(max_output)
        self._loaded_jobs: set[str] = set()
        # the sessions' message limit: a larger action.request could never be delivered
        self.max_message_size = max_message_size
        self._expiry.clock = clock
        # the inventory digests the store holds per agent: every inventory.collect request
        # carries its agent's, so that only what changed comes back (issue 18)
        self.known_digests = inventory.KnownDigests() if known_digests is None else known_digests
        self.max_class_bytes = max_class_bytes
        # large results are parsed, stored and dropped; afterwards the memory they took is
        # given back to the system (glibc keeps it otherwise: RSS would stay at the peak)
        self.memory = MemoryReleaser(clock)
        # Nodes of a cluster share the store (tcm/server/cluster): accept decisions are a
        # compare-and-set in SQL, and a job this node does not know is read from the store.
        self.shared = shared
        # told of each job committed here (the cluster sends it to the other nodes), and of
        # each result committed here (the cluster's events)
        self.on_created: Callable[[str, list[str]], None] | None = None
        self.on_stored: Callable[[dict[str, Any]], None] | None = None
        self.on_canceled: Callable[[str, list[str]], None] | None = None
        self._opened: set[str] = set()  # sessions opened, not asked of the store yet
        self._opened_call: Any = None

    @inlineCallbacks
    def load(self):
        """Rebuild the working set from the store (at startup)."""
        active = yield self.store.load_active()
        for row, states in active:
            job = _job_of(row)
            self.book.add(job, {a: TargetState(s) for a, s in states.items()})
            self._loaded_jobs.add(job.id)
        self._log.info("loaded {n} unfinished jobs", n=len(self.book.jobs))
        held = yield self.inventory_store.inventory_times()
        self.known_digests.load({key: value[1] for key, value in held.items()})

    def start(self, interval: float = 1.0) -> None:
        self._expiry.start(interval, now=False)

    def stop(self) -> None:
        if self._expiry.running:
            self._expiry.stop()
        self.memory.stop()

    # -- admin side ------------------------------------------------------------------
    @inlineCallbacks
    def create(
        self,
        action: str,
        args: dict[str, Any],
        targets: list[str] | str,
        ttl: float | None,
        timeout: float | None,
        created_by: str = "",
    ):
        """Create a job, store it, push it to the targets online now. Returns the job id."""
        now = self.clock.seconds()
        ttl = DEFAULT_TTL if ttl is None else ttl
        if not 0 < ttl <= MAX_TTL:
            raise Invalid("ttl", f"ttl must be in (0, {MAX_TTL:.0f}] seconds")
        if timeout is not None and timeout <= 0:
            raise Invalid("timeout", "timeout must be positive")
        known = self._known_agents()
        if targets == "all":
            agent_ids = sorted(known)
        else:
            agent_ids = sorted(set(targets))
            unknown = sorted(set(agent_ids) - set(known))
            if unknown:
                shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
                raise Invalid("targets", f"unknown agent ids: {shown}", unknown=unknown[:50])
        unsupported = self._check_action(action, args, agent_ids, known)
        job = Job(
            id=os.urandom(8).hex(),
            action=action,
            args=args,
            created_at=now,
            expires_at=now + ttl,
            timeout=timeout,
            created_by=created_by,
        )
        try:
            frame = job.frame()  # encodable, or nothing is stored
        except (TypeError, ValueError) as e:
            raise Invalid("args", f"job cannot be encoded: {e}") from None
        if self.max_message_size is not None and len(frame) > self.max_message_size:
            raise TooLarge(
                f"the job's request is {len(frame)} bytes, over the {self.max_message_size}"
                " bytes agents' sessions accept (--max-message-size)",
                size=len(frame),
                limit=self.max_message_size,
            )
        yield self.store.create_job(
            dict(
                id=job.id,
                action=action,
                args=args,
                created_at=now,
                expires_at=job.expires_at,
                timeout=timeout,
                created_by=created_by,
            ),
            agent_ids,
            now,
        )
        self.book.add(job, {a: TargetState.PENDING for a in agent_ids})
        self.events.publish(
            job_event(job.id, action=action, total=len(agent_ids), created_at=now, by=created_by)
        )
        # Agents known to lack the handler end at once, never queued nor sent.
        ended = [
            self._finish(
                job.id,
                agent_id,
                TargetState.UNSUPPORTED,
                None,
                f"agent has no handler for action {action!r}",
                None,
                now,
            )
            for agent_id in unsupported
        ]
        if ended:
            yield gatherResults(ended)
        self._deliver(job, [a for a in agent_ids if a not in unsupported])
        if self.on_created is not None:
            self.on_created(job.id, [a for a in agent_ids if a not in unsupported])
        self._log.info(
            "job {job} ({action}) created for {n} agents",
            job=job.id,
            action=action,
            n=len(agent_ids),
        )
        return job.id

    def _check_action(
        self, action: str, args: dict[str, Any], agent_ids: list[str], known: list[str]
    ) -> set[str]:
        """Refuse a job no enrolled agent can run, or whose arguments fail the schema its
        targets' handlers advertise; return the targets known to lack the handler.

        Agents that never advertised their handlers (not connected since they enrolled)
        neither refuse a job nor are skipped; agents of older versions advertise no schema,
        so their arguments are checked by the agent."""
        everyone = {a: self._advertised(a) for a in known}
        advertised = {a: caps for a, caps in everyone.items() if caps is not None}
        if advertised and not any(action in caps for caps in advertised.values()):
            names = sorted({name for caps in advertised.values() for name in caps})
            raise Invalid(
                "action",
                f"no enrolled agent has action {action!r}; known actions: {', '.join(names)}",
                known=names,
            )
        unsupported = set()
        # by identity first: sessions share equal capabilities (interned), so ten thousand
        # targets usually hold one schema object, encoded once here rather than per target
        held: dict[int, Any] = {}
        for agent_id in agent_ids:
            caps = everyone.get(agent_id)
            if caps is None:
                continue
            capability = caps.get(action)
            if capability is None:
                unsupported.add(agent_id)
            elif isinstance(capability.get("schema"), dict):
                schema = capability["schema"]
                held.setdefault(id(schema), schema)
        schemas = {json.dumps(schema, sort_keys=True): schema for schema in held.values()}
        for key, schema in schemas.items():
            problem = self._args_problem(key, schema, args)
            if problem is not None:
                raise Invalid("args", f"invalid arguments for {action}: {problem}")
        return unsupported

    def _args_problem(self, key: str, schema: dict[str, Any], args: dict[str, Any]) -> str | None:
        """The schema's message about `args` (naming the field), or None when they fit.

        The schema comes from agents (their `hello`): it is interpreted (jsonschema-rs, draft
        7, as the agent's own check), never compiled into code here, and its patterns run on
        a regex engine without catastrophic backtracking."""
        validator = self._validators.get(key)
        if validator is None:
            try:
                validator = jsonschema_rs.Draft7Validator(schema)
            except (jsonschema_rs.ValidationError, ValueError, TypeError) as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                self._log.warn("an advertised argument schema is not valid: {e}", e=why)
                return None  # the agent checks the arguments itself
            if len(self._validators) > 1000:  # versions come and go: stay bounded
                self._validators.clear()
            self._validators[key] = validator
        try:
            validator.validate(args)
        except jsonschema_rs.ValidationError as e:
            where = "".join(
                f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.instance_path
            ).lstrip(".")
            return f"{where or 'arguments'}: {e.message}"
        return None

    def actions(self) -> list[dict[str, Any]]:
        """What the enrolled agents advertise: each action, how many agents have it, whether
        it is a task, and its argument schema (the newest seen)."""
        out: dict[str, dict[str, Any]] = {}
        for agent_id in self._known_agents():
            caps = self._advertised(agent_id)
            for name, capability in (caps or {}).items():
                entry = out.setdefault(
                    name,
                    {"name": name, "agents": 0, "task": False, "streams": False, "schema": None},
                )
                entry["agents"] += 1
                entry["task"] = entry["task"] or bool(capability.get("task"))
                entry["streams"] = entry["streams"] or bool(capability.get("streams"))
                if capability.get("schema") is not None:
                    entry["schema"] = capability["schema"]
        return [out[name] for name in sorted(out)]

    @inlineCallbacks
    def cancel(self, job_id: str, agent_ids: list[str] | None, by: str = ""):
        """Cancel a job's unfinished targets (all, or those of `agent_ids`): those not
        started end `canceled` now and are never delivered; running ones are told to stop
        (their agent reports `canceled`). Returns the two lists of agent ids."""
        known = yield self.store.job_agents(job_id, None)
        if known is None:
            raise NotFound(f"no such job: {job_id}")
        if agent_ids is not None:
            unknown = sorted(set(agent_ids) - set(known))
            if unknown:
                raise Invalid("agents", f"not targets of job {job_id}: {', '.join(unknown[:20])}")
        if self.shared:  # another node may run some: the store's view, not this node's
            loaded = yield self.store.load_job(job_id)
            if loaded is not None:
                self._settle(*loaded)
        now = self.clock.seconds()
        not_started, running = self.book.cancel(job_id, agent_ids, now)
        why = f"canceled by {by}" if by else "canceled"
        ended = [
            self._finish(job_id, a, TargetState.CANCELED, None, why, None, now) for a in not_started
        ]
        if ended:
            yield gatherResults(ended)
        self._send_cancel(job_id, running, why)
        if self.on_canceled is not None:
            self.on_canceled(job_id, running)  # the other nodes tell theirs
        self._log.info(
            "job {job}: {n} targets canceled, {m} running told to stop",
            job=job_id,
            n=len(not_started),
            m=len(running),
        )
        return {"canceled": not_started, "stopping": running}

    @staticmethod
    def _cancel_envelope(job_id: str, reason: str) -> Envelope:
        return Envelope(
            type="action.cancel",
            id=f"cancel-{job_id}",
            data={"job": job_id, "reason": reason[:256]},
        )

    def _send_cancel(self, job_id: str, agent_ids: Iterable[str], reason: str) -> None:
        agent_ids = list(agent_ids)
        if not agent_ids:
            return
        frame = encode(self._cancel_envelope(job_id, reason))
        # Tasks run on the session they came on; the runner is the agent's, so any session
        # reaches it: the task session first, as the job itself went.
        self.dispatcher.push(frame, agent_ids, task=True)

    def _deliver(self, job: Job, agent_ids: list[str]) -> None:
        now = self.clock.seconds()
        capable: list[str] = []
        tasks: list[str] = []
        incapable: list[str] = []
        for agent_id in agent_ids:
            caps = self._capabilities_of(agent_id)
            if caps is None:
                capable.append(agent_id)
            elif job.action in caps:
                (tasks if caps[job.action].get("task") else capable).append(agent_id)
            else:
                incapable.append(agent_id)
        for agent_id in incapable:
            self._finish(
                job.id,
                agent_id,
                TargetState.UNSUPPORTED,
                None,
                f"agent has no handler for action {job.action!r}",
                None,
                now,
            )
        sent: list[str] = []
        for frame, group in self._frames(job, capable):
            sent += self.dispatcher.push(frame, group)[0]
        for frame, group in self._frames(job, tasks):
            sent += self.dispatcher.push(frame, group, task=True)[0]
        self._persist(self.book.delivered(job.id, sent, now))

    def _frames(self, job: Job, agent_ids: list[str]) -> list[tuple[bytes, list[str]]]:
        """The request frame(s) of a job for these agents: one for all, except for an
        inventory collection, whose request carries each agent's known digests (agents
        whose requests come out equal share one frame, and so one push)."""
        if not agent_ids:
            return []
        if job.action != inventory.ACTION:
            return [(job.frame(), agent_ids)]
        groups: dict[str, tuple[Job, list[str]]] = {}
        for agent_id in agent_ids:
            own = self._for_agent(job, agent_id)
            key = json.dumps(own.args.get("known"), sort_keys=True)
            groups.setdefault(key, (own, []))[1].append(agent_id)
        return [(own.frame(), group) for own, group in groups.values()]

    def _for_agent(self, job: Job, agent_id: str) -> Job:
        """The job as one agent receives it: an inventory collection with its known digests."""
        if job.action != inventory.ACTION:
            return job
        args = inventory.collect_args(job.args, self.known_digests.known(agent_id))
        return job if args == job.args else attrs.evolve(job, args=args)

    # -- agent side ------------------------------------------------------------------
    def session_opened(self, agent_id: str, channel: str = "core") -> None:
        """An agent has a live session: (re)send what it has not finished. A task session
        (through a task server) gets the unfinished tasks that are not running yet.

        Sharing the store with other nodes, the store is asked too (for the agents whose
        sessions opened in the same quarter second at once): a job another node created that
        this one has not heard of yet (the bus lost its message) is sent all the same."""
        if self.shared and channel == "core":
            self._ask_store_for(agent_id)
        now = self.clock.seconds()
        canceled = self.book.cancel_asked(agent_id)
        for job_id in canceled:  # canceled while it was away: tell it again
            self._send_cancel(job_id, [agent_id], "canceled")
        for job in self.book.deliverable(agent_id, now):
            if job.id in canceled:
                continue
            if channel == "task":
                caps = self._capabilities_of(agent_id) or {}
                if not caps.get(job.action, {}).get("task"):
                    continue
            self._deliver(job, [agent_id])

    OPENED_BATCH = 0.25  # seconds of session openings asked of the store in one query

    def _ask_store_for(self, agent_id: str) -> None:
        self._opened.add(agent_id)
        if self._opened_call is None:
            self._opened_call = self.clock.callLater(self.OPENED_BATCH, self._ask_store)

    def _ask_store(self) -> Deferred[int]:
        agents, self._opened, self._opened_call = sorted(self._opened), set(), None

        @inlineCallbacks
        def unknown_jobs(job_ids: set[str]):
            sent = 0
            for job_id in sorted(job_ids - set(self.book.jobs)):
                sent += yield self.adopt(job_id, agents, again=True)
            return sent

        d = self.store.unfinished_jobs_of(agents).addCallback(unknown_jobs)
        d.addErrback(lambda f: self._log.failure("reading the jobs of opened sessions", f))
        return d

    def cancels_for(self, agent_id: str) -> list[dict[str, Any]]:
        """`action.cancel` envelopes (as objects) for an agent that polls over HTTP: its
        running jobs an operator canceled."""
        return [
            self._cancel_envelope(job_id, "canceled").to_dict()
            for job_id in self.book.cancel_asked(agent_id)
        ]

    def work_for(self, agent_id: str) -> list[Job]:
        """Jobs for an agent that polls over HTTP (marked delivered)."""
        now = self.clock.seconds()
        canceled = set(self.book.cancel_asked(agent_id))
        jobs = [j for j in self.book.deliverable(agent_id, now) if j.id not in canceled]
        for job in jobs:
            self._persist(self.book.delivered(job.id, [agent_id], now))
        return [self._for_agent(job, agent_id) for job in jobs]

    def accept(self, agent_id: str, job_id: str) -> Accept | Deferred[Accept]:
        """Whether the agent may start the job. Alone, the working set decides; sharing the
        store with other nodes, one SQL compare-and-set does (a Deferred)."""
        if self.shared:
            return self._claim(agent_id, job_id)
        decision, changes = self.book.accept(job_id, agent_id, self.clock.seconds())
        self._persist(changes)
        return decision

    def _claim(self, agent_id: str, job_id: str) -> Deferred[Accept]:
        now = self.clock.seconds()

        def decided(state: str) -> Accept:
            job = self.book.jobs.get(job_id)
            if state == "running":
                if job is not None and self.book.state(job_id, agent_id) is not None:
                    self.book.accept(job_id, agent_id, now)  # the store has the change
                return Accept.RUN
            if job is not None:  # finished (or expired) in the store: not tracked here
                others = self.book.active_targets(job_id)
                others.pop(agent_id, None)
                self.book.settle(job, others)
            if state == "expired":
                return Accept.EXPIRED
            if state in TERMINAL_VALUES:
                return Accept.FINISHED
            return Accept.UNKNOWN

        return self.store.claim_target(job_id, agent_id, now).addCallback(decided)

    # -- nodes sharing the store (tcm/server/cluster) ----------------------------------
    @inlineCallbacks
    def adopt(self, job_id: str, recipients: Iterable[str] = (), again: bool = False):
        """A job another node committed (or changed): take the store's view of it into the
        working set, and push it to its targets whose sessions are here. Fires with how
        many were sent it."""
        loaded = yield self.store.load_job(job_id)
        if loaded is None:
            return 0
        self._settle(*loaded)
        return self._deliver_here(job_id, recipients, again)

    @inlineCallbacks
    def resync(self, keep_younger: float = 60.0):
        """Take the store's view of every unfinished job (the bus may have lost messages, or
        another node died), and push what waits to the agents whose sessions are here. Jobs
        tracked here that the store has finished are dropped, unless created in the last
        `keep_younger` seconds (a read that began before their commit). Fires with how many
        targets were sent."""
        active = yield self.store.load_active()
        seen = set()
        for row, states in active:
            self._settle(row, states)
            seen.add(row["id"])
        now = self.clock.seconds()
        for job_id, job in list(self.book.jobs.items()):
            if job_id not in seen and now - job.created_at > keep_younger:
                self.book.settle(job, {})
        return sum(self._deliver_here(job_id, ()) for job_id in list(self.book.jobs))

    @inlineCallbacks
    def cancel_here(self, job_id: str, agent_ids: list[str]):
        """Another node canceled a job whose running targets include these agents: those
        whose sessions are here are told to stop (again at their next session here)."""
        loaded = yield self.store.load_job(job_id)
        if loaded is None:
            return []
        self._settle(*loaded)
        running = [a for a in agent_ids if self.book.state(job_id, a) is TargetState.RUNNING]
        self.book.cancel(job_id, running, self.clock.seconds())
        here = [a for a in running if self.dispatcher.is_reachable(a)]
        self._send_cancel(job_id, here, "canceled")
        return here

    def _settle(self, row: dict[str, Any], states: dict[str, str]) -> None:
        job = self.book.jobs.get(row["id"]) or _job_of(row)
        unfinished = {
            a: TargetState(s) for a, s in states.items() if (job.id, a) not in self._committing
        }
        self.book.settle(job, unfinished)
        self._loaded_jobs.add(job.id)

    def _deliver_here(self, job_id: str, recipients: Iterable[str], again: bool = False) -> int:
        """Push a job to its pending targets that have a session here: those another node
        listed, and any that came here meanwhile. `again`: the recipients' delivered and
        running targets too (their sessions just opened here, after another node sent it)."""
        job = self.book.jobs.get(job_id)
        if job is None:
            return 0
        pending = set(self.book.not_started(job_id))
        if job.is_expired(self.clock.seconds()):
            pending = set()
        wanted = pending & set(recipients)
        if again:
            wanted |= set(self.book.active_targets(job_id)) & set(recipients)
        wanted |= {a for a in pending if self.dispatcher.is_reachable(a)}
        if not wanted:
            return 0
        before = self.dispatcher.pushed
        self._deliver(job, sorted(wanted))
        return self.dispatcher.pushed - before

    # -- output (issue 16.1): only from a current target, capped per target --------------
    def output(
        self, agent_id: str, job_id: str, seq: int, stream: str, text: str, adopted: bool = False
    ) -> Deferred:
        """Store a chunk of a target's output. Only the agent of a target that runs it (or
        was sent it, for a quick action) may send output: otherwise NotFound (no such job),
        Forbidden (not this agent's job) or Conflict (not running here). What passes the
        cap is dropped, with one marker line."""
        job = self.book.jobs.get(job_id)
        state = self.book.state(job_id, agent_id)
        if self.shared and state in (None, TargetState.PENDING) and not adopted:
            # another node accepted it, or this one has not heard of it: the store's view
            d = self.store.load_job(job_id)
            d.addCallback(lambda loaded: self._settle(*loaded) if loaded else None)
            return d.addCallback(
                lambda _: self.output(agent_id, job_id, seq, stream, text, adopted=True)
            )
        if job is None or not output_admitted(state, self._quick(agent_id, job.action)):
            return self._refuse_output(agent_id, job_id)
        if job_id in self._loaded_jobs and not self.outputs.known(job_id, agent_id):
            d = self.store.output_bytes(job_id, agent_id)  # stored before a restart
            d.addCallback(lambda n: self.outputs.resume(job_id, agent_id, n))
            return d.addCallback(lambda _: self._store_output(agent_id, job_id, seq, stream, text))
        return self._store_output(agent_id, job_id, seq, stream, text)

    def _quick(self, agent_id: str, action: str) -> bool:
        """Whether the agent runs `action` without accepting it first (neither a task nor
        streaming; unknown capabilities: the agent decides, so allowed)."""
        caps = self._capabilities_of(agent_id)
        if caps is None or action not in caps:
            return True
        return not (caps[action].get("task") or caps[action].get("streams"))

    def _store_output(self, agent_id: str, job_id: str, seq: int, stream: str, text: str):
        kept = self.outputs.take(job_id, agent_id, text)
        if kept is None:
            return succeed(None)  # over the cap: dropped (the marker is stored already)
        d = self.store.add_output(job_id, agent_id, seq, stream, kept, self.clock.seconds())
        d.addCallback(lambda _: self._output_stored(job_id, agent_id))
        d.addCallback(
            lambda _: self.events.publish(output_event(job_id, agent_id, seq, stream, kept))
        )
        return d

    def _output_stored(self, job_id: str, agent_id: str) -> None:
        self._wake_followers(job_id)
        if self.on_stored is not None:
            self.on_stored({"type": "output", "job": job_id, "agent": agent_id})

    def wake(self, job_id: str) -> None:
        """Another node stored output or a result of this job: its followers here read the
        store again now."""
        self._wake_followers(job_id)

    @inlineCallbacks
    def _refuse_output(self, agent_id: str, job_id: str):
        agents = yield self.store.job_agents(job_id, None)
        if agents is None:
            raise NotFound(f"no such job: {job_id}")
        if agent_id not in agents:
            raise Forbidden(f"job {job_id} is not for this agent")
        raise Conflict(f"job {job_id} is not running on this agent")

    def output_waiter(self, job_id: str, timeout: float) -> Deferred:
        """Fires when the job's next output is stored or a target finishes, or after
        `timeout` seconds (whichever is first)."""
        d: Deferred = Deferred()
        waiters = self._output_waiters.setdefault(job_id, [])
        waiters.append(d)
        timer = self.clock.callLater(timeout, self._unwait, job_id, d)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d

    def _unwait(self, job_id: str, d: Deferred) -> None:
        waiters = self._output_waiters.get(job_id, [])
        if d in waiters:
            waiters.remove(d)
            if not waiters:
                self._output_waiters.pop(job_id, None)
        if not d.called:
            d.callback(None)

    def _wake_followers(self, job_id: str) -> None:
        for d in self._output_waiters.pop(job_id, []):
            if not d.called:
                d.callback(None)

    def result(
        self,
        agent_id: str,
        job_id: str,
        state: str,
        result: Any,
        error: str | None,
        started: float | None,
        finished: float | None,
        received: float | None = None,
        adopted: bool = False,
    ) -> Deferred[bool]:
        """Record a target's outcome. Fires True when stored now, False for a duplicate."""
        # a dict, not the enum's call (a tenth of this method's time per result)
        target_state = _STATES.get(state) or TargetState(state)
        now = self.clock.seconds()
        committing = self._committing.get((job_id, agent_id))
        if committing is not None:  # the same result again while the first is committed:
            return self._after(committing, False)  # acknowledged once that commit is done
        current = self.book.state(job_id, agent_id)
        if current is None and self.shared and not adopted:
            # a job this node has not heard of yet (the bus is a hint): read it, then decide
            d = self.store.load_job(job_id)
            d.addCallback(lambda loaded: self._settle(*loaded) if loaded else None)
            return d.addCallback(
                lambda _: self.result(
                    agent_id, job_id, state, result, error, started, finished, received, True
                )
            )
        if current is None:
            return succeed(False)  # already stored (a redelivered result), or unknown
        if target_state not in (
            TargetState.SUCCEEDED,
            TargetState.FAILED,
            TargetState.EXPIRED,
            TargetState.CANCELED,
        ):
            raise Invalid("state", f"not a final state: {state}")
        if target_state is TargetState.EXPIRED and current is TargetState.RUNNING:
            raise Conflict("job already running here; report its result")
        return self._finish(
            job_id, agent_id, target_state, result, error, started, finished or now, received
        ).addCallback(lambda stored: stored is not False)

    def _finish(self, job_id, agent_id, state, result, error, started, finished, received=None):
        previous = self.book.state(job_id, agent_id)
        job = self.book.jobs.get(job_id)
        collected = None
        if job is not None and job.action == inventory.ACTION:
            collected = inventory.read_result(
                result,
                self.clock.seconds(),
                self.max_class_bytes,
                inventory.CLASSES,
                self.known_digests.known(agent_id),
            )
            if collected is not None:
                # the data goes to the inventory store only; the target keeps which classes
                # changed and their digests (issue 18: stored once)
                result = {"inventory": collected.summary(), "collected_at": collected.collected_at}
                problem = collected.problem()
                if problem is not None:
                    self._log.warn(
                        "job {job}: {agent}: {problem}", job=job_id, agent=agent_id, problem=problem
                    )
                    error = problem if error is None else f"{error}; {problem}"
                    if state is TargetState.SUCCEEDED:
                        state = TargetState.FAILED
        changes = self.book.finish(job_id, agent_id, state, self.clock.seconds())
        if not changes:
            return succeed(None)
        self.outputs.forget(job_id, agent_id)
        key = (job_id, agent_id)
        d = self.store.store_result(
            job_id,
            agent_id,
            state.value,
            result,
            error,
            started,
            finished,
            received,
            stored=self.clock.seconds(),
            # sharing the store, another node may have stored this target's result first
            **({"checked": True} if self.shared else {}),
        )
        if collected is not None:
            # acknowledged once the inventory is stored and known too (the same commit)
            stored = self._store_inventory(agent_id, collected)
            d.addCallback(lambda value: stored.addCallback(lambda _: value))
        self._committing[key] = d

        def committed(value):
            self._committing.pop(key, None)
            self._wake_followers(job_id)
            if value is False:  # another node stored it first: a duplicate here
                return value
            self.events.publish(
                finished_event(job_id, agent_id, state.value, self.clock.seconds(), result, error)
            )
            if job_id not in self.book.jobs:  # its last target: the job is done
                self.events.publish(job_event(job_id, finished=True))
            if self.on_stored is not None:
                self.on_stored(
                    {"type": "result", "job": job_id, "agent": agent_id, "state": state.value}
                )
            return value

        def not_committed(f):
            # Not stored: back into the working set, so that the agent (which keeps the
            # result until it is acknowledged) sends it again and it is stored then.
            self._committing.pop(key, None)
            if job is not None and previous is not None:
                self.book.add(job, {agent_id: previous})
            return f

        d.addCallbacks(committed, not_committed)
        return d

    def _store_inventory(self, agent_id: str, collected: inventory.Collected) -> Deferred:
        """Keep an inventory result per data class. Queued in the same reactor turn as the
        result itself, it is committed in the same transaction (the write queue's flush), so
        the agent's acknowledgement covers both; a failure fails both, and the agent's
        resent result writes both again."""
        known = self.known_digests

        size = collected.size()

        def stored(missing: Any) -> None:
            self.memory.handled(size)
            known.stored(agent_id, collected)
            for cls in missing or ():  # said unchanged, but not held: ask in full next time
                known.forget(agent_id, cls)

        return self.inventory_store.store_inventory(
            agent_id, collected, self.clock.seconds()
        ).addCallbacks(
            stored,
            lambda f: None,  # logged by the write queue; the result's own Deferred fails too
        )

    @staticmethod
    def _after(d: Deferred, value: Any) -> Deferred:
        """A Deferred firing with `value` once `d` has fired (leaving d's result alone)."""
        out: Deferred = Deferred()

        def fire(result):
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(value)
            return result

        d.addBoth(fire)
        return out

    def expire(self) -> None:
        changes = self.book.expire(self.clock.seconds())
        for c in changes:
            self.outputs.forget(c.job_id, c.agent_id)
        if changes:
            self._log.info("{n} job targets expired before delivery", n=len(changes))
        self._persist(changes)

    def _persist(self, changes: list[Change]) -> None:
        for c in changes:
            self.events.publish(target_event(c.job_id, c.agent_id, c.state.value, c.at))
        if changes:
            self.store.set_states(changes).addErrback(
                lambda f: self._log.failure("could not store job state changes", f)
            )

    # -- reading -----------------------------------------------------------------------
    def _not_connected(self, job_id: str) -> set[str]:
        """Pending targets of a job whose agent has no session and no waiting poll."""
        return {a for a in self.book.not_started(job_id) if not self.dispatcher.is_reachable(a)}

    def active_count(self) -> int:
        """Jobs with unfinished targets."""
        return len(self.book.jobs)

    def list_jobs(self) -> Deferred[list[dict[str, Any]]]:
        """Every job, newest first, without its targets."""
        return self.store.list_jobs()

    def stored_output(self, job_id: str, after: int) -> Deferred[list[dict[str, Any]]]:
        """A job's output chunks stored after chunk `after` (0: from the start)."""
        return self.store.get_output(job_id, after)

    @inlineCallbacks
    def agents_in_states(self, job_id: str, states: list[str] | None):
        """The ids of a job's targets in any of `states` (None: all); NotFound without it."""
        agents = yield self.store.job_agents(job_id, states)
        if agents is None:
            raise NotFound(f"no such job: {job_id}")
        return agents

    @inlineCallbacks
    def status(self, job_id: str, results: bool = True):
        """A job's counts and, unless results=False, every target's state and result."""
        if not results:
            job = yield self.store.get_job_counts(job_id)
            if job is None:
                raise NotFound(f"no such job: {job_id}")
            states = job.pop("states")
            job["counts"] = summarize(
                (s for s, n in states.items() for _ in range(n)),
                not_connected=len(self._not_connected(job_id)),
            )
            return job
        job = yield self.store.get_job(job_id)
        if job is None:
            raise NotFound(f"no such job: {job_id}")
        targets = job.pop("targets")
        away = self._not_connected(job_id)
        job["counts"] = summarize((t["state"] for t in targets), not_connected=len(away))
        job["results"] = [
            {
                "agent": t["agent_id"],
                "state": t["state"],
                "result": t["result"],
                "error": t["error"],
                "delivered_at": t["delivered_at"],
                "received_at": t["received_at"],
                "stored_at": t["updated_at"] if t["state"] in TERMINAL_VALUES else None,
                "started_at": t["started_at"],
                "finished_at": t["finished_at"],
                "online": self.dispatcher.is_online(t["agent_id"]),
                "reason": NOT_CONNECTED
                if t["agent_id"] in away and t["state"] == "pending"
                else None,
            }
            for t in targets
        ]
        if job["action"] == inventory.ACTION:
            yield self._with_inventory(job["results"])
        return job

    @inlineCallbacks
    def _with_inventory(self, results: list[dict[str, Any]]):
        """Put the data each inventory target collected back into its result, read from the
        inventory store (the target keeps only which classes changed, with their digests):
        `classes` as the agent sent them, `digests` and `unchanged` as it named them."""
        wanted: dict[str, dict[str, str]] = {}
        for r in results:
            summary = inventory.stored_summary(r["result"])
            if summary is not None and summary["changed"]:
                wanted[r["agent"]] = summary["changed"]
        data: dict[str, Any] = {}
        over: set[tuple[str, str]] = set()
        if wanted:
            data, over = yield self.inventory_store.versions_data(wanted, SHOWN_INVENTORY_BYTES)
        for r in results:
            summary = inventory.stored_summary(r["result"])
            if summary is not None:
                agent = r["agent"]
                r["result"] = inventory.shown_result(
                    r["result"],
                    summary,
                    data.get(agent, {}),
                    [cls for cls in summary["changed"] if (agent, cls) in over],
                )


def _job_of(row: dict[str, Any]) -> Job:
    """A job of the working set from its stored row."""
    return Job(
        id=row["id"],
        action=row["action"],
        args=row["args"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        timeout=row["timeout"],
        created_by=row["created_by"],
    )
