"""Swarm mode: many real agents in one process, for load tests and benchmarks.

Each swarm member is a full agent: the same AgentService and `make_agent` as `twistd tcm-agent`,
with its own key, certificate and ledger in its own state directory, its own mutual-TLS
session with keepalive, its own HTTPS fallback, and the real action handlers (loaded once and
shared). Each swarm process writes its counts to `swarm-<first>.json` in the state directory
every 2 s. Only what cannot be shared per process differs: no control socket per member, the
ledger is not fsynced (it still survives the process, not the machine), and connections come
from several source addresses so that one (source, destination) pair does not run out of
ports. Identities are kept in the state directory: a second run reconnects without enrolling.

The process raises its descriptor limit to the hard limit; past that (20,000 here), run
several swarm processes.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import sys
import time
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tcm.agent.config import AgentConfig
from tcm.agent.modes import DISCONNECTED, HTTP, PERSISTENT
from tcm.agent.policies import load_policy_handlers
from tcm.agent.runner import load_handlers
from tcm.agent.service import AgentService
from tcm.process import raise_descriptor_limit


def parse_sources(spec: str | None) -> list[str | None]:
    """`127.0.0.2-127.0.0.9` or `127.0.0.2,127.0.0.3` -> addresses; None -> [None]."""
    if not spec:
        return [None]
    out: list[str | None] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            first, last = (ipaddress.ip_address(p.strip()) for p in part.split("-", 1))
            if int(last) < int(first):
                raise ValueError(f"empty address range {part!r}")
            out.extend(str(ipaddress.ip_address(i)) for i in range(int(first), int(last) + 1))
        elif part:
            out.append(str(ipaddress.ip_address(part)))
    for address in out:
        if address is not None and not ipaddress.ip_address(address).is_loopback:
            raise ValueError(f"swarm source addresses must be loopback, not {address}")
    return out


class Swarm(service.MultiService):
    """N agents started at a bounded rate, with a status file for whoever drives the test."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        count: int,
        state_dir: str,
        server: str | None,
        ca_cert: str | None,
        token: str | None,
        sources: list[str | None],
        rate: float = 500.0,
        enroll_rate: float = 200.0,
        first: int = 0,
        **agent_options: Any,
    ):
        super().__init__()
        self.reactor = reactor
        self.count = count
        self.state_dir = state_dir
        self.server = server
        self.ca_cert = ca_cert
        self.token = token
        self.sources = sources
        self.rate = rate
        self.enroll_rate = enroll_rate
        self.first = first
        self.agent_options = agent_options
        self.handlers = load_handlers()
        self.policy_handlers = load_policy_handlers()
        self.members: list[AgentService] = []
        self._next = 0
        self._starter: LoopingCall | None = None
        self._reporter = LoopingCall(self.report)
        self._reporter.clock = reactor
        self.started_at = 0.0
        self.gc_frozen = False

    def member_dir(self, i: int) -> str:
        return os.path.join(self.state_dir, f"agent-{self.first + i:06d}")

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.state_dir, exist_ok=True)
        self.started_at = time.time()
        limit = raise_descriptor_limit()
        if self.count + 64 > limit:
            self._log.warn(
                "{n} agents need about {n} descriptors; this process may open {limit}: "
                "run several swarm processes",
                n=self.count,
                limit=limit,
            )
        enrolled = os.path.exists(os.path.join(self.member_dir(0), "cert.pem"))
        rate = self.rate if enrolled else min(self.rate, self.enroll_rate)
        tick = 0.05
        self._per_tick = max(1, int(rate * tick))
        self._starter = LoopingCall(self._start_some)
        self._starter.clock = self.reactor
        self._starter.start(tick, now=True)
        self._reporter.start(2.0, now=False)

    def _start_some(self) -> None:
        for _ in range(self._per_tick):
            if self._next >= self.count:
                assert self._starter is not None
                self._starter.stop()
                self._log.info("all {n} swarm agents started", n=self.count)
                return
            i = self._next
            self._next += 1
            config = AgentConfig(
                state_dir=self.member_dir(i),
                server=self.server,
                ca_cert=self.ca_cert,
                token=self.token,
                spool_fsync=False,
                control_socket=False,
                bind_address=self.sources[i % len(self.sources)],
                **self.agent_options,
            )
            member = AgentService(
                config,
                self.reactor,
                handlers=self.handlers,
                policy_handlers=self.policy_handlers,
                exit_on_failure=False,
            )
            self.members.append(member)
            member.setServiceParent(self)

    def counts(self) -> dict[str, Any]:
        modes = {PERSISTENT: 0, HTTP: 0, DISCONNECTED: 0}
        completed = enrolled = reconnects = 0
        for member in self.members:
            agent = member.agent
            if agent is None:  # not enrolled yet
                modes[DISCONNECTED] += 1
                continue
            modes[agent.connection.mode.state] += 1
            completed += agent.runner.completed
            enrolled += 1
            reconnects += agent.connection.reconnects
        return {
            "count": self.count,
            "started": len(self.members),
            "enrolled": enrolled,
            "persistent": modes[PERSISTENT],
            "http": modes[HTTP],
            "disconnected": modes[DISCONNECTED],
            "completed": completed,
            "reconnect_attempts": reconnects,
            "uptime": time.time() - self.started_at,
            "pid": os.getpid(),
        }

    def report(self) -> None:
        counts = self.counts()
        self._tune_gc(counts)
        path = os.path.join(self.state_dir, f"swarm-{self.first}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(path + ".tmp", path)
        self._log.info(
            "swarm: {started}/{count} started, {persistent} persistent, {http} http, "
            "{disconnected} disconnected, {completed} jobs done",
            **counts,
        )

    def _tune_gc(self, counts: dict[str, Any]) -> None:
        """Keep Python's full garbage collections off the swarm's settled agents.

        One swarm process holds thousands of agents' objects, which a real agent process
        never does: each full collection walks millions of objects (and a push or a reconnect
        storm triggers several, seconds of one core that no real agent would spend). Once
        every agent has its session, they are moved out of the collector's sight
        (gc.freeze); as soon as one loses it, they are given back (gc.unfreeze), so that what
        the lost sessions leave behind is collected as usual."""
        settled = counts["started"] == self.count and counts["persistent"] == self.count
        if settled and not self.gc_frozen:
            gc.collect()
            gc.freeze()
            self.gc_frozen = True
        elif not settled and self.gc_frozen:
            gc.unfreeze()
            self.gc_frozen = False

    def stopService(self):
        for loop in (self._starter, self._reporter):
            if loop is not None and loop.running:
                loop.stop()
        return super().stopService()


def run(args: Any) -> int:
    """`tcm-agent swarm ...`: run until SIGINT/SIGTERM or --duration."""
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    level = LogLevel.info if args.verbose else LogLevel.warn
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    predicate.setLogLevelForNamespace("tcm.agent.swarm.Swarm", LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])]
    )
    swarm = Swarm(
        reactor,
        args.count,
        args.state_dir,
        args.server[0] if args.server else None,
        args.ca_cert,
        args.token,
        parse_sources(args.source_addresses),
        rate=args.rate,
        first=args.first,
        servers=list(args.server[1:]) if args.server else [],
        keepalive=args.keepalive,
        backoff_max=args.backoff_max,
    )
    reactor.callWhenRunning(swarm.startService)
    reactor.addSystemEventTrigger("before", "shutdown", swarm.stopService)
    if args.duration:
        reactor.callLater(args.duration, reactor.stop)
    reactor.run()
    return 0
