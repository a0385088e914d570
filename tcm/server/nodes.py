"""Registered relay nodes and which task server each agent uses.

`NodeDirectory` keeps the registered nodes (from the store) and their live links.
`TaskServerAssignments` is the assignment policy, plain logic without I/O:

- policy "fewest": the connected task server with the fewest assigned agents;
- policy "capacity": the one with the most free places (its maximum minus its agents), which
  differs from "fewest" when task servers have different maximums;
- a task server never gets more than its maximum of registered clients (default 5,000, as in
  the system tcm descends from);
- failover: when a task server's link goes down its agents are assigned again at once, each
  move logged with its reason ("moved to ts2: ts1 went down at 06:40:12 UTC"); an agent that
  finds no place is told why (its task jobs then come over its own session with the server);
- rebalancing: when a task server returns or joins, `rebalance(limit, movable)` moves at most
  `limit` agents toward the policy's target (the caller calls it at a bounded rate), agents
  that lived on the returning task server first ("moved back to ts1: rebalancing after ts1
  returned"). A move is made only while it narrows the gap between the most and the least
  loaded task server by the policy's measure, so it ends, and never ping-pongs.

The last change of each task server (up, down, removed) is kept with its time and reason
(`changes`), and each moved agent's reason (`why`), for `tcm taskservers` and `tcm-agent
status`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, NamedTuple

from twisted.logger import Logger

POLICIES = ("fewest", "capacity")
DEFAULT_MAX_CLIENTS = 5000


def clock_time(at: float) -> str:
    """HH:MM:SS UTC of an epoch time, as reasons show it."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


class Change(NamedTuple):
    """A task server's last change: when, and why (e.g. "returned", "link lost")."""

    at: float
    reason: str


class Move(NamedTuple):
    """One agent moved by rebalancing, from one task server to another, and why."""

    agent_id: str
    source: str
    destination: str
    why: str


class TaskServerAssignments:
    """Agent -> task server, by policy, within each task server's maximum."""

    _log = Logger()

    def __init__(self, policy: str = "fewest", default_max: int = DEFAULT_MAX_CLIENTS):
        if policy not in POLICIES:
            raise ValueError(f"task server policy must be one of {POLICIES}, not {policy!r}")
        self.policy = policy
        self.default_max = default_max
        self.servers: dict[str, dict[str, Any]] = {}  # connected: name -> {url, max}
        self.registered = 0
        self.assigned: dict[str, str] = {}  # agent -> task server name
        self.counts: dict[str, int] = {}
        self.changes: dict[str, Change] = {}  # task server -> its last change
        self.why: dict[str, str] = {}  # agent -> why it was moved (its last move)
        self.home: dict[str, str] = {}  # agent -> the task server it lost (it goes back)
        self._lost: dict[str, tuple[str, str, float]] = {}  # agent -> (task server, why, when)

    # -- task servers ------------------------------------------------------------------
    def up(self, name: str, url: str, max_clients: int | None, now: float = 0.0) -> None:
        """A task server linked: it "joined" (first seen) or "returned"."""
        self.servers[name] = {"url": url, "max": max_clients or self.default_max}
        self.counts.setdefault(name, 0)
        self.changes[name] = Change(now, "returned" if name in self.changes else "joined")

    def down(self, name: str, now: float = 0.0, reason: str = "went down") -> list[str]:
        """A task server is gone ("went down", or "was removed"): its agents, now without a
        task server (each remembers which it lost, to say why it moves and to go back)."""
        self.servers.pop(name, None)
        moved = [a for a, n in self.assigned.items() if n == name]
        for agent_id in moved:
            del self.assigned[agent_id]
            self._lost[agent_id] = (name, reason, now)
            if reason == "went down":
                self.home[agent_id] = name
        self.counts.pop(name, None)
        self.changes[name] = Change(now, "link lost" if reason == "went down" else reason)
        return moved

    def change_of(self, name: str) -> Change | None:
        """The task server's last change (time and reason), if any since the server started."""
        return self.changes.get(name)

    def capacity(self, name: str) -> int:
        return self.servers[name]["max"] if name in self.servers else 0

    def full(self, name: str) -> bool:
        return self.counts.get(name, 0) >= self.capacity(name)

    # -- agents ------------------------------------------------------------------------
    def assign(self, agent_id: str, among: list[str] | None = None) -> tuple[str | None, str]:
        """The agent's task server (kept if it still has one) and why; `among`: only these
        task servers can be reached (an agent behind a gateway: those it links to)."""
        current = self.assigned.get(agent_id)
        if current is not None and current in self.servers:
            if among is None or current in among:
                return current, self.why.get(agent_id, "assigned")
            self.release(agent_id)
        pool = list(self.servers) if among is None else [n for n in self.servers if n in among]
        candidates = [n for n in pool if not self.full(n)]
        if not candidates:
            if among is not None and pool:
                why = f"all {len(pool)} task servers reachable are full"
            elif not self.servers:
                why = (
                    "no task server registered"
                    if not self.registered
                    else "no task server connected"
                )
            else:
                why = f"all {len(self.servers)} task servers are full"
            return None, why
        candidates.sort()  # ties go to the first name
        if self.policy == "fewest":
            name = min(candidates, key=lambda n: self.counts.get(n, 0))
        else:
            name = max(candidates, key=lambda n: self.capacity(n) - self.counts.get(n, 0))
        self.assigned[agent_id] = name
        self.counts[name] = self.counts.get(name, 0) + 1
        lost = self._lost.pop(agent_id, None)
        if lost is not None:
            gone, reason, at = lost
            if gone == name:  # no other place meanwhile: back where it was
                why = f"moved back to {name}: {name} returned ({reason} at {clock_time(at)})"
                self.home.pop(agent_id, None)
            else:
                why = f"moved to {name}: {gone} {reason} at {clock_time(at)}"
            self.why[agent_id] = why
            return name, why
        self.why.pop(agent_id, None)
        return name, f"assigned by policy {self.policy!r}"

    def release(self, agent_id: str) -> None:
        """The agent left (its session closed): it has no task server here any more."""
        name = self.assigned.pop(agent_id, None)
        if name is not None and name in self.counts:
            self.counts[name] -= 1
        for kept in (self.why, self.home, self._lost):
            kept.pop(agent_id, None)

    # -- rebalancing -------------------------------------------------------------------
    def load(self, name: str) -> int:
        """The policy's measure of how loaded a task server is: its agents ("fewest"), or
        its agents minus its maximum, i.e. minus its free places ("capacity")."""
        count = self.counts.get(name, 0)
        return count if self.policy == "fewest" else count - self.capacity(name)

    def rebalance(self, limit: int, movable: Iterable[str]) -> list[Move]:
        """Move up to `limit` of the `movable` agents (those the caller can move: e.g. not
        behind a gateway) toward the policy's target; the moves made, each with its reason.

        Each move takes an agent from the most loaded task server to the least loaded one
        that has a free place, and only while their loads differ by more than one: every
        move narrows the gap, so rebalancing ends. Agents whose home is the destination (they
        lost it) go first."""
        by_server: dict[str, list[str]] = {}  # the movable agents on each task server
        for agent_id in sorted(set(movable)):
            name = self.assigned.get(agent_id)
            if name is not None and name in self.servers:
                by_server.setdefault(name, []).append(agent_id)
        moves: list[Move] = []
        while len(moves) < limit:
            move = self._next_move(by_server)
            if move is None:
                break
            by_server[move.source].remove(move.agent_id)  # moved once per call at most
            self.counts[move.source] -= 1
            self.counts[move.destination] = self.counts.get(move.destination, 0) + 1
            self.assigned[move.agent_id] = move.destination
            self.why[move.agent_id] = move.why
            self.home.pop(move.agent_id, None)
            moves.append(move)
        return moves

    def _next_move(self, by_server: dict[str, list[str]]) -> Move | None:
        open_ = [n for n in sorted(self.servers) if not self.full(n)]
        if not open_:
            return None
        destination = min(open_, key=self.load)
        sources = [n for n in sorted(by_server) if by_server[n] and n != destination]
        if not sources:
            return None
        source = max(sources, key=self.load)
        if self.load(source) - self.load(destination) <= 1:
            return None
        agents = by_server[source]
        home = next((a for a in agents if self.home.get(a) == destination), None)
        agent_id = home if home is not None else agents[0]
        change = self.changes.get(destination)
        event = f"{destination} {change.reason}" if change else "a change of task servers"
        back = "back " if home is not None else ""
        return Move(
            agent_id,
            source,
            destination,
            f"moved {back}to {destination}: rebalancing after {event}",
        )

    def of(self, agent_id: str) -> str | None:
        return self.assigned.get(agent_id)

    def url_of(self, name: str | None) -> str | None:
        if name is None or name not in self.servers:
            return None
        return self.servers[name]["url"]


class NodeDirectory:
    """Registered nodes (the store's `nodes` table, in memory) and their live links."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.links: dict[str, Any] = {}  # name (or "name/worker" for gateways) -> NodeLink

    def load(self, rows: list[dict[str, Any]]) -> None:
        self.records = {r["name"]: dict(r) for r in rows}

    def refusal(self, name: str, fingerprint: str | None) -> str | None:
        """Why a link from this node is refused, or None."""
        record = self.records.get(name)
        if record is None:
            return f"node {name!r} is not registered"
        if record.get("revoked"):
            return f"node {name!r} is revoked"
        if record.get("fingerprint") is None:
            return f"node {name!r} has not enrolled"
        if fingerprint not in (record["fingerprint"], record.get("previous_fingerprint")):
            return f"node {name!r} presented a certificate other than the one it enrolled"
        return None

    def task_servers(self) -> list[str]:
        return [n for n, r in self.records.items() if r["role"] == "taskserver"]

    def gateways(self) -> list[str]:
        return [n for n, r in self.records.items() if r["role"] == "gateway"]

    def gateway_fingerprints(self, previous: bool = False) -> dict[str, str]:
        """Enrolled, not revoked gateways and their certificates' fingerprints (with
        `previous`, of the certificates they renewed last, where they did)."""
        field = "previous_fingerprint" if previous else "fingerprint"
        return {
            n: r[field]
            for n, r in self.records.items()
            if r["role"] == "gateway"
            and r.get("fingerprint")
            and r.get(field)
            and not r.get("revoked")
        }
