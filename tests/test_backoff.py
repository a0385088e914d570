"""Reconnect delays: capped exponential backoff, jitter applied after the cap."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcm.agent.backoff import (
    DEFAULT_FACTOR,
    DEFAULT_INITIAL,
    DEFAULT_MAX_DELAY,
    backoff_policy,
)


def test_no_jitter_at_the_top_is_the_full_delay():
    policy = backoff_policy(1.0, 2.0, 60.0, jitter=lambda: 1.0)
    assert [policy(n) for n in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]


def test_delays_grow_by_the_factor():
    policy = backoff_policy(0.5, 3.0, 1e9, jitter=lambda: 1.0)
    delays = [policy(n) for n in range(10)]
    for a, b in zip(delays, delays[1:], strict=False):
        assert b == pytest.approx(3.0 * a)


def test_jitter_zero_is_half_the_delay():
    policy = backoff_policy(1.0, 2.0, 60.0, jitter=lambda: 0.0)
    assert [policy(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize("jitter", [1.0, 0.999999, 0.5, 0.0])
def test_jitter_is_applied_after_the_cap(jitter):
    """Twisted's backoffPolicy adds jitter past maxDelay; this one never does."""
    policy = backoff_policy(1.0, 2.0, 60.0, jitter=lambda: jitter)
    for n in range(6, 200):
        assert policy(n) == pytest.approx(60.0 * (0.5 + 0.5 * jitter))
        assert policy(n) <= 60.0


@pytest.mark.parametrize("attempt", [1000, 10**6, 10**9, 10**18, 2**200])
def test_huge_attempt_numbers_do_not_overflow(attempt):
    policy = backoff_policy(jitter=lambda: 1.0)
    assert policy(attempt) == DEFAULT_MAX_DELAY
    policy = backoff_policy(jitter=lambda: 0.0)
    assert policy(attempt) == DEFAULT_MAX_DELAY / 2


def test_defaults():
    policy = backoff_policy(jitter=lambda: 1.0)
    assert policy(0) == DEFAULT_INITIAL
    assert policy(1) == DEFAULT_INITIAL * DEFAULT_FACTOR


def test_default_jitter_spreads_the_delays():
    random.seed(1234)
    policy = backoff_policy(1.0, 2.0, 60.0)
    delays = [policy(20) for _ in range(500)]
    assert min(delays) >= 30.0 and max(delays) <= 60.0
    assert max(delays) - min(delays) > 20.0  # a fleet does not come back as one wave


@settings(max_examples=300, deadline=None)
@given(
    initial=st.floats(min_value=0.001, max_value=100.0),
    factor=st.floats(min_value=1.0, max_value=10.0),
    max_delay=st.floats(min_value=0.001, max_value=3600.0),
    attempt=st.integers(min_value=0, max_value=10**6),
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_bounds(initial, factor, max_delay, attempt, jitter):
    delay = backoff_policy(initial, factor, max_delay, jitter=lambda: jitter)(attempt)
    assert math.isfinite(delay)
    assert delay <= max_delay
    try:
        base = min(max_delay, initial * factor**attempt)
    except OverflowError:
        base = max_delay
    assert delay >= base / 2 * (1 - 1e-12)  # never below half the (capped) base
