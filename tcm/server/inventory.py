"""Inventory freshness: what an `inventory.collect` result says, what is stale, what to ask.

Pure domain code. The server keeps one row per agent and data class (its data, the digest of
the data, when it was last collected); these functions decide what a result changes, which
(agent, class) pairs are stale, and which refresh jobs to create.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

ACTION = "inventory.collect"

# The data classes the built-in inventory action collects (tcm/plugins/builtin_inventory.py;
# a test checks the two lists agree). Stale/missing is judged against these.
CLASSES: tuple[str, ...] = (
    "os",
    "hostname",
    "cpu",
    "memory",
    "disks",
    "network",
    "software",
    "users",
)

# The fields each class holds, as paths below the class (lists fanned out, as filters walk
# them): what a filter may name besides the agent's own fields (tcm/server/selection.py). A
# test checks that the built-in collectors produce no field outside these.
FIELDS: dict[str, tuple[str, ...]] = {
    "os": ("system", "id", "id_like", "family", "name", "version", "kernel", "arch"),
    "hostname": ("hostname", "fqdn"),
    "cpu": ("model", "logical", "physical", "freq_mhz.current", "freq_mhz.min", "freq_mhz.max"),
    "memory": (
        "total",
        "available",
        "used",
        "percent",
        "swap.total",
        "swap.used",
        "swap.free",
    ),
    "disks": tuple(
        f"partitions.{f}" for f in ("device", "mountpoint", "fstype", "total", "used", "free")
    ),
    "network": (
        *(f"interfaces.{f}" for f in ("name", "mac", "is_up", "speed", "mtu")),
        *(f"interfaces.addresses.{f}" for f in ("family", "address", "netmask", "broadcast")),
    ),
    "software": ("manager", "count", "packages.name", "packages.version", "packages.arch"),
    "users": tuple(f"users.{f}" for f in ("name", "terminal", "host", "started", "pid")),
}

# At most this many distinct digests of one class go into a refresh job's `known` map; past
# that the class is simply sent in full.
MAX_KNOWN_DIGESTS = 32


def digest(data: Any) -> str:
    """SHA-256 hex of the canonical JSON of `data` (the agent computes the same)."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@attrs.frozen
class Collected:
    """What one `inventory.collect` result tells: classes sent in full (data, digest), and
    classes the agent found unchanged (their digest only)."""

    changed: dict[str, tuple[Any, str]]
    unchanged: dict[str, str]
    collected_at: float


def read_result(result: Any, now: float) -> Collected | None:
    """The inventory in an action result, or None when it holds none.

    The agent's `collected_at` is used unless it lies in the server's future (a fast agent
    clock): then the server's time of storing is."""
    if not isinstance(result, Mapping):
        return None
    classes = result.get("classes")
    digests = result.get("digests")
    if not isinstance(classes, Mapping):
        return None
    if not isinstance(digests, Mapping):
        digests = {}
    changed: dict[str, tuple[Any, str]] = {}
    for name, data in classes.items():
        if isinstance(name, str) and 0 < len(name) <= 64:
            changed[name] = (data, digest(data))
    unchanged = {
        name: value
        for name, value in digests.items()
        if isinstance(name, str)
        and name not in changed
        and 0 < len(name) <= 64
        and isinstance(value, str)
        and len(value) <= 64
    }
    at = result.get("collected_at")
    if isinstance(at, bool) or not isinstance(at, int | float) or not 0 < at <= now:
        at = now
    return Collected(changed, unchanged, float(at))


@attrs.frozen
class Staleness:
    agent: str
    cls: str
    collected_at: float | None  # None: never collected

    def to_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "class": self.cls, "collected_at": self.collected_at}


def stale(
    times: Mapping[tuple[str, str], float],
    agents: Iterable[str],
    classes: Iterable[str],
    now: float,
    older_than: float,
) -> list[Staleness]:
    """Every (agent, class) collected before `now - older_than`, or never, sorted."""
    cutoff = now - older_than
    out = []
    wanted = list(classes)
    for agent in sorted(agents):
        for cls in wanted:
            at = times.get((agent, cls))
            if at is None or at < cutoff:
                out.append(Staleness(agent, cls, at))
    return out


@attrs.frozen
class RefreshJob:
    """One `inventory.collect` job of a refresh: these classes from these agents."""

    classes: tuple[str, ...]
    agents: tuple[str, ...]
    known: dict[str, list[str]]

    def args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"classes": list(self.classes)}
        if self.known:
            args["known"] = self.known
        return args


def refresh_plan(
    items: Iterable[Staleness], digests: Mapping[tuple[str, str], str]
) -> list[RefreshJob]:
    """One job per distinct set of stale classes, asking those agents for just those.

    `known` lists the digests the server holds for each class among the job's agents, so an
    agent whose data did not change sends its digest only (a job's arguments are the same for
    every agent, hence a list of digests per class rather than one)."""
    by_agent: dict[str, set[str]] = {}
    for item in items:
        by_agent.setdefault(item.agent, set()).add(item.cls)
    by_set: dict[tuple[str, ...], list[str]] = {}
    for agent, classes in by_agent.items():
        key = tuple(c for c in CLASSES if c in classes) + tuple(
            sorted(c for c in classes if c not in CLASSES)
        )
        by_set.setdefault(key, []).append(agent)
    jobs = []
    for classes_key, agents in sorted(by_set.items()):
        known: dict[str, list[str]] = {}
        for cls in classes_key:
            held = sorted({digests[(a, cls)] for a in agents if (a, cls) in digests})
            if held and len(held) <= MAX_KNOWN_DIGESTS:
                known[cls] = held
        jobs.append(RefreshJob(classes_key, tuple(sorted(agents)), known))
    return jobs
