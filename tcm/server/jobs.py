"""Jobs and the per-target state machine. Pure domain logic: no I/O, no reactor.

A job is one action with arguments sent to a set of agents. Each (job, agent) pair is a
*target* with a state:

    pending --> delivered --> running --> succeeded | failed
       |            |            |
       +------------+------------+--> canceled  (an operator's cancel; a running one when
       |            |                             the agent reports its handler ended)
       +------------+--> expired   (TTL passed before the agent accepted it; never run after)
       |
       +--> unsupported  (the agent's handlers lack the action: never sent)

A pending target whose agent has neither a session nor a waiting poll is reported with the
reason `not connected` (`summarize`): a view of `pending`, not a state of its own, so it
becomes `delivered` as soon as the agent comes.

The store holds the truth; `JobBook` is the server's working set of targets that are not
finished yet, so that accept and result decisions need no database round trip.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

import attrs

from tcm.protocol.envelope import Envelope, encode


class TargetState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELED = "canceled"
    UNSUPPORTED = "unsupported"


TERMINAL = frozenset(
    {
        TargetState.SUCCEEDED,
        TargetState.FAILED,
        TargetState.EXPIRED,
        TargetState.CANCELED,
        TargetState.UNSUPPORTED,
    }
)
NOT_STARTED = frozenset({TargetState.PENDING, TargetState.DELIVERED})
ACTIVE = frozenset({TargetState.PENDING, TargetState.DELIVERED, TargetState.RUNNING})

_ALLOWED: dict[TargetState, frozenset[TargetState]] = {
    TargetState.PENDING: frozenset(
        {TargetState.DELIVERED, TargetState.RUNNING, TargetState.EXPIRED}
        | {TargetState.SUCCEEDED, TargetState.FAILED}
        | {TargetState.CANCELED, TargetState.UNSUPPORTED}
    ),
    TargetState.DELIVERED: frozenset(
        {TargetState.RUNNING, TargetState.EXPIRED, TargetState.SUCCEEDED, TargetState.FAILED}
        | {TargetState.CANCELED}
    ),
    TargetState.RUNNING: frozenset(
        {TargetState.SUCCEEDED, TargetState.FAILED, TargetState.CANCELED}
    ),
    TargetState.SUCCEEDED: frozenset(),
    TargetState.FAILED: frozenset(),
    TargetState.EXPIRED: frozenset(),
    TargetState.CANCELED: frozenset(),
    TargetState.UNSUPPORTED: frozenset(),
}

# How far a target got: a node's own view and the store's are merged to the further one.
_RANK = {TargetState.PENDING: 0, TargetState.DELIVERED: 1, TargetState.RUNNING: 2}

# The reason a pending target is reported with when its agent is not reachable now.
NOT_CONNECTED = "not connected"


class InvalidTransition(Exception):
    """A state change the target state machine does not allow."""


def transition(current: TargetState, new: TargetState) -> TargetState:
    """Return `new` if a target may go from `current` to it; raise InvalidTransition if not."""
    if new not in _ALLOWED[current]:
        raise InvalidTransition(f"{current.value} -> {new.value}")
    return new


class Accept(enum.StrEnum):
    """The server's answer to an agent that wants to start a job."""

    RUN = "run"  # go ahead (also when the agent already runs it: idempotent)
    EXPIRED = "expired"  # TTL passed before the agent started it: do not run
    FINISHED = "finished"  # a result is already stored: do not run again
    UNKNOWN = "unknown"  # no such job for this agent


@attrs.define
class Job:
    """An action with arguments for a set of agents, deliverable until `expires_at`."""

    id: str
    action: str
    args: dict[str, Any]
    created_at: float
    expires_at: float
    timeout: float | None = None
    created_by: str = ""
    _frame: bytes | None = attrs.field(default=None, init=False, repr=False)

    def request(self) -> Envelope:
        """The action.request every target of this job receives (the same for all)."""
        data: dict[str, Any] = {"job": self.id, "action": self.action, "args": self.args}
        if self.timeout is not None:
            data["timeout"] = self.timeout
        return Envelope(
            type="action.request", id=f"req-{self.id}", data=data, expires=self.expires_at
        )

    def frame(self) -> bytes:
        """The encoded request, encoded once for every target."""
        if self._frame is None:
            self._frame = encode(self.request())
        return self._frame

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at


@attrs.frozen
class Change:
    """A target's state change, to be written to the store."""

    job_id: str
    agent_id: str
    state: TargetState
    at: float


class JobBook:
    """The working set: jobs with at least one unfinished target, and those targets' states."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._targets: dict[str, dict[str, TargetState]] = {}
        self._by_agent: dict[str, set[str]] = {}
        # running targets an operator canceled: the agent is told (again at each session)
        self._cancel_asked: set[tuple[str, str]] = set()

    def add(self, job: Job, targets: dict[str, TargetState]) -> None:
        """Track a job and (more of) its unfinished targets: all of them for a new job, one
        again when its result could not be stored."""
        active = {a: s for a, s in targets.items() if s not in TERMINAL}
        if not active:
            return
        self.jobs[job.id] = job
        self._targets.setdefault(job.id, {}).update(active)
        for agent_id in active:
            self._by_agent.setdefault(agent_id, set()).add(job.id)

    def settle(self, job: Job, unfinished: dict[str, TargetState]) -> list[str]:
        """Take the store's view of a job's unfinished targets (a job another node created or
        changed): targets tracked here but finished in the store are dropped (no change to
        write: the store has it), the others keep the further of the two states. Returns the
        dropped agent ids."""
        old = self._targets.get(job.id, {})
        merged = {
            a: old[a] if a in old and _RANK[old[a]] >= _RANK[s] else s
            for a, s in unfinished.items()
            if s not in TERMINAL
        }
        dropped = [a for a in old if a not in merged]
        for agent_id in dropped:
            self._finish(job.id, agent_id, TargetState.CANCELED, 0.0)  # the store has it
        self.add(self.jobs.get(job.id, job), merged)
        return dropped

    def state(self, job_id: str, agent_id: str) -> TargetState | None:
        """The state of an unfinished target, or None if not tracked (finished or unknown)."""
        return self._targets.get(job_id, {}).get(agent_id)

    def deliverable(self, agent_id: str, now: float) -> list[Job]:
        """Jobs to (re)send to an agent that (re)connects: unfinished and, unless already
        running there, not expired. Oldest first."""
        out = []
        for job_id in self._by_agent.get(agent_id, ()):
            job = self.jobs[job_id]
            state = self._targets[job_id][agent_id]
            if state is TargetState.RUNNING or not job.is_expired(now):
                out.append(job)
        out.sort(key=lambda j: j.created_at)
        return out

    def delivered(self, job_id: str, agent_ids: Iterable[str], now: float) -> list[Change]:
        """Mark pending targets as delivered (sent on a live session or in a poll answer)."""
        targets = self._targets.get(job_id)
        if targets is None:
            return []
        changes = []
        for agent_id in agent_ids:
            if targets.get(agent_id) is TargetState.PENDING:
                targets[agent_id] = TargetState.DELIVERED
                changes.append(Change(job_id, agent_id, TargetState.DELIVERED, now))
        return changes

    def accept(self, job_id: str, agent_id: str, now: float) -> tuple[Accept, list[Change]]:
        """An agent asks to start a job: decide, and say what changes."""
        state = self.state(job_id, agent_id)
        if state is None:
            return Accept.UNKNOWN, []
        if state is TargetState.RUNNING:
            return Accept.RUN, []
        if self.jobs[job_id].is_expired(now):
            return Accept.EXPIRED, self._finish(job_id, agent_id, TargetState.EXPIRED, now)
        self._targets[job_id][agent_id] = TargetState.RUNNING
        return Accept.RUN, [Change(job_id, agent_id, TargetState.RUNNING, now)]

    def finish(self, job_id: str, agent_id: str, state: TargetState, now: float) -> list[Change]:
        """A result (or an agent's `expired`) for a target: the change, or [] if it is
        already finished or unknown here (a redelivered result is stored once)."""
        current = self.state(job_id, agent_id)
        if current is None:
            return []
        transition(current, state)
        return self._finish(job_id, agent_id, state, now)

    def expire(self, now: float) -> list[Change]:
        """Targets whose job's TTL has passed before they were started."""
        changes = []
        for job_id, job in list(self.jobs.items()):
            if not job.is_expired(now):
                continue
            for agent_id, state in list(self._targets[job_id].items()):
                if state in NOT_STARTED:
                    changes.extend(self._finish(job_id, agent_id, TargetState.EXPIRED, now))
        return changes

    def cancel(
        self, job_id: str, agent_ids: Iterable[str] | None, now: float
    ) -> tuple[list[str], list[str]]:
        """An operator cancels a job's unfinished targets (all, or those of `agent_ids`).

        Returns (not started, running): the first end `canceled` now (their caller finishes
        them), the second are asked to stop and stay `running` until their agent reports."""
        targets = self._targets.get(job_id, {})
        wanted = targets if agent_ids is None else [a for a in agent_ids if a in targets]
        not_started: list[str] = []
        running: list[str] = []
        for agent_id in sorted(wanted):
            transition(targets[agent_id], TargetState.CANCELED)
            if targets[agent_id] is TargetState.RUNNING:
                self._cancel_asked.add((job_id, agent_id))
                running.append(agent_id)
            else:
                not_started.append(agent_id)
        return not_started, running

    def cancel_asked(self, agent_id: str) -> list[str]:
        """The running jobs of an agent that an operator canceled (told again on reconnect)."""
        return sorted(
            j for j in self._by_agent.get(agent_id, ()) if (j, agent_id) in self._cancel_asked
        )

    def not_started(self, job_id: str) -> list[str]:
        """A job's pending targets (whose agents may or may not be reachable)."""
        return [a for a, s in self._targets.get(job_id, {}).items() if s is TargetState.PENDING]

    def active_targets(self, job_id: str) -> dict[str, TargetState]:
        return dict(self._targets.get(job_id, {}))

    def _finish(self, job_id: str, agent_id: str, state: TargetState, now: float) -> list[Change]:
        targets = self._targets[job_id]
        del targets[agent_id]
        self._cancel_asked.discard((job_id, agent_id))
        jobs_of_agent = self._by_agent[agent_id]
        jobs_of_agent.discard(job_id)
        if not jobs_of_agent:
            del self._by_agent[agent_id]
        if not targets:
            del self._targets[job_id]
            del self.jobs[job_id]
        return [Change(job_id, agent_id, state, now)]


def summarize(states: Iterable[str], not_connected: int = 0) -> dict[str, Any]:
    """Counts of a job's targets, as the API reports them. `not_connected` of the pending
    ones are queued for agents with no session and no waiting poll: counted apart
    (`not_connected`), so `pending` counts those queued for a reachable agent."""
    counts: dict[str, Any] = {s.value: 0 for s in TargetState}
    total = 0
    for s in states:
        counts[s] = counts.get(s, 0) + 1
        total += 1
    not_connected = min(not_connected, counts["pending"])
    counts["pending"] -= not_connected
    counts["not_connected"] = not_connected
    counts["in_progress"] = counts["delivered"] + counts["running"]
    counts["completed"] = sum(counts[s.value] for s in TERMINAL)
    counts["total"] = total
    counts["progress"] = round(100.0 * counts["completed"] / total, 1) if total else 100.0
    return counts


# -- output: who may send it, and how much is kept (issue 16.1) ----------------------------

MiB = 1024 * 1024
DEFAULT_MAX_OUTPUT = 8 * MiB


def output_admitted(state: TargetState | None, quick: bool) -> bool:
    """Whether a target in `state` may send output now: a running one, or a delivered one of
    a quick action (it runs without the accept round trip, so it is never *running*)."""
    return state is TargetState.RUNNING or (state is TargetState.DELIVERED and quick)


def _size_words(limit: int) -> str:
    return f"{limit // MiB} MiB" if limit % MiB == 0 else f"{limit} bytes"


class OutputAllowance:
    """How much output each target has had stored, against a cap per target.

    Output within the cap is kept whole; the chunk that crosses it keeps what fits followed
    by one marker line; everything after is dropped. Pure bookkeeping: the caller stores.
    """

    def __init__(self, limit: int = DEFAULT_MAX_OUTPUT) -> None:
        self.limit = limit
        self.marker = f"\n[output truncated at {_size_words(limit)}]\n"
        self._used: dict[tuple[str, str], int] = {}

    def known(self, job_id: str, agent_id: str) -> bool:
        """Whether this target's use is known (else: ask the store once, `resume`)."""
        return (job_id, agent_id) in self._used

    def resume(self, job_id: str, agent_id: str, stored_bytes: int) -> None:
        """A target's use as the store has it (after a restart)."""
        self._used.setdefault((job_id, agent_id), stored_bytes)

    def take(self, job_id: str, agent_id: str, text: str) -> str | None:
        """What of `text` to store: all of it, its part within the cap followed by the
        marker (once), or None (the cap was reached before)."""
        key = (job_id, agent_id)
        used = self._used.get(key, 0)
        if used > self.limit:  # the marker is stored (beyond the cap: marked)
            return None
        data = text.encode("utf-8", "surrogatepass")
        if used + len(data) <= self.limit:
            self._used[key] = used + len(data)
            return text
        self._used[key] = self.limit + 1
        kept = data[: self.limit - used].decode("utf-8", "ignore")
        return kept + self.marker

    def forget(self, job_id: str, agent_id: str) -> None:
        """A target finished: its output is closed."""
        self._used.pop((job_id, agent_id), None)
