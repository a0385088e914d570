"""Schedules of policies: every N seconds, or a cron line. Pure: no reactor, no I/O.

A cron line has five fields, minute hour day-of-month month day-of-week, each `*`, `*/n`,
`a`, `a-b`, `a-b/n` or a comma list of those (day-of-week 0-7, 0 and 7 are Sunday). As in
cron, when both day fields are restricted a day matches if either does. Times are local.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("dow", 0, 7))
_HORIZON_DAYS = 366 * 5  # Feb 29 on a Monday recurs within 28 years; five years is plenty


class ScheduleError(ValueError):
    """A schedule that cannot be understood; the message says which part."""


def _field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, _, step_text = part.partition("/")
            if not step_text.isdigit() or int(step_text) < 1:
                raise ScheduleError(f"cron {name}: bad step {step_text!r}")
            step = int(step_text)
        if part == "*":
            start, end = low, high
        elif "-" in part:
            a, _, b = part.partition("-")
            if not (a.isdigit() and b.isdigit()):
                raise ScheduleError(f"cron {name}: bad range {part!r}")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
            if step != 1:
                end = high
        else:
            raise ScheduleError(f"cron {name}: bad value {part!r}")
        if not low <= start <= end <= high:
            raise ScheduleError(f"cron {name}: {part!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@attrs.frozen
class Cron:
    """A parsed cron line."""

    minute: frozenset[int]
    hour: frozenset[int]
    day: frozenset[int]
    month: frozenset[int]
    dow: frozenset[int]
    day_any: bool
    dow_any: bool

    @classmethod
    def parse(cls, line: str) -> Cron:
        parts = line.split()
        if len(parts) != 5:
            raise ScheduleError(
                f"a cron line has 5 fields (minute hour day month weekday), not {len(parts)}"
            )
        sets = [_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
        dow = frozenset(d % 7 for d in sets[4])
        return cls(sets[0], sets[1], sets[2], sets[3], dow, parts[2] == "*", parts[4] == "*")

    def _day_matches(self, tm: time.struct_time) -> bool:
        dom = tm.tm_mday in self.day
        dow = (tm.tm_wday + 1) % 7 in self.dow  # struct_time: Monday 0; cron: Sunday 0
        if self.day_any or self.dow_any:
            return dom and dow
        return dom or dow

    def next_after(self, t: float) -> float:
        """The first matching minute strictly after epoch time `t` (local time)."""
        start = (int(t) // 60 + 1) * 60
        day = time.localtime(start)
        day_start = start - (day.tm_hour * 3600 + day.tm_min * 60 + day.tm_sec)
        for d in range(_HORIZON_DAYS):
            midnight = time.mktime((day.tm_year, day.tm_mon, day.tm_mday + d, 0, 0, 0, 0, 0, -1))
            tm = time.localtime(midnight)
            if tm.tm_mon not in self.month or not self._day_matches(tm):
                continue
            for hour in sorted(self.hour):
                for minute in sorted(self.minute):
                    at = time.mktime((tm.tm_year, tm.tm_mon, tm.tm_mday, hour, minute, 0, 0, 0, -1))
                    if at >= start and at >= day_start:
                        return at
        raise ScheduleError("the cron line never matches")


@attrs.frozen
class Schedule:
    """When a policy runs: every `every` seconds, or at the minutes `cron` matches."""

    every: float | None = None
    cron: Cron | None = None

    @classmethod
    def parse(cls, spec: Any) -> Schedule:
        if not isinstance(spec, dict):
            raise ScheduleError("a schedule is an object with 'every' or 'cron'")
        every, cron = spec.get("every"), spec.get("cron")
        if (every is None) == (cron is None):
            raise ScheduleError("a schedule needs exactly one of 'every' (seconds) or 'cron'")
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, (int, float)) or every < 1:
                raise ScheduleError("'every' must be a number of seconds, at least 1")
            return cls(every=float(every))
        if not isinstance(cron, str):
            raise ScheduleError("'cron' must be a string")
        return cls(cron=Cron.parse(cron))

    def next_after(self, t: float) -> float:
        if self.every is not None:
            return t + self.every
        assert self.cron is not None
        return self.cron.next_after(t)
