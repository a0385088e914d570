"""Schedules (tcm/schedule.py) and the agent's ScheduledRun, on a fake clock."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tcm.agent.policies import ScheduledRun
from tcm.schedule import Cron, Schedule, ScheduleError


def local(*fields: int) -> float:
    return time.mktime((*fields, 0, 0, -1))


def test_every():
    s = Schedule.parse({"every": 90})
    assert s.next_after(1000.0) == 1090.0


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"every": 10, "cron": "* * * * *"},
        {"every": 0},
        {"every": True},
        {"cron": 5},
        {"cron": "* * * *"},
        {"cron": "61 * * * *"},
        {"cron": "*/0 * * * *"},
        {"cron": "a * * * *"},
        {"cron": "5-1 * * * *"},
        "every minute",
    ],
)
def test_bad_schedules_say_why(spec):
    with pytest.raises(ScheduleError):
        Schedule.parse(spec)


def test_cron_next_minute_hour_and_day():
    cron = Cron.parse("30 2 * * *")
    assert cron.next_after(local(2026, 3, 10, 1, 0, 0)) == local(2026, 3, 10, 2, 30, 0)
    assert cron.next_after(local(2026, 3, 10, 2, 30, 0)) == local(2026, 3, 11, 2, 30, 0)
    every_15 = Cron.parse("*/15 * * * *")
    assert every_15.next_after(local(2026, 3, 10, 1, 7, 12)) == local(2026, 3, 10, 1, 15, 0)


def test_cron_weekdays_and_days_of_month():
    mondays = Cron.parse("0 9 * * 1")  # 2026-03-09 is a Monday
    assert mondays.next_after(local(2026, 3, 10, 0, 0, 0)) == local(2026, 3, 16, 9, 0, 0)
    sundays = Cron.parse("0 0 * * 7")
    assert sundays.next_after(local(2026, 3, 10, 0, 0, 0)) == local(2026, 3, 15, 0, 0, 0)
    # both day fields restricted: either matches (cron's rule)
    either = Cron.parse("0 0 1 * 1")
    assert either.next_after(local(2026, 3, 10, 0, 0, 0)) == local(2026, 3, 16, 0, 0, 0)
    feb29 = Cron.parse("0 0 29 2 *")
    assert feb29.next_after(local(2026, 3, 1, 0, 0, 0)) == local(2028, 2, 29, 0, 0, 0)


@given(st.integers(0, 59), st.integers(0, 23), st.floats(1.7e9, 1.9e9))
def test_cron_next_is_later_and_matches(minute, hour, t):
    at = Cron.parse(f"{minute} {hour} * * *").next_after(t)
    tm = time.localtime(at)
    assert at > t and at - t <= 2 * 86400
    assert (tm.tm_hour, tm.tm_min, tm.tm_sec) == (hour, minute, 0)


def test_scheduled_run_on_a_clock_never_overlaps_and_stops():
    clock = Clock()
    runs: list[Deferred] = []

    def run() -> Deferred:
        d: Deferred = Deferred()
        runs.append(d)
        return d

    s = ScheduledRun(clock, Schedule.parse({"every": 10}), run, "test").start(now=True)
    clock.advance(0)
    assert len(runs) == 1
    clock.advance(30)  # the first run is still going: no second one
    assert len(runs) == 1
    runs[0].callback(None)
    clock.advance(9.9)
    assert len(runs) == 1
    clock.advance(0.1)
    assert len(runs) == 2
    runs[1].callback(None)
    s.stop()
    clock.advance(100)
    assert len(runs) == 2 and s.runs == 2


def test_scheduled_run_not_now_waits_for_the_schedule_and_survives_failures():
    clock = Clock()
    calls = []

    def run() -> None:
        calls.append(clock.seconds())
        raise RuntimeError("boom")

    ScheduledRun(clock, Schedule.parse({"every": 5}), run, "test").start(now=False)
    clock.advance(4)
    assert calls == []
    clock.advance(1)
    clock.advance(5)
    assert calls == [5.0, 10.0]
