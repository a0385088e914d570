"""Reconnect delays: capped exponential backoff with jitter.

delay(n) = uniform(0.5, 1.0) * min(max_delay, initial * factor ** n)

Jitter is applied *after* the cap, so a delay never exceeds max_delay (Twisted's own
backoffPolicy adds jitter past the cap), and a fleet that lost its server at the same moment
spreads its reconnects over half the interval instead of arriving as one wave.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

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


class RestartHint:
    """After the server said it is restarting (close 4012), reconnect attempts come every
    `low`..`high` seconds (jittered) for `window` seconds instead of climbing the backoff:
    the server will be back in moments, and an agent at a 32 s step of its backoff would
    stay away long after it is."""

    def __init__(
        self,
        clock: Any,
        window: float = 120.0,
        low: float = 1.0,
        high: float = 4.0,
        jitter: Callable[[], float] = random.random,
    ):
        self.clock = clock
        self.window = window
        self.low = low
        self.high = high
        self.jitter = jitter
        self.until = 0.0

    def server_restarting(self) -> None:
        self.until = self.clock.seconds() + self.window

    def reconnected(self) -> None:
        self.until = 0.0

    def delay(self, attempt: int, otherwise: Callable[[int], float]) -> float:
        """The next attempt's delay: short and jittered during the window, else `otherwise`."""
        if self.clock.seconds() < self.until:
            return self.low + (self.high - self.low) * self.jitter()
        return otherwise(attempt)
