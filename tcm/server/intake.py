"""The byte budget of agents' messages in transit: received, or being received, and not yet
handled (a result is handled once its commit is acknowledged).

Each connection reads on its own, so without a budget a fleet that answers at once has every
large message partly received and parsed in the server at the same time: 10,000 inventories
of ~108 KB were gigabytes held while the store worked through them (issue 18). A connection
that begins a large frame asks the budget for its bytes; when they do not fit, it stops
reading until they do, and the agent's TCP window holds the rest. Small frames (pings,
accepts, most results) never wait. Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

#: Frames smaller than this are never held back.
DEFAULT_THRESHOLD = 16 * 1024
#: Bytes of large messages in transit at once, by default.
DEFAULT_BUDGET = 64 * 1024 * 1024


class IntakeBudget:
    """Grants bytes of large messages in transit, first come first served.

    A request that fits is granted at once; one that does not waits its turn (a later one
    never overtakes it). When nothing is in transit any request is granted, however large,
    so a message bigger than the whole budget still goes through, alone."""

    def __init__(self, limit: int = DEFAULT_BUDGET, threshold: int = DEFAULT_THRESHOLD):
        if limit <= 0:
            raise ValueError("the intake budget must be positive")
        self.limit = limit
        self.threshold = threshold
        self.used = 0
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()
        self.waits = 0  # requests that had to wait, ever

    def counts(self, size: int) -> bool:
        """Whether a frame of `size` bytes is held to the budget."""
        return size >= self.threshold

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def request(self, size: int, granted: Callable[[], None]) -> bool:
        """Ask for `size` bytes: True if granted now; else False, and `granted()` is called
        once they are (the bytes are then counted as used)."""
        if not self._waiting and (self.used == 0 or self.used + size <= self.limit):
            self.used += size
            return True
        self._waiting.append((size, granted))
        self.waits += 1
        return False

    def cancel(self, granted: Callable[[], None]) -> bool:
        """Withdraw a request still waiting (its connection is gone). True if it was."""
        for entry in self._waiting:
            if entry[1] is granted:
                self._waiting.remove(entry)
                self._grant()  # the next ones may fit now
                return True
        return False

    def release(self, size: int) -> None:
        """`size` granted bytes are handled: grant who waits, in order, while they fit."""
        self.used = max(0, self.used - size)
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, granted = self._waiting[0]
            if self.used and self.used + size > self.limit:
                return
            self._waiting.popleft()
            self.used += size
            granted()
