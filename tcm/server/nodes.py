"""Registered relay nodes and which task server each agent uses.

`NodeDirectory` keeps the registered nodes (from the store) and their live links.
`TaskServerAssignments` is the assignment policy, plain logic without I/O:

- policy "fewest": the connected task server with the fewest assigned agents;
- policy "capacity": the one with the most free places (its maximum minus its agents), which
  differs from "fewest" when task servers have different maximums;
- a task server never gets more than its maximum of registered clients (default 5,000, as in
  the system tcm descends from);
- failover: when a task server's link goes down its agents are assigned again at once, each
  move logged with its reason; an agent that finds no place is told why (its task jobs then
  come over its own session with the server).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

POLICIES = ("fewest", "capacity")
DEFAULT_MAX_CLIENTS = 5000


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

    # -- task servers ------------------------------------------------------------------
    def up(self, name: str, url: str, max_clients: int | None) -> None:
        self.servers[name] = {"url": url, "max": max_clients or self.default_max}
        self.counts.setdefault(name, 0)

    def down(self, name: str) -> list[str]:
        """A task server is gone: its agents, now without a task server."""
        self.servers.pop(name, None)
        moved = [a for a, n in self.assigned.items() if n == name]
        for agent_id in moved:
            del self.assigned[agent_id]
        self.counts.pop(name, None)
        return moved

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
                return current, "assigned"
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
        return name, f"assigned by policy {self.policy!r}"

    def release(self, agent_id: str) -> None:
        name = self.assigned.pop(agent_id, None)
        if name is not None and name in self.counts:
            self.counts[name] -= 1

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
        if fingerprint != record["fingerprint"]:
            return f"node {name!r} presented a certificate other than the one it enrolled"
        return None

    def task_servers(self) -> list[str]:
        return [n for n, r in self.records.items() if r["role"] == "taskserver"]

    def gateways(self) -> list[str]:
        return [n for n, r in self.records.items() if r["role"] == "gateway"]

    def gateway_fingerprints(self) -> dict[str, str]:
        """Enrolled, not revoked gateways and their certificates' fingerprints."""
        return {
            n: r["fingerprint"]
            for n, r in self.records.items()
            if r["role"] == "gateway" and r.get("fingerprint") and not r.get("revoked")
        }
