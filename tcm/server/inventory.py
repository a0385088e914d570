"""Inventory freshness: what an `inventory.collect` result says, what is stale, what to ask.

Pure domain code. The server keeps one row per agent and data class (its data, the digest of
the data, when it was last collected); these functions decide what a result changes, which
(agent, class) pairs are stale, and which refresh jobs to create.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from tcm.protocol.canonical import JSONText, canonical

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

# The server names a version of a class to an agent by the first DIGEST_PREFIX hex digits
# of its digest (64 bits: enough to tell one agent's versions of one class apart), so that a
# collection where nothing changed stays small both ways.
DIGEST_PREFIX = 16

# A class whose canonical JSON is larger than this is refused (the rest of the result is
# kept); the server option --inventory-class-bytes sets it.
DEFAULT_MAX_CLASS_BYTES = 8 * 1024 * 1024

_HEX = frozenset("0123456789abcdef")


def digest(data: Any) -> str:
    """SHA-256 hex of the canonical JSON of `data` (the agent computes the same)."""
    return hashlib.sha256(canonical(data).encode("utf-8")).hexdigest()


def _is_digest(value: Any, shortest: int = DIGEST_PREFIX) -> bool:
    return isinstance(value, str) and shortest <= len(value) <= 64 and set(value) <= _HEX


@attrs.frozen
class Collected:
    """What one `inventory.collect` result tells: classes sent in full (data, digest), and
    classes the agent found unchanged (the digest, or the prefix of it, it matched).

    The data of a class read from the wire is its canonical JSON text (`JSONText`): the parsed
    form takes several times the memory and is dropped at once. `rejected` names what was
    refused and why."""

    changed: dict[str, tuple[Any, str]]
    unchanged: dict[str, str]
    collected_at: float
    rejected: dict[str, str] = attrs.field(factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a job target's result keeps of this collection: which classes changed and
        which did not, with their digests (shortened), not the data (that is stored once,
        in the inventory store)."""
        out: dict[str, Any] = {
            "changed": {c: d[:DIGEST_PREFIX] for c, (_, d) in sorted(self.changed.items())},
            "unchanged": {c: d[:DIGEST_PREFIX] for c, d in sorted(self.unchanged.items())},
        }
        if self.rejected:
            out["rejected"] = dict(sorted(self.rejected.items()))
        return out

    def size(self) -> int:
        """Characters of class data held as canonical JSON text."""
        return sum(len(d) for d, _ in self.changed.values() if isinstance(d, JSONText))

    def problem(self) -> str | None:
        """One line on what was refused, for the target's error; None when nothing was."""
        if not self.rejected:
            return None
        return "inventory refused: " + "; ".join(
            f"{name}: {why}" for name, why in sorted(self.rejected.items())
        )


def read_result(
    result: Any,
    now: float,
    max_class_bytes: int = DEFAULT_MAX_CLASS_BYTES,
    classes: Iterable[str] = (),
    known: Mapping[str, str] | None = None,
) -> Collected | None:
    """The inventory in an action result, or None when it holds none.

    Each class is checked on its own: an unknown class name (when `classes` lists the known
    ones), a class over `max_class_bytes`, a digest that is not the data's, or an unchanged
    class without a digest is refused and named in `rejected`; the rest is kept. A class
    named in `unchanged` without a digest is the version the server told the agent it holds
    (`known`: class -> digest prefix). The agent's
    `collected_at` is used unless it lies in the server's future (a fast agent clock): then
    the server's time of storing is."""
    if not isinstance(result, Mapping):
        return None
    sent = result.get("classes")
    digests = result.get("digests")
    if not isinstance(sent, Mapping):
        return None
    if not isinstance(digests, Mapping):
        digests = {}
    valid = frozenset(classes)
    rejected: dict[str, str] = {}

    def refused(name: Any) -> bool:
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            rejected[str(name)[:64] or "?"] = "not a class name (1..64 characters)"
            return True
        if valid and name not in valid:
            rejected[name] = f"unknown class; known classes: {', '.join(sorted(valid))}"
            return True
        return False

    changed: dict[str, tuple[Any, str]] = {}
    for name, data in sent.items():
        if refused(name):
            continue
        text = canonical(data)
        encoded = text.encode("utf-8")
        if len(encoded) > max_class_bytes:
            rejected[name] = (
                f"{len(encoded)} bytes, over the {max_class_bytes} bytes a class may have"
            )
            continue
        full = hashlib.sha256(encoded).hexdigest()
        del encoded
        claimed = digests.get(name)
        if claimed is not None and claimed != full:
            rejected[name] = f"digest {str(claimed)[:64]!r} is not the digest of the data sent"
            continue
        changed[name] = (JSONText(text), full)
    unchanged: dict[str, str] = {}
    for name, value in digests.items():
        if name in changed or name in rejected or name in sent or refused(name):
            continue
        if not _is_digest(value):
            rejected[name] = "an unchanged class needs its digest (16 to 64 lowercase hex digits)"
            continue
        unchanged[name] = value
    named = result.get("unchanged")
    for name in named if isinstance(named, list) else ():
        if name in unchanged or name in changed or name in rejected or name in digests:
            continue
        if refused(name):
            continue
        held = (known or {}).get(name)
        if held is None:
            rejected[name] = "said unchanged, but the server named no version of it"
            continue
        unchanged[name] = held
    at = result.get("collected_at")
    if isinstance(at, bool) or not isinstance(at, int | float) or not 0 < at <= now:
        at = now
    return Collected(changed, unchanged, float(at), rejected)


class KnownDigests:
    """The digest of every class the store holds per agent, in memory, shortened to
    DIGEST_PREFIX: what each inventory collection tells its agent the server has. Filled
    from the store at startup and kept up to date as collections are stored; wrong at worst
    for a moment (another node stored a newer version), which costs one class sent in full
    or one class left stale until the next collection, never wrong data."""

    def __init__(self) -> None:
        self._by_agent: dict[str, dict[str, str]] = {}

    def load(self, digests: Mapping[tuple[str, str], str]) -> None:
        for (agent, cls), value in digests.items():
            self.set(agent, cls, value)

    def set(self, agent: str, cls: str, value: str) -> None:
        self._by_agent.setdefault(agent, {})[cls] = value[:DIGEST_PREFIX]

    def forget(self, agent: str, cls: str | None = None) -> None:
        """Forget what is held for an agent (removed) or one class of it (the store turned
        out not to hold it: the next collection asks for it in full)."""
        if cls is None:
            self._by_agent.pop(agent, None)
            return
        held = self._by_agent.get(agent)
        if held is not None:
            held.pop(cls, None)

    def stored(self, agent: str, collected: Collected) -> None:
        """A collection of `agent` is committed: the classes it sent are now known."""
        for cls, (_, full) in collected.changed.items():
            self.set(agent, cls, full)

    def known(self, agent: str) -> dict[str, str]:
        """class -> digest prefix the server holds for `agent`."""
        return dict(self._by_agent.get(agent, {}))

    def __len__(self) -> int:
        return len(self._by_agent)


def collect_args(args: Mapping[str, Any], known: Mapping[str, str]) -> dict[str, Any]:
    """The arguments of one agent's `inventory.collect` request: the job's, with the digests
    the server holds for that agent (of the classes asked for) as `known`. Arguments that
    name `known` themselves are left as they are."""
    if "known" in args or not known:
        return dict(args)
    classes = args.get("classes")
    wanted = known if classes is None else {c: known[c] for c in classes if c in known}
    if not wanted:
        return dict(args)
    return {**args, "known": dict(sorted(wanted.items()))}


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
    """One `inventory.collect` job of a refresh: these classes from these agents (each
    agent's request carries the digests the server holds for it, added at dispatch)."""

    classes: tuple[str, ...]
    agents: tuple[str, ...]

    def args(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}


def refresh_plan(items: Iterable[Staleness]) -> list[RefreshJob]:
    """One job per distinct set of stale classes, asking those agents for just those."""
    by_agent: dict[str, set[str]] = {}
    for item in items:
        by_agent.setdefault(item.agent, set()).add(item.cls)
    by_set: dict[tuple[str, ...], list[str]] = {}
    for agent, classes in by_agent.items():
        key = tuple(c for c in CLASSES if c in classes) + tuple(
            sorted(c for c in classes if c not in CLASSES)
        )
        by_set.setdefault(key, []).append(agent)
    return [
        RefreshJob(classes_key, tuple(sorted(agents)))
        for classes_key, agents in sorted(by_set.items())
    ]


def stored_summary(result: Any) -> dict[str, Any] | None:
    """The `inventory` summary a job target's result holds (changed/unchanged classes with
    digests), or None when it holds none (another action, or stored in full by an older
    server)."""
    if not isinstance(result, Mapping):
        return None
    summary = result.get("inventory")
    if not isinstance(summary, Mapping):
        return None
    changed, unchanged = summary.get("changed"), summary.get("unchanged")
    if not isinstance(changed, Mapping) or not isinstance(unchanged, Mapping):
        return None
    return {
        "changed": dict(changed),
        "unchanged": dict(unchanged),
        **{k: v for k, v in summary.items() if k not in ("changed", "unchanged")},
    }


def shown_result(
    result: Mapping[str, Any],
    summary: Mapping[str, Any],
    data: Mapping[str, Any],
    omitted: Iterable[str] = (),
) -> dict[str, Any]:
    """A target's inventory result as the jobs API shows it: the classes the agent sent,
    with their data read back from the inventory store (`null` and named in `purged` when
    that version is no longer kept, or in `omitted` when the status would be too large),
    the digests and the classes found unchanged."""
    classes = {cls: data.get(cls) for cls in summary["changed"]}
    out: dict[str, Any] = {
        **result,
        "classes": classes,
        "digests": {**summary["unchanged"], **summary["changed"]},
        "unchanged": sorted(summary["unchanged"]),
    }
    left_out = set(omitted)
    purged = sorted(c for c in summary["changed"] if c not in data and c not in left_out)
    if purged:
        out["purged"] = purged
    if left_out:
        out["omitted"] = sorted(left_out)
    return out


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    """Leaves of a JSON value by path. Lists of objects that have a `name` are keyed by it
    (and `arch` where there is one: a package installed for two architectures), so that a
    package added to a list of thousands is one change, not a shift of every later index."""
    if isinstance(value, Mapping) and value:
        for key in sorted(value):
            _flatten(value[key], f"{path}.{key}" if path else str(key), out)
    elif isinstance(value, list) and value:
        named = all(isinstance(v, Mapping) and isinstance(v.get("name"), str) for v in value)
        keys = [
            f"{v['name']}:{v['arch']}" if named and v.get("arch") else (v["name"] if named else i)
            for i, v in enumerate(value)
        ]
        if named and len(set(keys)) != len(keys):  # names repeat: by position after all
            keys = list(range(len(value)))
        for key, v in zip(keys, value, strict=True):
            _flatten(v, f"{path}[{key}]", out)
    else:
        out[path] = value


def diff(old: Any, new: Any) -> dict[str, dict[str, Any]]:
    """What changed from `old` to `new` (two versions of a class's data), leaf by leaf:
    {"added": {path: value}, "removed": {path: value}, "changed": {path: [old, new]}}."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    _flatten(old, "", before)
    _flatten(new, "", after)
    return {
        "added": {k: after[k] for k in sorted(after.keys() - before.keys())},
        "removed": {k: before[k] for k in sorted(before.keys() - after.keys())},
        "changed": {
            k: [before[k], after[k]]
            for k in sorted(before.keys() & after.keys())
            if before[k] != after[k]
        },
    }
