"""The job target state machine and the server's working set of unfinished targets."""

from __future__ import annotations

import itertools

import pytest

from tcm.protocol.envelope import decode
from tcm.server.jobs import (
    ACTIVE,
    NOT_STARTED,
    TERMINAL,
    Accept,
    Change,
    InvalidTransition,
    Job,
    JobBook,
    TargetState,
    summarize,
    transition,
)

S = TargetState
P, D, R, OK, F, X = S.PENDING, S.DELIVERED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.EXPIRED
C, U = S.CANCELED, S.UNSUPPORTED

# The state diagram of the docs, written out independently of the code's table.
ALLOWED = {
    (P, D), (P, R), (P, X), (P, OK), (P, F), (P, C), (P, U),
    (D, R), (D, X), (D, OK), (D, F), (D, C),
    (R, OK), (R, F), (R, C),
}  # fmt: skip
ALL_PAIRS = list(itertools.product(TargetState, TargetState))


@pytest.mark.parametrize(("current", "new"), sorted(ALLOWED))
def test_allowed_transitions(current, new):
    assert transition(current, new) is new


@pytest.mark.parametrize(("current", "new"), [pair for pair in ALL_PAIRS if pair not in ALLOWED])
def test_forbidden_transitions(current, new):
    with pytest.raises(InvalidTransition) as info:
        transition(current, new)
    assert str(info.value) == f"{current.value} -> {new.value}"


def test_state_groups():
    assert TERMINAL == {OK, F, X, C, U}
    assert NOT_STARTED == {P, D}
    assert ACTIVE == {P, D, R}
    assert all(not any(transition_ok(t, n) for n in TargetState) for t in TERMINAL)


def transition_ok(current, new) -> bool:
    try:
        transition(current, new)
    except InvalidTransition:
        return False
    return True


def job(job_id="j1", created=100.0, ttl=60.0, **kw) -> Job:
    return Job(
        id=job_id,
        action="ping",
        args={"echo": "hi"},
        created_at=created,
        expires_at=created + ttl,
        **kw,
    )


# -- Job ------------------------------------------------------------------------------------


def test_frame_is_encoded_once_and_decodes_to_the_request():
    j = job(timeout=5.0)
    first = j.frame()
    assert j.frame() is first
    env = decode(first)
    assert env.type == "action.request"
    assert env.id == "req-j1"
    assert env.expires == 160.0
    assert env.data == {"job": "j1", "action": "ping", "args": {"echo": "hi"}, "timeout": 5.0}
    assert env == j.request()


def test_request_without_timeout_has_none():
    env = decode(job().frame())
    assert "timeout" not in env.data


def test_job_expiry():
    j = job()
    assert not j.is_expired(159.99)
    assert j.is_expired(160.0)


# -- JobBook --------------------------------------------------------------------------------


def book_with(*jobs_and_targets) -> JobBook:
    book = JobBook()
    for j, targets in jobs_and_targets:
        book.add(j, targets)
    return book


def test_add_tracks_only_unfinished_targets():
    book = book_with((job(), {"a": P, "b": OK, "c": R}))
    assert book.active_targets("j1") == {"a": P, "c": R}
    assert book.state("j1", "b") is None
    assert book.state("j1", "zz") is None
    assert book.state("nope", "a") is None


def test_add_of_a_finished_job_is_ignored():
    book = book_with((job(), {"a": OK, "b": X}))
    assert book.jobs == {}
    assert book.deliverable("a", 0.0) == []


def test_deliverable_oldest_first_and_only_for_that_agent():
    old, new = job("old", created=10.0, ttl=1000), job("new", created=20.0, ttl=1000)
    book = book_with((new, {"a": P}), (old, {"a": D, "b": P}))
    assert book.deliverable("a", 30.0) == [old, new]
    assert book.deliverable("b", 30.0) == [old]
    assert book.deliverable("c", 30.0) == []


def test_expired_jobs_are_not_deliverable_unless_running():
    book = book_with((job("p"), {"a": P}), (job("d"), {"a": D}), (job("r"), {"a": R}))
    assert {j.id for j in book.deliverable("a", 159.0)} == {"p", "d", "r"}
    assert [j.id for j in book.deliverable("a", 160.0)] == ["r"]


def test_delivered_moves_only_pending_targets():
    book = book_with((job(), {"a": P, "b": D, "c": R}))
    changes = book.delivered("j1", ["a", "b", "c", "unknown"], 120.0)
    assert changes == [Change("j1", "a", D, 120.0)]
    assert book.active_targets("j1") == {"a": D, "b": D, "c": R}
    assert book.delivered("j1", ["a"], 121.0) == []
    assert book.delivered("no-such-job", ["a"], 121.0) == []


@pytest.mark.parametrize("state", [P, D])
def test_accept_runs_a_not_started_target(state):
    book = book_with((job(), {"a": state}))
    assert book.accept("j1", "a", 150.0) == (Accept.RUN, [Change("j1", "a", R, 150.0)])
    assert book.state("j1", "a") is R


def test_accept_when_already_running_is_idempotent():
    book = book_with((job(), {"a": P}))
    book.accept("j1", "a", 150.0)
    assert book.accept("j1", "a", 151.0) == (Accept.RUN, [])
    assert book.accept("j1", "a", 500.0) == (Accept.RUN, [])  # even past the TTL
    assert book.state("j1", "a") is R


@pytest.mark.parametrize("state", [P, D])
def test_accept_after_the_ttl_expires_the_target(state):
    book = book_with((job(), {"a": state, "b": P}))
    decision, changes = book.accept("j1", "a", 160.0)
    assert decision is Accept.EXPIRED
    assert changes == [Change("j1", "a", X, 160.0)]
    assert book.state("j1", "a") is None  # finished: gone from the working set
    assert book.accept("j1", "a", 161.0) == (Accept.UNKNOWN, [])
    assert book.deliverable("a", 100.0) == []


def test_accept_unknown():
    book = book_with((job(), {"a": P}))
    assert book.accept("j1", "b", 120.0) == (Accept.UNKNOWN, [])
    assert book.accept("j2", "a", 120.0) == (Accept.UNKNOWN, [])


def test_finish_records_once():
    book = book_with((job(), {"a": R, "b": P}))
    assert book.finish("j1", "a", OK, 130.0) == [Change("j1", "a", OK, 130.0)]
    # the same result redelivered: nothing more to store
    assert book.finish("j1", "a", OK, 131.0) == []
    assert book.finish("j1", "a", F, 131.0) == []
    assert book.state("j1", "b") is P


def test_finish_checks_the_transition():
    book = book_with((job(), {"a": R}))
    with pytest.raises(InvalidTransition):
        book.finish("j1", "a", X, 130.0)  # a running job cannot expire
    assert book.state("j1", "a") is R


@pytest.mark.parametrize("state", [P, D])
@pytest.mark.parametrize("final", [OK, F, X])
def test_finish_a_not_started_target(state, final):
    book = book_with((job(), {"a": state}))
    assert book.finish("j1", "a", final, 130.0) == [Change("j1", "a", final, 130.0)]


def test_expire_touches_only_not_started_targets_of_expired_jobs():
    live = job("live", created=100.0, ttl=1000.0)
    book = book_with((job(), {"p": P, "d": D, "r": R}), (live, {"p": P}))
    assert book.expire(159.0) == []
    changes = book.expire(160.0)
    assert sorted(changes, key=lambda c: c.agent_id) == [
        Change("j1", "d", X, 160.0),
        Change("j1", "p", X, 160.0),
    ]
    assert book.active_targets("j1") == {"r": R}
    assert book.active_targets("live") == {"p": P}
    assert book.expire(161.0) == []


def test_a_job_leaves_the_book_once_all_targets_are_finished():
    book = book_with((job(), {"a": P, "b": P, "c": D}))
    book.accept("j1", "a", 110.0)
    book.finish("j1", "a", OK, 111.0)
    book.finish("j1", "b", F, 112.0)
    assert "j1" in book.jobs
    book.accept("j1", "c", 170.0)  # expired
    assert "j1" not in book.jobs
    assert book.active_targets("j1") == {}
    for agent in "abc":
        assert book.deliverable(agent, 0.0) == []
    assert book._by_agent == {}  # no leftovers per agent either


def test_agents_keep_their_other_jobs():
    book = book_with((job("j1"), {"a": R}), (job("j2", created=101.0), {"a": P}))
    book.finish("j1", "a", OK, 120.0)
    assert [j.id for j in book.deliverable("a", 120.0)] == ["j2"]


# -- summarize ---------------------------------------------------------------------------------


def test_summarize_counts_and_progress():
    counts = summarize(
        [
            "pending",
            "delivered",
            "running",
            "running",
            "succeeded",
            "failed",
            "expired",
            "succeeded",
        ]
    )
    assert counts == {
        "pending": 1, "delivered": 1, "running": 2, "succeeded": 2, "failed": 1, "expired": 1,
        "canceled": 0, "unsupported": 0, "not_connected": 0,
        "in_progress": 3, "completed": 4, "total": 8, "progress": 50.0,
    }  # fmt: skip


def test_summarize_counts_canceled_unsupported_and_not_connected_apart():
    counts = summarize(
        ["pending", "pending", "pending", "canceled", "unsupported", "succeeded"],
        not_connected=2,
    )
    assert counts["pending"] == 1  # queued for a reachable agent
    assert counts["not_connected"] == 2
    assert counts["canceled"] == 1
    assert counts["unsupported"] == 1
    assert counts["completed"] == 3
    assert counts["total"] == 6


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_splits_not_started_from_running():
    book = JobBook()
    book.add(job(), {"a": P, "b": D, "c": R})
    not_started, running = book.cancel("j1", None, 110.0)
    assert not_started == ["a", "b"]
    assert running == ["c"]
    assert book.state("j1", "c") is R  # until its agent reports
    assert book.cancel_asked("c") == ["j1"]
    assert book.cancel_asked("a") == []


def test_cancel_of_some_agents_only():
    book = JobBook()
    book.add(job(), {"a": P, "b": P})
    assert book.cancel("j1", ["b", "zz"], 110.0) == (["b"], [])


def test_canceled_targets_are_never_delivered_after():
    book = JobBook()
    book.add(job(), {"a": P, "b": R})
    not_started, _ = book.cancel("j1", None, 110.0)
    for agent_id in not_started:
        book.finish("j1", agent_id, C, 110.0)
    assert book.deliverable("a", 110.0) == []
    assert book.delivered("j1", ["a"], 111.0) == []
    assert book.accept("j1", "a", 111.0)[0] is Accept.UNKNOWN
    book.finish("j1", "b", C, 112.0)  # the agent reports its handler ended
    assert book.cancel_asked("b") == []
    assert "j1" not in book.jobs


def test_not_started_lists_pending_targets():
    book = JobBook()
    book.add(job(), {"a": P, "b": D, "c": R})
    assert book.not_started("j1") == ["a"]


def test_summarize_rounds_progress():
    assert summarize(["succeeded", "pending", "pending"])["progress"] == 33.3
    assert summarize(["succeeded", "succeeded", "pending"])["progress"] == 66.7


def test_summarize_of_nothing_is_complete():
    counts = summarize([])
    assert counts["total"] == 0
    assert counts["progress"] == 100.0
    assert counts["completed"] == 0


def test_summarize_accepts_enum_members():
    assert summarize([OK, P])["succeeded"] == 1
    assert summarize([OK, P])["pending"] == 1
