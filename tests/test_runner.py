"""ActionRunner: exactly-once runs, the accept decision, and results spooled until acknowledged."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from twisted.python.filepath import FilePath
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tcm.agent.ledger import ACKED, DECLINED, FINISHED, STARTED, Ledger
from tcm.agent.link import CallFailed, Response
from tcm.agent.runner import ActionRunner
from tcm.interfaces import ActionFailed, IActionContext, IActionHandler
from tcm.protocol.envelope import Envelope

NOW = 1_700_000_000.0


# -- small real handlers --------------------------------------------------------------------


@implementer(IPlugin, IActionHandler)
class Echo:
    """Answers at once with its arguments."""

    name = "echo"
    streams = False
    task = True  # asks the server before it runs (the accept gate)
    schema = {
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": 10}},
        "additionalProperties": False,
    }

    def __init__(self) -> None:
        self.runs: list[tuple[Any, dict]] = []

    def run(self, context, args):
        self.runs.append((context, args))
        return {"echo": args.get("text")}


@implementer(IPlugin, IActionHandler)
class Slow:
    """Finishes when the test fires its Deferred; remembers whether it was cancelled."""

    name = "slow"
    streams = True
    task = False
    schema: dict[str, Any] = {}

    def __init__(self) -> None:
        self.pending: list[Deferred] = []
        self.cancelled = 0
        self.contexts: list[Any] = []

    def run(self, context, args):
        self.contexts.append(context)

        def cancel(d: Deferred) -> None:
            self.cancelled += 1  # a real handler kills its process here

        d: Deferred = Deferred(cancel)
        self.pending.append(d)
        return d


@implementer(IPlugin, IActionHandler)
class Refuses:
    """Fails with a reason and a partial result."""

    name = "refuses"
    streams = False
    task = True  # asks the server before it runs (the accept gate)
    schema: dict[str, Any] = {}

    def run(self, context, args):
        raise ActionFailed("disk full", {"free_bytes": 0})


@implementer(IPlugin, IActionHandler)
class Crashes:
    """Has a bug."""

    name = "crashes"
    streams = False
    task = True  # asks the server before it runs (the accept gate)
    schema: dict[str, Any] = {}

    def run(self, context, args):
        return {}["missing"]


@implementer(IPlugin, IActionHandler)
class Chatty:
    """Streams output, then succeeds."""

    name = "chatty"
    streams = True
    task = False
    schema: dict[str, Any] = {}

    def run(self, context, args):
        context.output("stdout", "one\n")
        context.output("stderr", "two\n")
        context.output("stdout", "three\n")
        return {"lines": 3}


class FakeLink:
    """Records agent API calls; the test answers each one by firing its Deferred."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, Deferred]] = []

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float | None = None,
        via: Any = None,
    ):
        d: Deferred = Deferred()
        self.calls.append((method, path, body, d))
        return d

    def paths(self) -> list[str]:
        return [f"{m} {p}" for m, p, _, _ in self.calls]

    def last(self) -> tuple[str, str, Any, Deferred]:
        return self.calls[-1]

    def answer(self, status: int = 200, body: Any = None, index: int = -1) -> None:
        self.calls[index][3].callback(Response(status, body, "websocket"))

    def refuse(self, index: int = -1) -> None:
        self.calls[index][3].errback(CallFailed("no open session"))


class World:
    def __init__(self, tmp_path) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.dir = tmp_path / "jobs"
        self.ledger = Ledger(str(self.dir), fsync=False)
        self.link = FakeLink()
        self.echo, self.slow = Echo(), Slow()
        self.handlers = {h.name: h for h in (self.echo, self.slow, Refuses(), Crashes(), Chatty())}
        self.runner = self.new_runner()

    def new_runner(self) -> ActionRunner:
        return ActionRunner(
            self.handlers, self.ledger, self.link, self.clock, FilePath(str(self.dir.parent))
        )

    def push(
        self,
        job: str = "j1",
        action: str = "echo",
        args: dict | None = None,
        ttl: float = 60.0,
        timeout: float | None = None,
    ) -> Envelope:
        data: dict[str, Any] = {
            "job": job,
            "action": action,
            "args": {"text": "hi"} if args is None else args,
        }
        if timeout is not None:
            data["timeout"] = timeout
        env = Envelope(
            type="action.request", id=f"req-{job}", data=data, expires=self.clock.seconds() + ttl
        )
        self.runner.receive(env)
        return env

    def state(self, job: str = "j1") -> str | None:
        entry = self.ledger.get(job)
        return None if entry is None else entry["state"]

    def outcome(self, job: str = "j1") -> dict[str, Any]:
        return self.ledger.get(job)["outcome"]


@pytest.fixture
def w(tmp_path):
    return World(tmp_path)


def accept_path(job="j1"):
    return f"POST /agent/v1/jobs/{job}/accept"


def result_path(job="j1"):
    return f"POST /agent/v1/jobs/{job}/result"


def test_handlers_are_real_action_handlers(w):
    for handler in w.handlers.values():
        verifyObject(IActionHandler, handler)


def test_new_job_from_accept_to_acknowledged_result(w):
    w.push()
    assert w.link.paths() == [accept_path()]
    assert w.link.last()[2] == {}
    assert w.state() is None  # nothing runs, nothing is written, before the server says so
    assert w.runner.running_jobs() == ["j1"]

    w.link.answer(200, {"decision": "run"})
    [(context, args)] = w.echo.runs
    assert args == {"text": "hi"}
    verifyObject(IActionContext, context)
    assert context.job_id == "j1" and context.reactor is w.clock

    assert w.state() == FINISHED
    outcome = w.outcome()
    assert outcome["state"] == "succeeded"
    assert outcome["result"] == {"echo": "hi"}
    assert outcome["error"] is None
    assert outcome["started"] <= outcome["finished"]
    assert w.link.paths() == [accept_path(), result_path()]
    assert w.link.last()[2] == outcome

    w.link.answer(200, {"stored": True})
    assert w.state() == ACKED
    assert w.runner.running_jobs() == []
    assert w.runner.completed == 1
    assert len(w.link.calls) == 2


def test_started_is_recorded_before_the_handler_runs(w):
    w.push(action="slow")
    w.link.answer(200, {"decision": "run"})
    assert w.state() == STARTED
    assert w.runner.running_jobs() == ["j1"]
    w.slow.pending[0].callback({"done": True})
    assert w.state() == FINISHED
    assert w.outcome()["result"] == {"done": True}
    assert w.runner.running_jobs() == []


@pytest.mark.parametrize("decision", ["expired", "finished", "unknown"])
def test_declined_job_is_not_run(w, decision):
    w.push()
    w.link.answer(200, {"decision": decision})
    assert w.echo.runs == []
    assert w.state() == DECLINED
    assert w.ledger.get("j1")["decision"] == decision
    assert w.link.paths() == [accept_path()]  # no result: the server decided
    assert w.runner.running_jobs() == []
    w.push()  # redelivered: still not run, not asked again
    assert w.link.paths() == [accept_path()]


@pytest.mark.parametrize("failure", ["status", "call"])
def test_accept_without_an_answer_is_retried_on_redelivery(w, failure):
    w.push()
    if failure == "status":
        w.link.answer(503, {"error": "busy"})
    else:
        w.link.refuse()
    assert w.state() is None
    assert w.runner.running_jobs() == []
    w.push()
    assert w.link.paths() == [accept_path(), accept_path()]
    w.link.answer(200, {"decision": "run"})
    assert len(w.echo.runs) == 1


def test_expired_request_is_answered_expired_and_not_run(w):
    env = Envelope(
        type="action.request",
        id="req-j1",
        expires=NOW - 1,
        data={"job": "j1", "action": "echo", "args": {}},
    )
    w.runner.receive(env)
    assert w.link.paths() == [result_path()]  # no accept
    assert w.outcome()["state"] == "expired"
    assert "expired" in w.outcome()["error"]
    assert w.echo.runs == []


def test_request_expiring_exactly_now_is_expired(w):
    w.push(ttl=0.0)
    assert w.link.paths() == [result_path()]
    assert w.outcome()["state"] == "expired"


def test_unknown_action_fails_with_a_reason(w):
    w.push(action="no.such")
    assert w.link.paths() == [result_path()]
    outcome = w.outcome()
    assert outcome["state"] == "failed"
    assert outcome["error"] == "unknown action 'no.such' on this agent"
    assert outcome["started"] is None


@pytest.mark.parametrize("args", [{"text": 5}, {"text": "far too long text"}, {"other": 1}])
def test_invalid_args_fail_before_accept(w, args):
    w.push(args=args)
    assert w.link.paths() == [result_path()]
    outcome = w.outcome()
    assert outcome["state"] == "failed"
    assert outcome["error"].startswith("invalid arguments: ")
    assert w.echo.runs == []


def test_action_failed_reports_reason_and_result(w):
    w.push(action="refuses", args={})
    w.link.answer(200, {"decision": "run"})
    outcome = w.outcome()
    assert outcome["state"] == "failed"
    assert outcome["error"] == "disk full"
    assert outcome["result"] == {"free_bytes": 0}
    assert isinstance(outcome["started"], float)


def test_a_handler_bug_is_a_failure_with_a_reason(w):
    w.push(action="crashes", args={})
    w.link.answer(200, {"decision": "run"})
    outcome = w.outcome()
    assert outcome["state"] == "failed"
    assert outcome["error"] == "KeyError: 'missing'"
    assert w.runner.running_jobs() == []


def test_timeout_cancels_the_handler(w):
    w.push(action="slow", args={}, timeout=5.0)
    w.link.answer(200, {"decision": "run"})
    assert w.slow.contexts[0].timeout == 5.0
    w.clock.advance(4.9)
    assert w.state() == STARTED and w.slow.cancelled == 0
    w.clock.advance(0.1)
    assert w.slow.cancelled == 1
    assert w.state() == FINISHED
    assert w.outcome()["state"] == "failed"
    assert w.outcome()["error"] == "timed out after 5.0 s"
    assert w.runner.running_jobs() == []


def test_the_timer_is_cancelled_when_the_handler_ends(w):
    w.push(action="slow", args={}, timeout=5.0)
    w.link.answer(200, {"decision": "run"})
    w.slow.pending[0].callback({})
    assert w.clock.getDelayedCalls() == []
    assert w.outcome()["state"] == "succeeded"


def test_redelivery_while_accept_is_out_or_running_is_ignored(w):
    w.push(action="slow", args={})
    w.push(action="slow", args={})  # while the accept call is out
    assert w.link.paths() == [accept_path()]
    w.link.answer(200, {"decision": "run"})
    w.push(action="slow", args={})  # while it runs
    assert len(w.slow.pending) == 1
    assert w.link.paths() == [accept_path()]
    w.slow.pending[0].callback({"ok": 1})
    assert w.link.paths() == [accept_path(), result_path()]


def test_redelivery_after_finished_sends_the_result_again(w):
    w.push()
    w.link.answer(200, {"decision": "run"})
    w.link.refuse()  # the result did not get through
    assert w.state() == FINISHED
    w.push()
    assert w.link.paths() == [accept_path(), result_path(), result_path()]
    assert w.link.calls[1][2] == w.link.calls[2][2]
    assert len(w.echo.runs) == 1
    w.link.answer(200, {"stored": False})  # the server had it already: fine
    assert w.state() == ACKED


def test_redelivery_while_the_result_is_being_sent_sends_it_once(w):
    w.push()
    w.link.answer(200, {"decision": "run"})
    w.push()
    w.runner.flush()
    assert w.link.paths() == [accept_path(), result_path()]


def test_redelivery_after_acked_does_nothing(w):
    w.push()
    w.link.answer(200, {"decision": "run"})
    w.link.answer(200, {"stored": True})
    w.push()
    w.runner.flush()
    assert len(w.link.calls) == 2
    assert len(w.echo.runs) == 1


def test_a_new_runner_does_not_run_a_job_again(w):
    """After an agent restart a stored job is no longer on disk (its file went with the ack);
    pushed again, the agent asks the server, whose answer keeps it from running again."""
    w.push()
    w.link.answer(200, {"decision": "run"})
    w.link.answer(200, {"stored": True})
    assert not os.listdir(w.dir)
    w.ledger = Ledger(str(w.dir), fsync=False)
    w.runner = w.new_runner()
    w.push()
    assert w.link.paths()[-1] == accept_path()
    w.link.answer(200, {"decision": "unknown"})
    assert len(w.echo.runs) == 1


def test_recover_reports_interrupted_jobs(w):
    w.push(action="slow", args={})
    w.link.answer(200, {"decision": "run"})
    assert w.state() == STARTED
    # the agent stops here; a new one starts on the same state directory
    w.ledger = Ledger(str(w.dir), fsync=False)
    w.runner = w.new_runner()
    started = w.ledger.get("j1")["started"]
    w.runner.recover()
    outcome = w.outcome()
    assert outcome["state"] == "failed"
    assert outcome["error"].startswith("interrupted")
    assert outcome["started"] == started
    assert w.link.paths()[-1] == result_path()
    w.link.answer(200, {"stored": True})
    assert w.state() == ACKED


def test_recover_leaves_running_jobs_alone(w):
    w.push(action="slow", args={})
    w.link.answer(200, {"decision": "run"})
    w.runner.recover()
    assert w.state() == STARTED
    assert w.link.paths() == [accept_path()]


def test_redelivery_of_an_interrupted_job_reports_it(w):
    w.push(action="slow", args={})
    w.link.answer(200, {"decision": "run"})
    w.ledger = Ledger(str(w.dir), fsync=False)
    w.runner = w.new_runner()
    w.push(action="slow", args={})
    assert len(w.slow.pending) == 1  # not run again
    assert w.outcome()["error"].startswith("interrupted")


@pytest.mark.parametrize("how", ["call-failed", "status-500"])
def test_unacknowledged_results_stay_spooled_and_flush_resends(w, how):
    w.push()
    w.link.answer(200, {"decision": "run"})
    if how == "call-failed":
        w.link.refuse()
    else:
        w.link.answer(500, {"error": "internal server error"})
    assert w.state() == FINISHED
    assert [e["job"] for e in w.ledger.unacknowledged()] == ["j1"]
    w.runner.flush()
    assert w.link.paths() == [accept_path(), result_path(), result_path()]
    w.link.answer(200, {"stored": True})
    assert w.state() == ACKED
    w.runner.flush()
    assert len(w.link.calls) == 3


def test_flush_sends_every_spooled_result_oldest_first(w, monkeypatch):
    from tcm.agent import ledger as ledger_module

    times = iter(range(1000, 2000))
    monkeypatch.setattr(ledger_module, "time", SimpleNamespace(time=lambda: float(next(times))))
    for job in ("b", "a", "c"):
        w.push(job=job, action="no.such")
        w.link.refuse()
    w.link.calls.clear()
    w.runner.flush()
    assert w.link.paths() == [result_path("b"), result_path("a"), result_path("c")]


def test_output_chunks_have_increasing_seq(w):
    w.push(action="chatty", args={})
    w.link.answer(200, {"decision": "run"})
    outputs = [(p, b) for m, p, b, _ in w.link.calls if p.endswith("/output")]
    assert outputs == [
        ("/agent/v1/jobs/j1/output", {"seq": 1, "stream": "stdout", "text": "one\n"}),
        ("/agent/v1/jobs/j1/output", {"seq": 2, "stream": "stderr", "text": "two\n"}),
        ("/agent/v1/jobs/j1/output", {"seq": 3, "stream": "stdout", "text": "three\n"}),
    ]
    assert w.link.paths()[-1] == result_path()
    # a lost output chunk is not an error
    w.link.calls[1][3].errback(CallFailed("gone"))
    assert w.outcome()["result"] == {"lines": 3}


def test_jobs_run_independently(w):
    w.push(job="j1", action="slow", args={})
    w.push(job="j2", action="slow", args={})
    w.link.answer(200, {"decision": "run"}, index=0)
    w.link.answer(200, {"decision": "run"}, index=1)
    assert w.runner.running_jobs() == ["j1", "j2"]
    w.slow.pending[1].callback({"n": 2})
    assert w.runner.running_jobs() == ["j1"]
    assert w.state("j2") == FINISHED and w.state("j1") == STARTED


class QuickPing:
    """A quick action: neither a task nor streaming."""

    name = "quickping"
    streams = False
    task = False
    schema: dict = {"type": "object"}

    def __init__(self) -> None:
        self.runs = 0

    def run(self, context, args):
        self.runs += 1
        return {"pong": True}


def quick_runner(tmp_path):
    from twisted.internet.task import Clock

    from tcm.agent.ledger import Ledger
    from tcm.agent.runner import ActionRunner

    clock = Clock()
    clock.advance(1000.0)
    link = FakeLink()
    handler = QuickPing()
    runner = ActionRunner(
        {"quickping": handler}, Ledger(str(tmp_path), fsync=False), link, clock, None
    )
    return runner, link, handler, clock


def quick_request(job: str, expires: float):
    from tcm.protocol.envelope import Envelope

    return Envelope(
        type="action.request",
        id=f"req-{job}",
        expires=expires,
        data={"job": job, "action": "quickping", "args": {}},
    )


def test_a_quick_action_runs_without_the_accept_round_trip(tmp_path):
    runner, link, handler, _clock = quick_runner(tmp_path)
    runner.receive(quick_request("q1", 2000.0))
    assert handler.runs == 1
    assert link.paths() == ["POST /agent/v1/jobs/q1/result"]
    assert link.calls[0][2]["state"] == "succeeded"
    link.answer(200, {"stored": True})
    runner.receive(quick_request("q1", 2000.0))  # redelivered: the ledger knows it
    assert handler.runs == 1


def test_expiry_is_judged_on_the_server_clock(tmp_path):
    runner, link, handler, _clock = quick_runner(tmp_path)
    # this machine's clock says 1000; the server's says 1500: a request expiring at 1200
    # has expired, though it would not have on the local clock
    runner.learn_server_time(1500.0)
    runner.receive(quick_request("q2", 1200.0))
    assert handler.runs == 0
    assert link.calls[0][2]["state"] == "expired"
    # and the other way round: the server is behind, the request is still good
    runner.learn_server_time(800.0)
    runner.receive(quick_request("q3", 900.0))
    assert handler.runs == 1


# -- cancel (action.cancel from the server) ------------------------------------------------------


def test_cancel_ends_a_running_handler_reported_canceled(w):
    w.push(action="slow", args={})
    w.link.answer(200, {"decision": "run"})
    assert w.runner.cancel("j1", "canceled by admin") is True
    assert w.slow.cancelled == 1  # the handler's canceller ran (command.run kills its group)
    assert w.state() == FINISHED
    assert w.outcome()["state"] == "canceled"
    assert w.outcome()["error"] == "canceled by admin"
    assert w.runner.running_jobs() == []
    assert w.link.paths()[-1] == result_path()


def test_cancel_while_the_accept_is_out_does_not_start_it(w):
    w.push(action="slow", args={})
    assert w.runner.cancel("j1", "canceled by admin") is True
    w.link.answer(200, {"decision": "run"}, index=0)
    assert w.slow.contexts == []  # never started
    assert w.outcome()["state"] == "canceled"


def test_cancel_of_a_job_not_running_here_does_nothing(w):
    assert w.runner.cancel("nope") is False
    w.push()
    w.link.answer(200, {"decision": "run"})
    assert w.runner.cancel("j1") is False  # finished already: its result stands
    assert w.outcome()["state"] == "succeeded"


def test_a_timeout_is_still_a_timeout_not_a_cancel(w):
    w.push(action="slow", args={}, timeout=1.0)
    w.link.answer(200, {"decision": "run"})
    w.clock.advance(1.0)
    assert w.outcome()["state"] == "failed"


def test_stop_ends_handlers_and_leaves_them_interrupted(w):
    w.push(action="slow", args={})
    w.link.answer(200, {"decision": "run"})
    w.runner.stop()
    assert w.slow.cancelled == 1  # the command's group ends with the agent
    assert w.state() == STARTED  # the next start reports it interrupted, as after a kill
    again = w.new_runner()
    again.recover()
    assert w.outcome()["state"] == "failed"
    assert "interrupted" in w.outcome()["error"]


def test_activity_is_told_when_a_session_opens_a_job_concludes_and_its_result_is_stored(w):
    told: list[str | None] = []
    w.runner = ActionRunner(
        w.handlers,
        w.ledger,
        w.link,
        w.clock,
        FilePath(str(w.dir.parent)),
        activity=lambda: told.append(w.state()),
    )
    w.runner.session_opened({})
    assert told == [None]
    w.push()
    w.link.answer(200, {"decision": "run"})
    assert told == [None, FINISHED]  # concluded and spooled
    w.link.answer(200, {"stored": True})
    assert told == [None, FINISHED, ACKED]
