"""The gateway's pending requests: agents' HTTPS calls carried over a link, awaiting answers.

Each call crosses the link as `request` (numbered `r`) and is answered by `response` with the
same number, possibly much later (a long-poll). A call ends one of four ways: answered; the
agent went away (its Deferred is cancelled, a late answer is dropped); the link went down
(`RequestLost`, answered 502); or no answer within the timeout (`RequestTimedOut`, 504).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

# Longer than any long-poll a server holds (its `long_poll` setting is at most 300 s): a
# call still unanswered then has been lost by the server, and is not kept for ever.
REQUEST_TIMEOUT = 330.0


class RequestLost(Exception):
    """The link carrying an agent's HTTPS call went down before the answer came."""


class RequestTimedOut(Exception):
    """The server did not answer an agent's HTTPS call in time."""


class PendingRequests:
    """Calls sent up a link and not answered yet, by number, with the upstream they went to."""

    def __init__(self, clock: Any, timeout: float = REQUEST_TIMEOUT):
        self.clock = clock
        self.timeout = timeout
        self._pending: dict[int, tuple[str, Deferred[bytes], Any]] = {}
        self._links: dict[int, Any] = {}  # call -> the node link it went over (if given)
        self._next = 0

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, upstream: str, link: Any = None) -> tuple[int, Deferred[bytes]]:
        """A new call to `upstream` (over its node link `link`): its number, and a Deferred
        that fires with the answer."""
        self._next += 1
        r = self._next
        d: Deferred[bytes] = Deferred(lambda _: self._forget(r))
        timer = self.clock.callLater(self.timeout, self._expire, r)
        self._pending[r] = (upstream, d, timer)
        if link is not None:
            self._links[r] = link
        return r, d

    def answer(self, r: int, upstream: str, payload: bytes, link: Any = None) -> bool:
        """The answer to call `r` from `upstream` (its node link `link`); False when there
        is no such call (gone, or another upstream's or node's: each answers only its own)."""
        pending = self._pending.get(r)
        if pending is None or pending[0] != upstream:
            return False
        went = self._links.get(r)
        if link is not None and went is not None and went is not link:
            return False
        del self._pending[r]
        self._links.pop(r, None)
        _stop(pending[2])
        pending[1].callback(payload)
        return True

    def lose(self, upstream: str, link: Any = None) -> int:
        """The link to `upstream` (its node link `link`, when given) went down: the calls
        over it fail with RequestLost. How many."""
        lost = [
            r
            for r, (name, _, _) in self._pending.items()
            if name == upstream and (link is None or self._links.get(r) in (None, link))
        ]
        for r in lost:
            _, d, timer = self._pending.pop(r)
            self._links.pop(r, None)
            _stop(timer)
            d.errback(RequestLost(f"the link to {upstream} went down"))
        return len(lost)

    def _expire(self, r: int) -> None:
        pending = self._pending.pop(r, None)
        self._links.pop(r, None)
        if pending is not None:
            pending[1].errback(
                RequestTimedOut(f"{pending[0]} did not answer within {self.timeout:g} s")
            )

    def _forget(self, r: int) -> None:
        # cancelled: the agent went away; a late answer is dropped
        pending = self._pending.pop(r, None)
        self._links.pop(r, None)
        if pending is not None:
            _stop(pending[2])


def _stop(timer: Any) -> None:
    if timer.active():
        timer.cancel()
