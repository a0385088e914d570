"""Keeps Python's full garbage collections off the objects a server keeps for long.

A server with ten thousand sessions holds millions of objects that live for hours (sessions,
their connections, the working set). CPython's full collection walks all of them, and a push
to every agent triggers one or two (each result leaves objects behind until its transaction
commits): a third of the server's CPU for a push, measured with `bench/session_memory.py
--jobs` (0.4 of 1.2 s per 2,000 results, two full collections).

`HeapSettler` moves what has survived a full collection out of the collector's sight
(`gc.freeze`) once the population has settled after a change (a fleet connecting) and every
ten minutes. Later full collections walk only what is younger. What was
frozen and has since become unreachable as a cycle (a session that closed) is not collected
until the next settling, which first gives everything back (`gc.unfreeze`) and collects:
memory is reclaimed at most one interval late, never lost.

`QuietSettler` does the same for a process that holds one agent, which has no population to
watch: it settles once things have been quiet for a few seconds after its start, the opening
of a session or a job (docs/performance.md, "Lean agent": 1.1 MiB of an idle agent's RSS).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from tcm.process import release_memory

CHECK_EVERY = 5.0  # seconds between looks at the population
SETTLE_AT_MOST_EVERY = 600.0  # seconds: settle at least this often anyway
GROWTH = 0.1  # settle early when the population changed by this fraction ...
MIN_CHANGE = 1000  # ... and at least this many, ...
STEADY = 0.01  # ... once it moved by less than this fraction between two looks ...
STEADY_WAIT = 30.0  # ... or this many seconds after the change was first seen
# Allocations between two young collections in a server (CPython's default: 700). Every
# result leaves a hundred or so container objects behind until its commit's callbacks have
# run; at 700 a push of a thousand results made ~150 young collections, and every hundredth
# allocation batch cascaded into a full one over whatever was not frozen yet: up to half of
# the server's CPU per result two seconds after a fleet connected (bench/link_ingest.py,
# docs/performance.md, issue 17). Unreachable cycles then wait for at most this many
# allocations (a few megabytes) before they are collected.
YOUNG_COLLECTION_EVERY = 10_000
QUIET = 10.0  # QuietSettler: seconds without activity before it settles ...
AT_LATEST = 60.0  # ... or this many after the first activity not settled for yet


def settle_heap(release: Callable[[], object] = release_memory) -> float:
    """Give back what was frozen, collect everything, freeze what survived, and give the
    memory freed meanwhile back to the system (`release`: glibc's malloc_trim); the seconds
    it took (one full collection and one trim).

    The trim: a fleet's handshakes leave free chunks between the sessions' long-lived
    allocations that glibc keeps; given back, an idle session costs ~3.5 KB less RSS
    (`bench/session_memory.py --trim`, 10,000 sessions)."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release()
    return time.perf_counter() - started


_log = Logger(namespace="tcm.heap")


def load_then_settle(
    load: Callable[[], Deferred[Any]], release: Callable[[], object] = release_memory
) -> Deferred[Any]:
    """Run `load` (a start's bulk read of its working set: a server's agents, tokens, jobs)
    with the cyclic collector paused, then settle the heap (`settle_heap`), whether the load
    succeeded or failed; fires with what `load` gave.

    Every few hundred allocations the collector runs, and as ten thousand agents' rows are
    read and kept it walks the growing heap again and again: half of the time of reading
    them (0.33 s paused against 0.7 s, 10,000 agents, measured on the store's own query).
    Settled before the listeners open, the working set is frozen out of the full collections
    that a reconnect storm, right after, triggers as its sessions pile up."""
    enabled = gc.isenabled()
    gc.disable()

    def settle(result: Any) -> Any:
        if enabled:
            gc.enable()
        took = settle_heap(release)
        _log.debug(
            "heap settled after the start's load in {took:.3f} s ({n} objects frozen)",
            took=took,
            n=gc.get_freeze_count(),
        )
        return result

    return maybeDeferred(load).addBoth(settle)


class HeapSettler(TimerService):
    """Settles the heap whenever `population()` (the number of sessions) has changed by a
    tenth and at least a thousand since the last settling and then holds steady between two
    looks (every 5 s), so that a fleet that just connected is settled within seconds of its
    last session, not in the middle of its first push (issue 17: a full collection of ten
    thousand young sessions costs a push more than its results); at the latest 30 s after
    the change was seen; and every ten minutes anyway. While it runs, young collections come
    every `YOUNG_COLLECTION_EVERY` allocations instead of 700. Gives everything back at
    stop."""

    _log = Logger()

    def __init__(
        self,
        population: Callable[[], int] = lambda: 0,
        clock: Any = None,
        check_every: float = CHECK_EVERY,
        settle_every: float = SETTLE_AT_MOST_EVERY,
    ):
        super().__init__(check_every, self._check)
        if clock is not None:
            self.clock = clock
        self._population = population
        self._settle_every = settle_every
        self._settled_at: float | None = None
        self._settled_population = 0
        self._last_population = 0
        self._changed_at: float | None = None  # when the change to settle for was first seen
        self._threshold = gc.get_threshold()  # the collector's, given back at stop

    def _check(self) -> None:
        now = self.clock.seconds() if self.clock is not None else time.monotonic()
        population = self._population()
        last, self._last_population = self._last_population, population
        if self._settled_at is None:  # at start: nothing long-lived yet but the code itself
            self._settled_at = now
            self._settled_population = population
            return
        change = abs(population - self._settled_population)
        due = now - self._settled_at >= self._settle_every
        if change >= max(MIN_CHANGE, GROWTH * self._settled_population):
            if self._changed_at is None:
                self._changed_at = now
            steady = abs(population - last) <= STEADY * population
            due = due or steady or now - self._changed_at >= STEADY_WAIT
        if due:
            took = settle_heap()
            self._settled_at = now
            self._settled_population = population
            self._changed_at = None
            self._log.debug(
                "heap settled in {took:.3f} s ({n} objects frozen, population {p})",
                took=took,
                n=gc.get_freeze_count(),
                p=population,
            )

    def startService(self):
        self._threshold = gc.get_threshold()
        gc.set_threshold(max(YOUNG_COLLECTION_EVERY, self._threshold[0]), *self._threshold[1:])
        super().startService()

    def stopService(self):
        d = super().stopService()
        gc.unfreeze()
        gc.set_threshold(*self._threshold)
        return d


class QuietSettler:
    """Settles the heap (`settle_heap`) once, `quiet` seconds after the last `poke()` (an
    agent's start, a session opened, a job concluded or its result acknowledged), and at the
    latest `at_latest` seconds after the first poke not settled for yet (a job every few
    seconds). No timer runs while nothing happens: an idle agent wakes for none.

    What it gives back in an agent process is what starting leaves behind: the cycles of
    imports, enrollment and handshakes, and the free C heap they leave (malloc_trim); the
    freeze keeps later full collections off the objects that live as long as the process."""

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        quiet: float = QUIET,
        at_latest: float = AT_LATEST,
        settle: Callable[[], float] = settle_heap,
    ):
        self._clock = clock
        self._quiet = quiet
        self._at_latest = at_latest
        self._settle = settle
        self._call: Any = None
        self._first: float | None = None  # the first poke since the last settling
        self.settled = 0  # how many times it settled

    def poke(self) -> None:
        """Something happened: settle once it has been quiet for a while."""
        now = self._clock.seconds()
        if self._first is None:
            self._first = now
        delay = max(0.0, min(now + self._quiet, self._first + self._at_latest) - now)
        if self._call is not None and self._call.active():
            self._call.reset(delay)
        else:
            self._call = self._clock.callLater(delay, self._fire)

    @property
    def pending(self) -> bool:
        """Whether a settling is scheduled."""
        return self._call is not None and self._call.active()

    def _fire(self) -> None:
        self._call = None
        self._first = None
        took = self._settle()
        self.settled += 1
        self._log.debug(
            "heap settled in {took:.3f} s ({n} objects frozen)", took=took, n=gc.get_freeze_count()
        )

    def stop(self) -> None:
        """No settling after this; what was frozen is given back to the collector."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._first = None
        gc.unfreeze()
