"""tcm.heap: long-lived objects kept out of full collections, never leaked."""

from __future__ import annotations

import gc
import weakref

import pytest
from twisted.internet.task import Clock

from tcm import heap
from tcm.agent.config import AgentConfig
from tcm.agent.service import AgentService, make_agent_service
from tcm.heap import HeapSettler, QuietSettler, load_then_settle, settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector can free it


@pytest.fixture(autouse=True)
def _unfrozen():
    yield
    gc.unfreeze()


def test_settling_freezes_what_lives_and_reclaims_dead_cycles_at_the_next_one():
    node = _Node()
    ref = weakref.ref(node)
    settle_heap()
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()
    assert ref() is not None  # frozen: full collections no longer look at it
    settle_heap()
    assert ref() is None  # the next settling gives it back and collects it


def test_settling_gives_freed_memory_back_after_the_collection():
    steps = []
    node = _Node()
    ref = weakref.ref(node)
    del node
    settle_heap(release=lambda: steps.append(("released", ref() is None)))
    assert steps == [("released", True)]  # trimmed once, after the cycle was collected


def test_a_start_s_load_runs_with_the_collector_paused_then_settles():
    from twisted.internet.defer import Deferred

    loading: Deferred[str] = Deferred()
    seen = []
    done = load_then_settle(lambda: loading, release=lambda: seen.append("released"))
    done.addCallback(seen.append)
    assert not gc.isenabled()  # paused while the working set is read
    kept = _Node()  # the working set: lives on
    dead = weakref.ref(_Node())  # garbage of the load: a cycle left for the collector
    loading.callback("loaded")
    assert gc.isenabled()
    assert seen == ["released", "loaded"]  # settled (collected, frozen, trimmed), then fired
    assert dead() is None
    assert gc.get_freeze_count() > 0 and kept is not None


def test_a_failed_load_gives_the_collector_back_and_fails():
    from twisted.internet.defer import fail

    failures = []
    load_then_settle(lambda: fail(ValueError("no store")), release=lambda: None).addErrback(
        failures.append
    )
    assert gc.isenabled()
    assert [f.type for f in failures] == [ValueError]


def test_a_collector_paused_before_the_load_stays_paused():
    from twisted.internet.defer import succeed

    gc.disable()
    try:
        load_then_settle(lambda: succeed(None), release=lambda: None)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_settler_settles_when_the_population_changes_and_every_interval():
    clock = Clock()
    population = [0]
    settler = HeapSettler(lambda: population[0], clock=clock, check_every=30, settle_every=600)
    settler.startService()
    try:
        assert gc.get_freeze_count() == 0  # nothing at start: nothing long-lived yet
        node = _Node()
        ref = weakref.ref(node)
        clock.advance(30)  # nothing changed: not settled again, node stays young
        del node
        gc.collect()
        assert ref() is None

        node = _Node()
        ref = weakref.ref(node)
        population[0] = 999
        clock.advance(30)  # fewer than a thousand more: not yet
        del node
        gc.collect()
        assert ref() is None

        node = _Node()
        ref = weakref.ref(node)
        population[0] = 5000  # a fleet connecting: not while it grows ...
        clock.advance(30)
        assert gc.get_freeze_count() == 0
        population[0] = 5020  # ... settled once it holds steady between two looks
        clock.advance(30)
        del node
        gc.collect()
        assert ref() is not None  # frozen with the rest
        population[0] = 5100  # under a tenth more: not settled on that account ...
        clock.advance(30)
        assert ref() is not None
        clock.advance(600)  # ... but ten minutes on, anyway: given back and collected
        assert ref() is None
    finally:
        settler.stopService()
    assert gc.get_freeze_count() == 0


def test_settler_settles_a_growing_population_at_the_latest_after_the_wait():
    clock = Clock()
    population = [0]
    settler = HeapSettler(lambda: population[0], clock=clock, check_every=5, settle_every=600)
    settler.startService()
    try:
        for step in range(1, 6):  # a fleet still connecting, 2,000 more every look
            population[0] = 2000 * step
            clock.advance(5)
        assert gc.get_freeze_count() == 0  # first seen at 5 s, 20 s ago: not yet
        population[0] = 12000
        clock.advance(5)
        assert gc.get_freeze_count() == 0
        population[0] = 14000
        clock.advance(5)  # 30 s after the change was first seen: settled anyway
        assert gc.get_freeze_count() > 0
    finally:
        settler.stopService()
    assert gc.get_freeze_count() == 0


def test_quiet_settler_settles_once_quiet_after_the_last_poke():
    clock = Clock()
    settled: list[float] = []
    settler = QuietSettler(
        clock, quiet=10, at_latest=60, settle=lambda: settled.append(clock.seconds())
    )
    assert clock.getDelayedCalls() == []  # nothing happened: no timer at all
    settler.poke()
    assert settler.pending
    clock.advance(9)
    settler.poke()  # more activity: wait again
    clock.advance(9)
    assert settled == []
    clock.advance(1)
    assert settled == [19] and settler.settled == 1 and not settler.pending
    assert clock.getDelayedCalls() == []  # idle again: no timer


def test_quiet_settler_settles_at_the_latest_after_a_while_of_steady_activity():
    clock = Clock()
    settled: list[float] = []
    settler = QuietSettler(
        clock, quiet=10, at_latest=60, settle=lambda: settled.append(clock.seconds())
    )
    for _ in range(30):  # a job every 5 s for 150 s: never quiet for 10 s
        settler.poke()
        clock.advance(5)
    assert settled == [60, 120]  # 60 s after the first poke, then 60 s after the next one
    clock.advance(5)
    assert settled == [60, 120, 155]  # quiet 10 s after the last one
    settler.stop()


def test_quiet_settler_really_settles_and_stop_gives_everything_back():
    clock = Clock()
    settler = QuietSettler(clock, quiet=1)
    node = _Node()
    ref = weakref.ref(node)
    settler.poke()
    clock.advance(1)
    assert gc.get_freeze_count() > 0
    del node
    settler.poke()
    settler.stop()
    assert clock.getDelayedCalls() == []
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_only_an_agent_with_the_process_to_itself_settles_the_heap(tmp_path):
    config = AgentConfig(state_dir=str(tmp_path))
    assert isinstance(make_agent_service(config, Clock()).settler, QuietSettler)  # twistd
    assert AgentService(config, Clock(), handlers={}, policy_handlers={}).settler is None  # swarm


def test_a_running_settler_makes_young_collections_rarer_and_gives_the_setting_back():
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        settler = HeapSettler(lambda: 0, clock=Clock())
        settler.startService()
        assert gc.get_threshold() == (heap.YOUNG_COLLECTION_EVERY, 10, 10)
        settler.stopService()
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(50_000, 5, 5)  # a process tuned higher already keeps its own
        settler = HeapSettler(lambda: 0, clock=Clock())
        settler.startService()
        assert gc.get_threshold() == (50_000, 5, 5)
        settler.stopService()
    finally:
        gc.set_threshold(*before)
