"""tcm.server.heap: long-lived objects kept out of full collections, never leaked."""

from __future__ import annotations

import gc
import weakref

import pytest
from twisted.internet.task import Clock

from tcm.server.heap import HeapSettler, settle_heap


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
        population[0] = 5000  # a fleet connected: settled at the next look
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
