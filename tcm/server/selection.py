"""Targets and selection: saved targets, groups, and which agents a selection names now.

Filters (tcm/server/targets.py) are evaluated on the agents' current *views*: what the store
knows of each (host name, platform, groups, inventory classes) plus where it is now (online,
mode). `InventoryService` answers what is stale and what the store holds per agent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from zope.interface import implementer

from tcm.interfaces import IAgentPresence, IInventory, IJobs, ITargets
from tcm.server import inventory
from tcm.server.errors import Conflict, Invalid, NotFound
from tcm.server.targets import NAME, FieldSet, FilterError, Target, UnknownTarget, parse
from tcm.store import Conflict as StoreConflict

# Fields of an agent view that are not inventory classes (see TargetService.agent_views).
VIEW_FIELDS = frozenset(
    {"id", "name", "tags", "platform", "online", "mode", "group", "approved", "enrolled_at"}
    | {"last_seen"}
)
# Every field a filter may name: the view's own and each inventory class's (one place; a
# filter naming anything else is refused with a suggestion).
# `tags` is an admin's open map: any `tags.KEY` may be named.
KNOWN_FIELDS = FieldSet.of(VIEW_FIELDS | {"tags.*"}, inventory.FIELDS)
JOB_STATES = (
    "pending",
    "delivered",
    "running",
    "succeeded",
    "failed",
    "expired",
    "canceled",
    "unsupported",
)
SELECTORS = ("filter", "agents", "from_job", "target")


def filter_error(e: FilterError, field: str = "filter") -> Invalid:
    """The 400 for a filter that does not parse or names an unknown field."""
    if e.suggestion is not None:
        return Invalid(field, f"bad filter: {e}", position=e.position, suggestion=e.suggestion)
    return Invalid(field, f"bad filter: {e}", position=e.position)


def check_name(body: dict[str, Any], what: str) -> str:
    """The `name` of a target, group or API token; Invalid unless it is one."""
    name = body.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise Invalid(
            "name",
            f"'name' of a {what} must be 1-64 letters, digits, '_', '.', '-' (first a "
            "letter or digit)",
        )
    return name


def id_list(value: Any, what: str) -> list[str]:
    """A list of agent ids without repeats; Invalid naming `what` otherwise."""
    if not (isinstance(value, list) and all(isinstance(a, str) for a in value)):
        raise Invalid(what, f"'{what}' must be a list of agent ids")
    return list(dict.fromkeys(value))


def _description(body: dict[str, Any]) -> str:
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 255:
        raise Invalid("description", "'description' must be a string of at most 255 characters")
    return description


def member_rows(views: list[dict[str, Any]], ids: set[str]) -> list[dict[str, Any]]:
    """The members' rows of a target or selection answer, by id."""
    return [
        {
            "id": v["id"],
            "name": v["name"],
            "platform": v["platform"],
            "online": v["online"],
            "mode": v["mode"],
            "group": v["group"],
        }
        for v in sorted(views, key=lambda v: v["id"])
        if v["id"] in ids
    ]


def target_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": row["name"],
        "kind": "filter" if row["filter"] is not None else "static",
        "filter": row["filter"],
        "agents": row["agents"],
        "description": row["description"],
        "created_at": row["created_at"],
        "created_by": row["created_by"],
    }


@implementer(ITargets)
class TargetService:
    """Saved targets and groups, and the members of a target or selection now."""

    def __init__(
        self,
        target_store: Any,
        agent_store: Any,
        inventory_store: Any,
        directory: Any,  # AgentDirectory: the known agents
        presence: IAgentPresence,
        jobs: IJobs,  # the targets of a job, for `from_job`
        clock: Any,
    ):
        self._targets = target_store
        self._agents = agent_store
        self._inventory = inventory_store
        self._directory = directory
        self._presence = presence
        self._jobs = jobs
        self._clock = clock

    def _check_known(self, ids: list[str]) -> None:
        unknown = sorted(set(ids) - set(self._directory.ids()))
        if unknown:
            raise Invalid("agents", "unknown agent ids", unknown=unknown[:50])

    # -- views and resolution ------------------------------------------------------------
    @inlineCallbacks
    def agent_views(self, roots: frozenset[str] | set[str] = frozenset()):
        """The views filters are evaluated on, one per agent not revoked, built now.

        A view has `id`, `name` (its display name, by default the host name the agent
        gave; `hostname` is the inventory class of that name), `tags` (an admin's
        {key: value}, e.g. `tags.env == "prod"`),
        `platform`, `online` (a live session), `mode` ("persistent", "http" or None), `group`
        (its groups' names), `approved`, `enrolled_at`, `last_seen`, and each inventory class
        named in `roots` (e.g. `os`, `memory`) as stored. Fires with a list of dicts."""
        rows = yield self._agents.list_agents()
        groups = yield self._targets.group_memberships()
        classes = set(roots) - VIEW_FIELDS
        inventory_data = (yield self._inventory.inventory_data(classes)) if classes else {}
        views = []
        for r in rows:
            if r["revoked"]:
                continue
            agent_id = r["id"]
            session = self._presence.session(agent_id)
            view: dict[str, Any] = dict(inventory_data.get(agent_id, {}))
            view.update(
                id=agent_id,
                name=r.get("display_name") or r["hostname"],
                tags=dict(r.get("tags") or {}),
                platform=r["platform"],
                online=session is not None,
                mode="persistent" if session is not None else self._presence.http_mode_of(agent_id),
                group=groups.get(agent_id, []),
                approved=bool(r["approved"]),
                enrolled_at=r["enrolled_at"],
                last_seen=r["last_seen"],
            )
            views.append(view)
        return views

    @inlineCallbacks
    def load_target(self, name: str):
        """The saved Target of that name; UnknownTarget when there is none."""
        row = yield self._targets.get_target(name)
        if row is None:
            raise UnknownTarget(name)
        return Target.from_row(row)

    @inlineCallbacks
    def resolve_target(self, name: str):
        """The ids of a target's members now: Deferred[set[str]].

        A filter is evaluated on the agents' current views (inventory, groups, online
        state); a fixed list keeps the agents that still exist and are not revoked. Fails
        with UnknownTarget, or FilterError for a stored filter that no longer parses."""
        target = yield self.load_target(name)
        views = yield self.agent_views(target.roots(KNOWN_FIELDS))
        return target.members(views, KNOWN_FIELDS)

    @inlineCallbacks
    def resolve_targets(self, names: list[str] | None = None):
        """Members now of several targets (all saved ones by default), evaluated on one set of
        views: Deferred[dict[name, set[agent_id]]]. A target that is unknown is left out;
        one whose stored filter no longer parses has no members. With
        `targets.most_specific(result, agent_id)` this picks an agent's most specific
        target."""
        rows = yield self._targets.list_targets()
        wanted = None if names is None else set(names)
        found = [Target.from_row(r) for r in rows if wanted is None or r["name"] in wanted]
        roots: set[str] = set()
        for target in found:
            try:
                roots |= target.roots(KNOWN_FIELDS)
            except FilterError:
                pass
        views = yield self.agent_views(roots)
        out: dict[str, set[str]] = {}
        for target in found:
            try:
                out[target.name] = target.members(views, KNOWN_FIELDS)
            except FilterError:
                out[target.name] = set()
        return out

    @inlineCallbacks
    def members(self, name: str, field: str = "target"):
        """A saved target's members now: NotFound unknown, Invalid a stored filter that
        broke."""
        try:
            return (yield self.resolve_target(name))
        except UnknownTarget:
            raise NotFound(f"no such target: {name}") from None
        except FilterError as e:
            raise filter_error(e, field) from None

    @inlineCallbacks
    def scope(self, name: str):
        """The members of the target a token is scoped to (none if it broke or is gone)."""
        try:
            return (yield self.resolve_target(name))
        except (UnknownTarget, FilterError):
            return set()

    # -- selections ----------------------------------------------------------------------
    @inlineCallbacks
    def select(self, body: dict[str, Any]):
        """The agents a selection names: ("filter", text) or ("agents", sorted ids).

        One of: `filter` (an expression), `agents` (ids), `from_job` (a job id, with
        `state`: a state or a list of states, default every state), `target` (a saved
        target's members now)."""
        given = [k for k in SELECTORS if body.get(k) is not None]
        if len(given) != 1:
            raise Invalid(None, f"give exactly one of {', '.join(SELECTORS)}")
        kind = given[0]
        if kind != "from_job" and body.get("state") is not None:
            raise Invalid("state", "'state' goes with 'from_job'")
        if kind == "filter":
            text = body["filter"]
            if not isinstance(text, str):
                raise Invalid("filter", "'filter' must be a string")
            try:
                parse(text, KNOWN_FIELDS)
            except FilterError as e:
                raise filter_error(e) from None
            return "filter", text
        if kind == "agents":
            ids = id_list(body["agents"], "agents")
            self._check_known(ids)
            return "agents", sorted(ids)
        if kind == "target":
            if not isinstance(body["target"], str):
                raise Invalid("target", "'target' must be a target name")
            return "agents", sorted((yield self.members(body["target"])))
        job_id = body["from_job"]
        states = body.get("state")
        if isinstance(states, str):
            states = [states]
        if states is not None and not (
            isinstance(states, list) and states and all(s in JOB_STATES for s in states)
        ):
            raise Invalid("state", f"'state' must be one or more of {', '.join(JOB_STATES)}")
        if not isinstance(job_id, str):
            raise Invalid("from_job", "'from_job' must be a job id")
        agents = yield self._jobs.agents_in_states(job_id, states)
        return "agents", agents

    @inlineCallbacks
    def selection(self, body: dict[str, Any]):
        """The members of a selection (as for a target), without saving it: member rows."""
        kind, value = yield self.select(body)
        if kind == "filter":
            f = parse(value)
            views = yield self.agent_views(f.roots)
            ids = f.select(views)
        else:
            views = yield self.agent_views()
            ids = set(value)
        return member_rows(views, ids)

    # -- saved targets -------------------------------------------------------------------
    @inlineCallbacks
    def create_target(self, body: dict[str, Any], created_by: str):
        """Save a target from a selection: fires with (its view, audit details)."""
        name = check_name(body, "target")
        description = _description(body)
        kind, value = yield self.select(body)
        row = {
            "name": name,
            "filter": value if kind == "filter" else None,
            "agents": value if kind == "agents" else None,
            "description": description,
            "created_at": self._clock.seconds(),
            "created_by": created_by,
        }
        try:
            yield self._targets.create_target(row)
        except StoreConflict as e:
            raise Conflict(str(e)) from None
        details = {k: body[k] for k in (*SELECTORS, "state") if body.get(k) is not None}
        if kind == "agents":
            details["agents"] = value
        return target_view(row), details

    @inlineCallbacks
    def exists(self, name: str):
        """Whether a target of that name is saved: Deferred[bool]."""
        return (yield self._targets.get_target(name)) is not None

    @inlineCallbacks
    def list_targets(self):
        return [target_view(r) for r in (yield self._targets.list_targets())]

    @inlineCallbacks
    def get_target(self, name: str):
        """A target's view with how many members it has now."""
        row = yield self._targets.get_target(name)
        if row is None:
            raise NotFound(f"no such target: {name}")
        members = yield self.members(name)
        return {**target_view(row), "members": len(members)}

    @inlineCallbacks
    def member_rows(self, name: str):
        ids = yield self.members(name)
        views = yield self.agent_views()
        return member_rows(views, ids)

    @inlineCallbacks
    def delete_target(self, name: str):
        if not (yield self._targets.delete_target(name)):
            raise NotFound(f"no such target: {name}")

    # -- groups --------------------------------------------------------------------------
    @inlineCallbacks
    def create_group(self, body: dict[str, Any]):
        """Create a group: fires with (its row, its agents)."""
        name = check_name(body, "group")
        description = _description(body)
        agents = id_list(body.get("agents", []), "agents")
        self._check_known(agents)
        try:
            yield self._targets.create_group(name, description, self._clock.seconds(), agents)
        except StoreConflict as e:
            raise Conflict(str(e)) from None
        return (yield self._targets.get_group(name)), agents

    def list_groups(self):
        return self._targets.list_groups()

    @inlineCallbacks
    def get_group(self, name: str):
        row = yield self._targets.get_group(name)
        if row is None:
            raise NotFound(f"no such group: {name}")
        return row

    @inlineCallbacks
    def delete_group(self, name: str):
        if not (yield self._targets.delete_group(name)):
            raise NotFound(f"no such group: {name}")

    @inlineCallbacks
    def change_group(self, name: str, add: list[str], remove: list[str]):
        """Add and remove members: fires with the group's row."""
        if not add and not remove:
            raise Invalid(None, "give agent ids to 'add' or 'remove'")
        self._check_known(add)
        if not (yield self._targets.change_group(name, add, remove)):
            raise NotFound(f"no such group: {name}")
        return (yield self._targets.get_group(name))


@implementer(IInventory)
class InventoryService:
    """What the store holds of agents' inventories and how fresh each class is."""

    def __init__(
        self,
        inventory_store: Any,
        agent_store: Any,
        directory: Any,
        targets: ITargets,
        clock: Any,
    ):
        self._inventory = inventory_store
        self._agents = agent_store
        self._directory = directory
        self._targets = targets
        self._clock = clock

    @inlineCallbacks
    def of_agent(self, agent_id: str):
        """{class: stored data} of one agent; NotFound for an unknown agent."""
        if (yield self._agents.get_agent(agent_id)) is None:
            raise NotFound(f"no such agent: {agent_id}")
        return (yield self._inventory.get_inventory(agent_id))

    @inlineCallbacks
    def history(self, agent_id: str, cls: str | None):
        """The versions kept of an agent's classes (or of one), without data; NotFound."""
        if (yield self._agents.get_agent(agent_id)) is None:
            raise NotFound(f"no such agent: {agent_id}")
        return (yield self._inventory.class_history(agent_id, cls))

    @inlineCallbacks
    def version(self, agent_id: str, cls: str, version: int | None):
        """One version of one class with its data (None: the current); NotFound."""
        if (yield self._agents.get_agent(agent_id)) is None:
            raise NotFound(f"no such agent: {agent_id}")
        row = yield self._inventory.class_version(agent_id, cls, version)
        if row is None:
            which = "no" if version is None else f"no version {version} of"
            raise NotFound(f"{which} inventory class {cls!r} kept for agent {agent_id}")
        return row

    @inlineCallbacks
    def diff(self, agent_id: str, cls: str, old: int | None, new: int | None):
        """What changed in a class from version `old` to `new` (default: the current one and
        the one before it); NotFound for a version not kept."""
        if new is None:
            newest = yield self.version(agent_id, cls, None)
        else:
            newest = yield self.version(agent_id, cls, new)
        if old is None:
            if newest["version"] <= 1:
                raise NotFound(f"inventory class {cls!r} of agent {agent_id} has one version")
            old = newest["version"] - 1
        oldest = yield self.version(agent_id, cls, old)
        return {
            "agent": agent_id,
            "class": cls,
            "from": oldest["version"],
            "to": newest["version"],
            "from_digest": oldest["digest"],
            "to_digest": newest["digest"],
            **inventory.diff(oldest["data"], newest["data"]),
        }

    @inlineCallbacks
    def stale(self, older_than: float, target: Any, classes: Any):
        """The (agent, class) items older than `older_than` seconds, among the members of
        `target` (default every agent), and the stored digests: fires with (items,
        digests)."""
        if classes is None:
            classes = list(inventory.CLASSES)
        elif not (
            isinstance(classes, list)
            and classes
            and all(isinstance(c, str) and 0 < len(c) <= 64 for c in classes)
        ):
            raise Invalid("classes", "'classes' must be a non-empty list of inventory class names")
        if target is None:
            agents = set(self._directory.ids())
        elif isinstance(target, str):
            agents = yield self._targets.members(target)
        else:
            raise Invalid("target", "'target' must be a target name")
        times = yield self._inventory.inventory_times()
        now = self._clock.seconds()
        items = inventory.stale(
            {k: v[0] for k, v in times.items()}, agents, classes, now, older_than
        )
        return items, {k: v[1] for k, v in times.items()}
