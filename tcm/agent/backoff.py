"""Reconnect delays: capped exponential backoff with jitter.

delay(n) = uniform(0.5, 1.0) * min(max_delay, initial * factor ** n)

Jitter is applied *after* the cap, so a delay never exceeds max_delay (Twisted's own
backoffPolicy adds jitter past the cap), and a fleet that lost its server at the same moment
spreads its reconnects over half the interval instead of arriving as one wave.
"""

from __future__ import annotations

import random
from collections.abc import Callable

DEFAULT_INITIAL = 1.0
DEFAULT_FACTOR = 2.0
DEFAULT_MAX_DELAY = 60.0


def backoff_policy(
    initial: float = DEFAULT_INITIAL,
    factor: float = DEFAULT_FACTOR,
    max_delay: float = DEFAULT_MAX_DELAY,
    jitter: Callable[[], float] = random.random,
) -> Callable[[int], float]:
    """A retry policy for ClientService: attempt number -> seconds to wait."""

    def policy(attempt: int) -> float:
        try:
            base = initial * factor**attempt
        except OverflowError:
            base = max_delay
        return min(max_delay, base) * (0.5 + 0.5 * jitter())

    return policy
