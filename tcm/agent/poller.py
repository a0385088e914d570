"""HTTPS polling for agents without a persistent session.

While the session is down (refused, switched off on the server, blocked by a proxy,
terminated by the endpoint's owner) the agent asks `GET /agent/v1/work` over HTTPS. Where the
server allows long-polls it asks with `?wait=S` and polls again as soon as it is answered, so
pushed work arrives at once; otherwise it polls every `poll_interval` seconds. Spooled results
are sent on each successful poll. The session keeps trying to come back meanwhile
(ClientService), and polling stops when it does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from tcm.interfaces import IAgentAPI, ISessionHost
from tcm.protocol.envelope import ProtocolError, decode

RETRY_AFTER_ERROR = 5.0


class Poller:
    """Polls for work over HTTPS while started (the agent's connection starts and stops it).

    What a poll brings goes to `host`, as what a session brings; `answered(first)` and
    `failed(why)` tell the connection how polling goes (its mode)."""

    _log = Logger()

    def __init__(
        self,
        clock: Any,
        api: IAgentAPI,
        host: ISessionHost,
        answered: Callable[[bool], None],
        failed: Callable[[str], None],
        long_poll: bool = True,
    ):
        self.clock = clock
        self._api = api
        self._host = host
        self._on_answered = answered
        self._on_failed = failed
        self.use_long_poll = long_poll
        self.poll_interval = 60.0
        self.long_poll = 0.0
        self.running = False
        self.polls = 0
        self.last_poll: float | None = None
        self.last_poll_ok: float | None = None
        self.last_error: str | None = None
        self._timer: Any = None
        self._inflight: Any = None
        self._failures = 0
        self.profile_poll_interval: float | None = None  # a connection profile's, wins
        self._answered_since_start = False

    def start(self, reason: str, delay: float = 0.0) -> None:
        """Start polling after `delay` seconds (a lost session often comes back first)."""
        if self.running:
            return
        self.running = True
        self._answered_since_start = False
        self._log.info("polling over HTTPS ({reason})", reason=reason)
        self._schedule(delay)

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._inflight is not None:
            d, self._inflight = self._inflight, None
            d.cancel()

    def _schedule(self, delay: float) -> None:
        if self.running:
            self._timer = self.clock.callLater(delay, self._poll)

    def _poll(self) -> None:
        self._timer = None
        wait = self.long_poll if self.use_long_poll else 0.0
        path = "/agent/v1/work" + (f"?wait={wait:g}" if wait > 0 else "")
        self.last_poll = self.clock.seconds()
        self.polls += 1
        d = self._api.call_over_https("GET", path, timeout=wait + 30)
        self._inflight = d
        d.addCallbacks(self._answered, self._failed, callbackArgs=(wait,))

    def _answered(self, response: Any, wait: float) -> None:
        self._inflight = None
        if response.status != 200:
            self._failed_with(f"poll answered {response.status}: {response.body}")
            return
        body = response.body or {}
        self.last_poll_ok = self.clock.seconds()
        self.last_error = None
        self._failures = 0
        self.poll_interval = self.profile_poll_interval or float(
            body.get("poll_interval", self.poll_interval)
        )
        self.long_poll = float(body.get("long_poll", 0))
        self._host.learn_server_time(body.get("server_time"))
        first = not self._answered_since_start
        self._answered_since_start = True
        self._on_answered(first)
        for raw in body.get("requests", []):
            try:
                env = decode(json.dumps(raw))
            except ProtocolError as e:
                self._log.warn("poll returned a bad request: {e}", e=e)
                continue
            if env.type == "notify":
                self._host.notified(env.data)
            elif env.type == "action.cancel":
                self._host.cancel_requested(env.data)
            else:
                self._host.action_requested(env)
        self._host.deliver_results()
        # Where the server allows long-polls the next poll goes out at once (and is held);
        # otherwise at the poll interval.
        long_polling = self.use_long_poll and self.long_poll > 0
        # +-10 %: agents that fell back together (a server switch) drift apart instead of
        # polling in one wave forever
        self._schedule(0 if long_polling else self.poll_interval * random.uniform(0.9, 1.1))

    def _failed(self, failure: Any) -> None:
        self._inflight = None
        if not self.running:
            return
        self._failed_with(failure.getErrorMessage())

    def _failed_with(self, why: str) -> None:
        self.last_error = why
        self._failures += 1
        self._log.warn("HTTPS poll failed: {why}", why=why)
        self._on_failed(why)
        # soon after the first failure, then backing off to the poll interval
        delay = RETRY_AFTER_ERROR * 2 ** min(self._failures - 1, 10)
        # jittered, so agents that lost their server together do not poll in step
        self._schedule(min(self.poll_interval, delay) * (0.5 + 0.5 * random.random()))
