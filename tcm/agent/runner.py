"""Runs pushed actions exactly once and delivers their results until acknowledged.

For each `action.request` (pushed on the session or fetched by a poll):

1. The ledger decides whether the job is new here. A job that already ran is not run again;
   its spooled result is sent again if the server has not acknowledged it; a job that an
   earlier run of the agent started but never finished is reported failed ("interrupted").
2. A request past its `expires` is answered `expired`, never run.
3. The server is asked to accept it (`POST /agent/v1/jobs/{id}/accept`); only a `run` answer
   starts the handler. The store on the server is the truth: a job that expired meanwhile or
   that has a result is not started.
4. The result is spooled on disk, then sent; the spool entry is kept until the server answers
   that it stored it.

An `action.cancel` from the server (an operator canceled the job) cancels the handler's
Deferred: a handler ends its work in its canceller (`command.run` ends the command's whole
process group, SIGTERM then SIGKILL) and the job is reported `canceled`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import fastjsonschema
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from tcm.agent.ledger import ACKED, DECLINED, FINISHED, STARTED, Ledger
from tcm.interfaces import (
    ActionFailed,
    IActionContext,
    IActionHandler,
    IAgentAPI,
    ISessionObserver,
)
from tcm.protocol.envelope import Envelope


@implementer(IActionContext)
@attrs.define
class ActionContext:
    """What a handler gets while it runs one job."""

    job_id: str
    timeout: float | None
    reactor: Any
    state_dir: Any
    _runner: ActionRunner
    local: bool = False  # run for a policy on the agent itself: no job, output not streamed
    _seq: int = 0

    def output(self, stream: str, text: str) -> None:
        if self.local:
            return
        self._seq += 1
        self._runner.send_output(self.job_id, self._seq, stream, text)


@implementer(ISessionObserver)
class ActionRunner:
    """Receives action requests, runs them through their handlers, reports results."""

    _log = Logger()

    def __init__(
        self,
        handlers: dict[str, Any],
        ledger: Ledger,
        link: IAgentAPI,
        reactor: Any,
        state_dir: Any,
        activity: Callable[[], object] | None = None,
    ):
        self.handlers = handlers
        self.ledger = ledger
        self.link = link
        self.reactor = reactor
        self.state_dir = state_dir
        self._running: dict[str, Deferred] = {}
        self._sending: set[str] = set()
        self._received: dict[str, float] = {}  # job -> when its request arrived here
        self._via: dict[str, Any] = {}  # job -> the session it came on (a task session)
        self._handling: set[str] = set()  # jobs whose handler runs now (not only reserved)
        self._canceled: dict[str, str] = {}  # job -> why the server canceled it
        self._stopping = False  # the agent stops: handlers end, their jobs stay "started"
        self.clock_offset = 0.0  # server clock minus this machine's clock
        self.completed = 0
        # told when a session opened, a job concluded and a result was acknowledged (what
        # leaves garbage behind): a QuietSettler's poke in an agent process (tcm.heap)
        self._activity = activity

    def _active(self) -> None:
        if self._activity is not None:
            self._activity()

    def running_jobs(self) -> list[str]:
        return sorted(self._running)

    def receive(self, env: Envelope, received: float | None = None, via: Any = None) -> None:
        """An action.request arrived (push or poll), at `received` (epoch) if known, on
        session `via` (its output and result go back that way while it is open)."""
        data = env.data
        job_id = data["job"]
        if via is not None and via is not getattr(self.link, "session", None):
            self._via[job_id] = via
        if job_id in self._running:
            return  # a redelivery of a job running right now: its result will come
        entry = self.ledger.get(job_id)
        if entry is not None:
            self._redelivered(job_id, entry)
            return
        self._received[job_id] = received or time.time()
        now = self.server_now()
        if env.is_expired(now):
            self._log.info("job {job} arrived after it expired; not running it", job=job_id)
            self._conclude(job_id, "expired", None, "request arrived after it expired", None)
            return
        handler = self.handlers.get(data["action"])
        if handler is None:
            self._conclude(
                job_id, "failed", None, f"unknown action {data['action']!r} on this agent", None
            )
            return
        problem = self._check_args(handler, data.get("args", {}))
        if problem is not None:
            self._conclude(job_id, "failed", None, f"invalid arguments: {problem}", None)
            return
        if not (handler.task or handler.streams):
            # A quick action runs at once: the ledger makes it run once, the check above
            # (on the server's clock) keeps an expired one from running, and it saves the
            # accept round trip, half of the requests of a quick job.
            self._start(job_id, handler, data)
            return
        self._running[job_id] = Deferred()  # reserve: a second push during accept waits
        d = self.link.call("POST", f"/agent/v1/jobs/{job_id}/accept", {}, via=self._via.get(job_id))
        d.addCallback(self._accepted, job_id, handler, data)
        d.addErrback(self._accept_failed, job_id)

    def cancel(self, job_id: str, reason: str = "canceled") -> bool:
        """The server canceled a job: end its handler if it runs here (reported `canceled`).
        A job waiting for its accept is not started; anything else is not ours to stop."""
        if job_id not in self._running:
            return False
        self._log.info("job {job} canceled: {reason}", job=job_id, reason=reason)
        self._canceled[job_id] = reason
        if job_id in self._handling:
            self._running[job_id].cancel()
        return True

    def stop(self) -> None:
        """The agent stops: end every running handler (a command's whole process group).
        Their ledger entries stay "started", so the next start reports them interrupted, as
        after a kill."""
        self._stopping = True
        for job_id in sorted(self._handling):
            self._log.info("job {job} ended: the agent stops", job=job_id)
            self._running[job_id].cancel()

    def server_now(self) -> float:
        """The time on the server's clock, as far as this agent knows it."""
        return self.reactor.seconds() + self.clock_offset

    def learn_server_time(self, server_time: Any) -> None:
        """The server said what time it is (welcome, poll answers): keep the offset, so that
        expiry is judged on the server's clock whatever this machine's clock says."""
        if isinstance(server_time, (int, float)):
            self.clock_offset = float(server_time) - self.reactor.seconds()

    def _redelivered(self, job_id: str, entry: dict[str, Any]) -> None:
        state = entry["state"]
        if state == FINISHED:
            self.send_result(job_id)
        elif state == STARTED:
            self._conclude(
                job_id,
                "failed",
                None,
                "interrupted: the agent stopped while the job was running",
                entry.get("started"),
            )

    def _check_args(self, handler: Any, args: dict[str, Any]) -> str | None:
        validator = validator_for(handler)
        try:
            validator(args)
        except fastjsonschema.JsonSchemaValueException as e:
            return e.message
        return None

    def _accept_failed(self, failure, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._received.pop(job_id, None)
        self._via.pop(job_id, None)
        self._log.warn(
            "could not accept job {job}: {why}; it will be delivered again",
            job=job_id,
            why=failure.getErrorMessage(),
        )

    def _accepted(self, response, job_id: str, handler: Any, data: dict[str, Any]) -> None:
        decision = (response.body or {}).get("decision") if response.status == 200 else None
        reason = self._canceled.pop(job_id, None)
        if decision == "run" and reason is not None:  # canceled while it was being accepted
            self._running.pop(job_id, None)
            self._conclude(job_id, "canceled", None, reason, None)
            return
        if decision != "run":
            self._running.pop(job_id, None)
            self._received.pop(job_id, None)
            self._via.pop(job_id, None)
            if response.status != 200:
                self._log.warn(
                    "accept of job {job} answered {status}: {body}",
                    job=job_id,
                    status=response.status,
                    body=response.body,
                )
                return
            self._log.info("server declined job {job}: {decision}", job=job_id, decision=decision)
            self.ledger.record(job_id, DECLINED, decision=decision)
            return
        self._start(job_id, handler, data)

    def _start(self, job_id: str, handler: Any, data: dict[str, Any]) -> None:
        """Run a job's handler: STARTED on disk first, then the handler, then the outcome."""
        started = time.time()
        self.ledger.record(job_id, STARTED, started=started)
        timeout = data.get("timeout")
        ctx = ActionContext(job_id, timeout, self.reactor, self.state_dir, self)
        d = maybeDeferred(handler.run, ctx, data.get("args", {}))
        self._running[job_id] = d
        self._handling.add(job_id)
        timer = None
        if timeout:
            timer = self.reactor.callLater(timeout, d.cancel)

        def succeeded(result: Any) -> None:
            self._conclude(job_id, "succeeded", result, None, started)

        def failed(f) -> None:
            if self._stopping and f.check(CancelledError):
                return  # "interrupted" at the next start, as the ledger says "started"
            if f.check(ActionFailed):
                self._conclude(job_id, "failed", f.value.result or None, f.value.reason, started)
            elif f.check(CancelledError) and job_id in self._canceled:
                self._conclude(job_id, "canceled", None, self._canceled[job_id], started)
            elif f.check(CancelledError):
                self._conclude(job_id, "failed", None, f"timed out after {timeout} s", started)
            else:
                self._log.failure("action {action} failed", f, action=data["action"])
                self._conclude(
                    job_id, "failed", None, f"{f.type.__name__}: {f.getErrorMessage()}", started
                )

        def cleanup(_: Any) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            self._running.pop(job_id, None)
            self._handling.discard(job_id)
            self._canceled.pop(job_id, None)

        d.addCallbacks(succeeded, failed)
        d.addBoth(cleanup)

    def _conclude(
        self, job_id: str, state: str, result: Any, error: str | None, started: float | None
    ) -> None:
        """Spool a final outcome, then send it."""
        self.ledger.record(
            job_id,
            FINISHED,
            outcome={
                "state": state,
                "result": result,
                "error": error,
                "received": self._received.pop(job_id, None),
                "started": started,
                "finished": time.time(),
            },
        )
        self.completed += 1
        self.send_result(job_id)
        self._active()

    def send_result(self, job_id: str) -> None:
        """Send a spooled result; on success mark it acknowledged, else keep it spooled."""
        if job_id in self._sending:
            return
        entry = self.ledger.get(job_id)
        if entry is None or entry["state"] != FINISHED:
            return
        self._sending.add(job_id)
        d = self.link.call(
            "POST", f"/agent/v1/jobs/{job_id}/result", entry["outcome"], via=self._via.get(job_id)
        )

        def answered(response) -> None:
            if response.status == 200:
                self.ledger.record(job_id, ACKED)
                self._via.pop(job_id, None)
                self._active()
            else:
                self._log.warn(
                    "result of job {job} refused ({status}): {body}; kept",
                    job=job_id,
                    status=response.status,
                    body=response.body,
                )

        def failed(f) -> None:
            self._log.info(
                "result of job {job} not delivered yet: {why}", job=job_id, why=f.getErrorMessage()
            )

        d.addCallbacks(answered, failed)
        d.addBoth(lambda _: self._sending.discard(job_id))

    def flush(self) -> None:
        """Send every result still waiting in the spool (on each new session, and on a timer)."""
        for entry in self.ledger.unacknowledged():
            self.send_result(entry["job"])

    # -- told by the agent's connection ------------------------------------------------------
    def session_opened(self, welcome: dict[str, Any]) -> None:
        self.flush()  # results spooled while there was no session go now
        self._active()

    def session_lost(self, reason: str, switched_off: bool) -> None:
        """Results keep their spool entries: they go over HTTPS or the next session."""

    def polling_started(self) -> None:
        """Each answered poll flushes the spool already (the poller asks for it)."""

    def recover(self) -> None:
        """At start: jobs an earlier run started but never finished are reported failed."""
        for entry in self.ledger.interrupted():
            if entry["job"] not in self._running:
                self._conclude(
                    entry["job"],
                    "failed",
                    None,
                    "interrupted: the agent stopped while the job was running",
                    entry.get("started"),
                )

    def send_output(self, job_id: str, seq: int, stream: str, text: str) -> None:
        d = self.link.call(
            "POST",
            f"/agent/v1/jobs/{job_id}/output",
            {"seq": seq, "stream": stream, "text": text},
            via=self._via.get(job_id),
        )
        d.addErrback(lambda f: self._log.debug("output chunk lost: {why}", why=f.getErrorMessage()))


_VALIDATORS: dict[int, tuple[Any, Any]] = {}


def validator_for(handler: Any) -> Any:
    """The compiled argument validator of a handler, compiled once per process (a swarm
    shares its handlers among thousands of agents)."""
    cached = _VALIDATORS.get(id(handler))
    if cached is None or cached[0] is not handler:
        cached = _VALIDATORS[id(handler)] = (handler, fastjsonschema.compile(handler.schema or {}))
    return cached[1]


def load_handlers() -> dict[str, Any]:
    """Discover every IActionHandler plugin; verify each; name -> handler."""
    from twisted.plugin import getPlugins
    from zope.interface.verify import verifyObject

    import tcm.plugins

    handlers: dict[str, Any] = {}
    for plugin in getPlugins(IActionHandler, tcm.plugins):
        verifyObject(IActionHandler, plugin)
        if plugin.name in handlers:
            raise ValueError(f"two action handlers named {plugin.name!r}")
        handlers[plugin.name] = plugin
    return handlers
