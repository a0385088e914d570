"""Swarm mode: many real agents in one process, for load tests and benchmarks.

Each swarm member is a full agent: the same AgentService and `make_agent` as `twistd tcm-agent`,
with its own key, certificate and ledger in its own state directory, its own mutual-TLS
session with keepalive, its own HTTPS fallback, and the real action handlers (loaded once and
shared). Each swarm process writes its counts to `swarm-<first>.json` in the state directory
every 2 s. Only what cannot be shared per process differs: no control socket per member, the
ledger is not fsynced (it still survives the process, not the machine), and connections come
from several source addresses so that one (source, destination) pair does not run out of
ports. Identities are kept in the state directory: a second run reconnects without enrolling.
With `--enroll-only` the process only enrolls the members that are not enrolled yet (at
`--enroll-rate`, at most `--enroll-concurrency` at once), holds no session, writes its counts
to `enroll-<first>.json` and exits: 0 once every member is enrolled.

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
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from tcm.agent.config import AgentConfig
from tcm.agent.enrollment import AgentState, enroll_if_needed
from tcm.agent.modes import DISCONNECTED, HTTP, PERSISTENT
from tcm.agent.policies import load_policy_handlers
from tcm.agent.runner import load_handlers
from tcm.agent.service import AgentService
from tcm.interfaces import IActionContext
from tcm.plugins.builtin_inventory import InventoryAction, digest, matching_known
from tcm.process import raise_descriptor_limit, release_memory

# The file in the swarm's state directory that says which members' software changed: a
# benchmark writes {"software": {"<member number>": release, ...}} and the next collection of
# each member named gets a new version of its package list.
CHANGES_FILE = "inventory-changes.json"


class SwarmInventory(InventoryAction):
    """`inventory.collect` for swarm members, each with an inventory of its own: a package
    list of `packages` entries (varied per member, as real machines' are), and host, OS,
    hardware classes that differ per member too, so that every member's digests are its own.

    What differs from the built-in action is only where the data comes from; what is sent
    follows the same rule (`matching_known`). A real agent hashes its data on its own CPU;
    a swarm would hash thousands of package lists on one, so each member's digests are kept
    until its data changes and the data is made only when it must be sent."""

    def __init__(self, packages: int, state_dir: str):
        self.packages = packages
        self.state_dir = state_dir
        self._changes: dict[str, dict[str, int]] = {}
        self._changes_mtime = 0.0
        self._digests: dict[tuple[int, str], tuple[int, str]] = {}

    def _release(self, cls: str, member: int) -> int:
        path = os.path.join(self.state_dir, CHANGES_FILE)
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return 0
        if mtime != self._changes_mtime:
            with open(path) as f:
                self._changes = json.load(f)
            self._changes_mtime = mtime
        return int(self._changes.get(cls, {}).get(str(member), 0))

    def make(self, cls: str, member: int, release: int) -> Any:
        """The data of one class of one member."""
        host = f"swarm-{member:06d}"
        if cls == "software":
            packages = []
            for i in range(self.packages):
                if (i * 31 + member) % 97 == 0:
                    continue  # not installed on this member
                own = (i * 7 + member) % 50 == 0 or (release and i % 500 == member % 500)
                version = f"{1 + i % 9}.{i % 13}.{(member + release) % 17 if own else 0}"
                packages.append({"name": f"pkg-{i:05d}", "version": version, "arch": "amd64"})
            return {"manager": "dpkg", "count": len(packages), "packages": packages}
        made: dict[str, Any] = {
            "os": {
                "system": "Linux",
                "family": "debian",
                "name": "Debian GNU/Linux",
                "version": "12",
                "kernel": f"6.1.0-{10 + member % 9}-amd64",
                "arch": "x86_64",
            },
            "hostname": {"hostname": host, "fqdn": f"{host}.swarm.example"},
            "cpu": {"model": "Swarm CPU", "logical": 2 + member % 8, "physical": 1 + member % 4},
            "memory": {"total": (4 + member % 60) * 2**30, "swap": {"total": 2**31}},
            "disks": {
                "partitions": [
                    {"device": "/dev/sda1", "mountpoint": "/", "fstype": "ext4",
                     "total": (100 + member % 400) * 2**30}
                ]
            },
            "network": {
                "interfaces": [
                    {"name": "eth0", "mac": f"02:00:{member >> 16 & 255:02x}:"
                     f"{member >> 8 & 255:02x}:{member & 255:02x}:01", "is_up": True,
                     "addresses": [{"family": "AF_INET", "address": f"10.{member >> 16 & 255}."
                                    f"{member >> 8 & 255}.{member & 255}"}]}
                ]
            },
            "users": {"users": []},
        }  # fmt: skip
        return made[cls]

    def run(self, context: IActionContext, args: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """In the reactor's thread pool, as the built-in action: thousands of members' runs
        at once must not keep the swarm's reactor from its sessions' keepalive."""
        member = int(context.state_dir.path.rstrip("/").rsplit("-", 1)[-1])
        reactor = context.reactor
        d = deferToThreadPool(reactor, reactor.getThreadPool(), self._collect, member, args)
        return d.addCallback(lambda r: {**r, "collected_at": float(reactor.seconds())})

    def _collect(self, member: int, args: dict[str, Any]) -> dict[str, Any]:
        requested = args.get("classes")
        classes = list(self.make_classes()) if requested is None else list(requested)
        known = args.get("known") or {}
        sent: dict[str, Any] = {}
        digests: dict[str, str] = {}
        unchanged: list[str] = []
        for cls in classes:
            release = self._release(cls, member)
            cached = self._digests.get((member, cls))
            data = None
            if cached is None or cached[0] != release:
                data = self.make(cls, member, release)
                cached = (release, digest(data))
                self._digests[(member, cls)] = cached
            matched = matching_known(cached[1], known.get(cls, ()))
            if matched is not None:
                if len(matched) == len(cached[1]):
                    digests[cls] = matched
                unchanged.append(cls)
            else:
                digests[cls] = cached[1]
                sent[cls] = data if data is not None else self.make(cls, member, release)
        return {"classes": sent, "digests": digests, "unchanged": unchanged}

    @staticmethod
    def make_classes() -> tuple[str, ...]:
        return ("os", "hostname", "cpu", "memory", "disks", "network", "software", "users")


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
        inventory_packages: int = 0,
        enroll_only: bool = False,
        enroll_concurrency: int = 64,
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
        self.enroll_only = enroll_only
        self.enroll_concurrency = enroll_concurrency
        # --enroll-only: fires (with the number that failed) once every member is done
        self.enrollment_done: Deferred[int] = Deferred()
        self._enrolling = 0
        self._enroll_counts = {"already": 0, "enrolled": 0, "failed": 0}
        self.handlers = load_handlers()
        if inventory_packages:  # each member an inventory of its own (bench/inventory.py)
            self.handlers = {
                **self.handlers,
                "inventory.collect": SwarmInventory(inventory_packages, state_dir),
            }
        self.policy_handlers = load_policy_handlers()
        self.members: list[AgentService] = []
        self._next = 0
        self._starter: LoopingCall | None = None
        self._reporter = LoopingCall(self.report)
        self._reporter.clock = reactor
        self.started_at = 0.0
        self.rss_at_start: int | None = None
        self.gc_frozen = False
        self._sessions: dict[int, tuple[Any, int, int]] = {}  # member -> its session's count
        self._wire = [0, 0]  # bytes sent, received by sessions, counted so far

    def member_dir(self, i: int) -> str:
        return os.path.join(self.state_dir, f"agent-{self.first + i:06d}")

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.state_dir, exist_ok=True)
        self.started_at = time.time()
        import psutil  # (the agents' inventory imports it too, when one is collected)

        # the process before any agent: the benches' memory per agent leaves it out (it is
        # paid once per process)
        self.rss_at_start = psutil.Process().memory_info().rss
        limit = raise_descriptor_limit()
        if self.count + 64 > limit:
            self._log.warn(
                "{n} agents need about {n} descriptors; this process may open {limit}: "
                "run several swarm processes",
                n=self.count,
                limit=limit,
            )
        enrolled = os.path.exists(os.path.join(self.member_dir(0), "cert.pem"))
        rate = self.rate if enrolled and not self.enroll_only else min(self.rate, self.enroll_rate)
        tick = 0.05
        # a fraction of an agent per tick (a low rate spread over many processes) is kept
        self._per_tick_rate = rate * tick
        self._credit = 0.0
        self._starter = LoopingCall(self._enroll_some if self.enroll_only else self._start_some)
        self._starter.clock = self.reactor
        self._starter.start(tick, now=True)
        self._reporter.start(2.0, now=False)

    def _config(self, i: int) -> AgentConfig:
        return AgentConfig(
            state_dir=self.member_dir(i),
            server=self.server,
            ca_cert=self.ca_cert,
            token=self.token,
            spool_fsync=False,
            control_socket=False,
            bind_address=self.sources[i % len(self.sources)],
            **self.agent_options,
        )

    def _take(self) -> int:
        """How many agents this tick may start: the rate's share, fractions carried over."""
        self._credit = min(self._credit + self._per_tick_rate, max(1.0, self._per_tick_rate))
        n = int(self._credit)
        self._credit -= n
        return n

    def _start_some(self) -> None:
        for _ in range(self._take()):
            if self._next >= self.count:
                assert self._starter is not None
                self._starter.stop()
                self._log.info("all {n} swarm agents started", n=self.count)
                return
            i = self._next
            self._next += 1
            config = self._config(i)
            member = AgentService(
                config,
                self.reactor,
                handlers=self.handlers,
                policy_handlers=self.policy_handlers,
                exit_on_failure=False,
            )
            self.members.append(member)
            member.setServiceParent(self)

    def _enroll_some(self) -> None:
        """--enroll-only: enroll the next members (those enrolled already are passed at once),
        at the rate and at most `enroll_concurrency` at once; no session, nothing kept open."""
        budget = self._take()
        while self._next < self.count and self._enrolling < self.enroll_concurrency:
            i = self._next
            state = AgentState(self.member_dir(i))
            if state.enrolled():
                self._next += 1
                self._enroll_counts["already"] += 1
                continue
            if budget <= 0:
                break
            budget -= 1
            self._next += 1
            self._enrolling += 1
            d = enroll_if_needed(self.reactor, self._config(i), state, None)
            d.addCallbacks(self._member_enrolled, self._member_failed, errbackArgs=(i,))
        if self._next >= self.count and self._enrolling == 0:
            assert self._starter is not None
            if self._starter.running:
                self._starter.stop()
            self.report()
            self._log.info(
                "enrollment done: {enrolled} enrolled now, {already} already, {failed} failed",
                **self._enroll_counts,
            )
            self.enrollment_done.callback(self._enroll_counts["failed"])

    def _member_enrolled(self, _identity: Any) -> None:
        self._enrolling -= 1
        self._enroll_counts["enrolled"] += 1

    def _member_failed(self, f: Any, i: int) -> None:
        self._enrolling -= 1
        self._enroll_counts["failed"] += 1
        self._log.error("agent {i} could not enroll: {why}", i=self.first + i, why=f.value)

    def enroll_counts(self) -> dict[str, Any]:
        return {
            "count": self.count,
            **self._enroll_counts,
            "in_flight": self._enrolling,
            "passed": self._next,
            "uptime": time.time() - self.started_at,
            "pid": os.getpid(),
        }

    def counts(self) -> dict[str, Any]:
        modes = {PERSISTENT: 0, HTTP: 0, DISCONNECTED: 0}
        completed = enrolled = reconnects = sent = received = 0
        for member in self.members:
            agent = member.agent
            if agent is None:  # not enrolled yet
                modes[DISCONNECTED] += 1
                continue
            modes[agent.connection.mode.state] += 1
            completed += agent.runner.completed
            enrolled += 1
            reconnects += agent.connection.reconnects
            counting = agent.connection.counting
            if counting is not None and counting.current is not None:
                self._count_session(member, counting.current)
            https = agent.connection.link.https.traffic  # every HTTPS request: one total
            sent += https.sent
            received += https.received
        return {
            "count": self.count,
            "started": len(self.members),
            "enrolled": enrolled,
            "persistent": modes[PERSISTENT],
            "http": modes[HTTP],
            "disconnected": modes[DISCONNECTED],
            "completed": completed,
            "reconnect_attempts": reconnects,
            # bytes on the wire (TLS records) of the members' sessions, past and current,
            # and of their HTTPS requests (a session's last two seconds before it was lost
            # are not counted)
            "bytes_sent": sent + self._wire[0],
            "bytes_received": received + self._wire[1],
            "uptime": time.time() - self.started_at,
            "pid": os.getpid(),
            "rss_at_start": self.rss_at_start,
        }

    def _count_session(self, member: Any, traffic: Any) -> None:
        """Add what a member's session moved since the last count to the totals."""
        seen = self._sessions.get(id(member))
        if seen is None or seen[0] is not traffic:
            seen = (traffic, 0, 0)
        self._wire[0] += traffic.sent - seen[1]
        self._wire[1] += traffic.received - seen[2]
        self._sessions[id(member)] = (traffic, traffic.sent, traffic.received)

    def _write_counts(self, kind: str, counts: dict[str, Any]) -> None:
        """`<kind>-<first>.json` in the state directory, replaced whole (benches read it)."""
        path = os.path.join(self.state_dir, f"{kind}-{self.first}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(path + ".tmp", path)

    def report(self) -> None:
        if self.enroll_only:
            counts = self.enroll_counts()
            self._write_counts("enroll", counts)
            self._log.info(
                "swarm enrollment: {passed}/{count} passed, {enrolled} enrolled now, "
                "{already} already, {in_flight} in flight, {failed} failed",
                **counts,
            )
            return
        counts = self.counts()
        self._tune_gc(counts)
        self._write_counts("swarm", counts)
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
        the lost sessions leave behind is collected as usual. At the freeze, what the
        connecting left free in the C heap (handshakes, enrollments) is given back to the
        system (malloc_trim: about 4 KB per agent at 1,000)."""
        settled = counts["started"] == self.count and counts["persistent"] == self.count
        if settled and not self.gc_frozen:
            gc.collect()
            gc.freeze()
            release_memory()
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
        enroll_rate=args.enroll_rate,
        first=args.first,
        inventory_packages=args.inventory_packages,
        enroll_only=getattr(args, "enroll_only", False),
        enroll_concurrency=getattr(args, "enroll_concurrency", 64),
        servers=list(args.server[1:]) if args.server else [],
        keepalive=args.keepalive,
        backoff_max=args.backoff_max,
        # a swarm process's reactor serves thousands of agents: its lag is not the network's
        **(
            {"keepalive_timeout": args.keepalive_timeout}
            if getattr(args, "keepalive_timeout", None) is not None
            else {}
        ),
    )
    failed: list[int] = []
    if swarm.enroll_only:  # done once every member is enrolled (or could not be)
        swarm.enrollment_done.addCallback(failed.append)
        swarm.enrollment_done.addCallback(lambda _: reactor.stop())
    reactor.callWhenRunning(swarm.startService)
    reactor.addSystemEventTrigger("before", "shutdown", swarm.stopService)
    if args.duration:
        reactor.callLater(args.duration, reactor.stop)
    reactor.run()
    if swarm.enroll_only and (not failed or failed[0]):
        return 1  # not all enrolled: some failed, or --duration ended it first
    return 0
