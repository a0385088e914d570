"""Long-polls of agents in HTTP mode, as a route of the dispatcher.

An agent without a session asks `GET /agent/v1/work?wait=S`. With nothing to do, the server
holds the request; a push for that agent answers it at once (the dispatcher finds the waiting
poll where it would find a session), else it is answered empty after S seconds. So pushed work
reaches a polling agent as soon as it exists, or at its next poll when it is between polls.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred


class PollRoute:
    """Answers waiting polls with the pushed frame."""

    def deliver(self, frame: bytes, waiters: list[PollWaiter]) -> None:
        request = json.loads(frame)
        for waiter in waiters:
            waiter.answer([request])


class PollWaiter:
    """One held `GET /agent/v1/work` request."""

    def __init__(self, registry: PollRegistry, agent_id: str, route: PollRoute):
        self.registry = registry
        self.agent_id = agent_id
        self.route = route
        self.deferred: Deferred[list[dict[str, Any]]] = Deferred()
        self.timer: Any = None

    def answer(self, requests: list[dict[str, Any]]) -> None:
        self.registry.remove(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.deferred.called:
            self.deferred.callback(requests)


class PollRegistry:
    """Waiting long-polls by agent id (the newest poll of an agent wins)."""

    def __init__(self, clock: Any):
        self.clock = clock
        self.route = PollRoute()
        self._waiting: dict[str, PollWaiter] = {}

    def wait(self, agent_id: str, seconds: float) -> PollWaiter:
        old = self._waiting.get(agent_id)
        if old is not None:
            old.answer([])  # an agent polls once at a time; release the stale one
        waiter = PollWaiter(self, agent_id, self.route)
        waiter.timer = self.clock.callLater(seconds, waiter.answer, [])
        self._waiting[agent_id] = waiter
        return waiter

    def get(self, agent_id: str) -> PollWaiter | None:
        return self._waiting.get(agent_id)

    def agent_ids(self) -> list[str]:
        """The agents holding a poll now."""
        return list(self._waiting)

    def remove(self, waiter: PollWaiter) -> None:
        if self._waiting.get(waiter.agent_id) is waiter:
            del self._waiting[waiter.agent_id]

    def cancel(self, waiter: PollWaiter) -> None:
        """The poller went away: forget its request without answering."""
        self.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()

    def __len__(self) -> int:
        return len(self._waiting)
