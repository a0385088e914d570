"""The declared shape of every /api/v1 and /agent/v1 operation: request body, query and path
parameters, and response bodies, as JSON Schema.

The schemas are plain dictionaries in the subset of JSON Schema 2020-12 that fastjsonschema
compiles (no `$ref`, numeric `exclusiveMinimum`, type lists for null). `JsonRouter` checks every
request against its operation before the handler runs (`tcm/server/apicheck.py`); `tcm/server/
openapi.py` publishes the same dictionaries as an OpenAPI 3.1 document.

Every number has both bounds, every string a maximum length (or an enum), every array a
maximum length: a body the schema passes cannot overflow a column or an integer. Values whose
shape another part owns are free-form here and checked there: a job's `args` (by the action on
the agent), a policy's `document` (by its policy type), a job's `result`.

Two keywords of our own (JSON Schema ignores unknown keywords, OpenAPI allows them):
`x-message` replaces the generic message of any failure at or below that property (the
wording clients and tests already know; `{detail}` in it is replaced by what is wrong below),
`x-unknown` is the message for unknown members of an object (`{names}` is replaced by them).
"""

from __future__ import annotations

from typing import Any

import attrs

from tcm.installpackage import SERVER_URL_PATTERN
from tcm.protocol.schemas import NAME_PATTERN, PROFILE_SETTINGS
from tcm.server.roles import ROLES

MAX_SECONDS = 10 * 365 * 86400.0  # ten years: the longest time span a request may name
CSV_TEXT = {"type": "string", "contentMediaType": "text/csv"}  # a text/csv answer
PACKAGE_ARCHIVE = {"type": "string", "contentMediaType": "application/gzip"}  # a .tar.gz
MAX_EPOCH = 1e11  # epoch seconds (year 5138): any real clock's time
MAX_INT32 = 2**31 - 1  # integer columns of the store
MAX_ITEMS = 100_000  # agent ids in one list
MAX_TEXT = 4 * 1024 * 1024  # one output chunk or error text (a body is at most 8 MiB)

# -- building blocks -------------------------------------------------------------------------


NO_NUL = r"^[^\u0000]*$"  # PostgreSQL text cannot hold NUL: refused here, not failed there
# printable: no C0 control character, DEL or C1 control character (a host name, a label)
PRINTABLE = r"^[^\u0000-\u001f\u007f-\u009f]*$"


def string(
    max_length: int = 255, pattern: str | None = NO_NUL, min_length: int = 0
) -> dict[str, Any]:
    """A bounded string; NUL refused unless `pattern` is None (text the agent relays as is)."""
    s: dict[str, Any] = {"type": "string", "maxLength": max_length}
    if min_length:
        s["minLength"] = min_length
    if pattern is not None:
        s["pattern"] = pattern
    return s


def number(minimum: float = 0, maximum: float = MAX_SECONDS, exclusive: bool = False) -> dict:
    lower = "exclusiveMinimum" if exclusive else "minimum"
    return {"type": "number", lower: minimum, "maximum": maximum}


def integer(minimum: int = 0, maximum: int = MAX_INT32) -> dict:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def nullable(schema: dict) -> dict:
    return {**schema, "type": [schema["type"], "null"]}


def array(items: dict, max_items: int = MAX_ITEMS, min_items: int = 0) -> dict:
    a: dict[str, Any] = {"type": "array", "items": items, "maxItems": max_items}
    if min_items:
        a["minItems"] = min_items
    return a


def obj(
    properties: dict[str, dict],
    required: tuple[str, ...] = (),
    closed: bool = True,
    unknown: str | None = None,
    **more: Any,
) -> dict:
    """An object; `closed`: members not in `properties` are refused (with `unknown` as the
    message, `{names}` replaced)."""
    o: dict[str, Any] = {"type": "object", "properties": properties, **more}
    if required:
        o["required"] = list(required)
    if closed:
        o["additionalProperties"] = False
        if unknown is not None:
            o["x-unknown"] = unknown
    return o


def said(message: str, schema: dict) -> dict:
    """`schema` whose failures answer with `message`."""
    return {**schema, "x-message": message}


FREE_FORM: dict[str, Any] = {"description": "any JSON value; its owner checks it"}
FREE_OBJECT: dict[str, Any] = {
    "type": "object",
    "maxProperties": 10_000,
    "description": "a JSON object whose owner checks it",
}

AGENT_ID = string(64, min_length=1)
JOB_ID = string(64, min_length=1)
TARGET_NAME = string(64, r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # targets.NAME
CONFIG_NAME = string(64, NAME_PATTERN)  # policies, profiles, policy types
NODE_NAME = string(63, r"^[a-z0-9][a-z0-9_.-]{0,62}$")  # nodeapi.NODE_NAME
ACTION_NAME = string(64, r"^[a-z][a-z0-9_.-]{0,63}$")
DESCRIPTION = said("'description' must be a string of at most 255 characters (no NUL)", string(255))
JOB_STATES = [
    "pending",
    "delivered",
    "running",
    "succeeded",
    "failed",
    "expired",
    "canceled",
    "unsupported",
]
SEGMENT = string(256, min_length=1)  # a path parameter: one URL segment as sent
NAME_RULE = "1-64 letters, digits, '_', '.', '-' (first a letter or digit)"

# -- responses -------------------------------------------------------------------------------

ERROR: dict[str, Any] = obj({"error": {"type": "string"}}, required=("error",), closed=False)
NONE = None  # a response without a body (204)
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def listing(key: str, items: dict | None = None, **more: dict) -> dict:
    """{key: [items], ...more}."""
    return obj(
        {key: {"type": "array", "items": items or ANY_OBJECT}, **more},
        required=(key, *more),
        closed=False,
    )


def fields(*required: str, **properties: dict) -> dict:
    """An object answer with at least `required` members (more may come)."""
    return obj(properties, required=required, closed=False)


_STR, _NUM, _INT, _BOOL = (
    {"type": "string"},
    {"type": "number"},
    {"type": "integer"},
    {"type": "boolean"},
)
_OPT_STR, _OPT_NUM, _OPT_INT = (
    {"type": ["string", "null"]},
    {"type": ["number", "null"]},
    {"type": ["integer", "null"]},
)
AGENT_VIEW = fields(
    "id",
    "hostname",
    "online",
    "revoked",
    id=_STR,
    hostname=_STR,
    platform=_STR,
    online=_BOOL,
    mode=_OPT_STR,
    via=_OPT_STR,
    connected_since=_OPT_NUM,
    last_seen=_OPT_NUM,
    enrolled_at=_NUM,
    revoked=_BOOL,
    approved=_BOOL,
    capabilities={"type": "array", "items": _STR},
    name=_STR,  # display name (default: the hostname)
    tags={"type": "object", "additionalProperties": _STR},
    task_server=_OPT_STR,
    state={"enum": ["ok", "awaiting approval", "revoked", "deleted", "cloned"]},
    deleted=_BOOL,
    cloned=_STR,  # why the identity was found cloned (issue 16.5)
)
TARGET_VIEW = fields(
    "name",
    "kind",
    name=_STR,
    kind={"enum": ["filter", "static"]},
    filter=_OPT_STR,
    agents={"type": ["array", "null"], "items": _STR},
    description=_STR,
    created_at=_NUM,
    created_by=_STR,
)
GROUP_VIEW = fields("name", name=_STR, description=_STR, created_at=_NUM)
MEMBERS = listing("members", fields("id", id=_STR, online=_BOOL))
POLICY_VIEW = fields(
    "name", "type", "version", name=_STR, type=_STR, version=_INT, document=ANY_OBJECT
)
PROFILE_VIEW = fields("name", "version", name=_STR, version=_INT, settings=ANY_OBJECT)
JOB_CREATED = fields("job", job=_STR)
INVENTORY_VERSION = fields(
    "class",
    "version",
    "digest",
    "current",
    version=_INT,
    digest=_STR,
    collected_at=_NUM,
    changed_at=_NUM,
    replaced_at=_OPT_NUM,
    current=_BOOL,
)
NODE_REGISTERED = fields("name", "token", name=_STR, token=_STR, max_clients=_OPT_INT)
STORED = fields("stored")
JOB_STATUS = fields("id", "action", "counts", id=_STR, action=_STR, counts=ANY_OBJECT)

# -- request pieces --------------------------------------------------------------------------

SECONDS_QUERY = number()  # ?older_than=, ?since= (epoch seconds fit: MAX_SECONDS > now)
SELECTION_PROPERTIES: dict[str, dict] = {
    "filter": said("'filter' must be a string", string(4096)),
    "agents": said("'agents' must be a list of agent ids", array(AGENT_ID)),
    "from_job": said("'from_job' must be a job id", JOB_ID),
    "state": said(
        f"'state' must be one or more of {', '.join(JOB_STATES)}",
        {
            "anyOf": [
                {"enum": JOB_STATES},
                array({"enum": JOB_STATES}, len(JOB_STATES), min_items=1),
            ]
        },
    ),
    "target": said("'target' must be a target name", string(64)),
}
TARGETS_ALL_OR_IDS = said(
    "'targets' must be \"all\" or a non-empty list of agent ids",
    {"anyOf": [{"const": "all"}, array(AGENT_ID, min_items=1)]},
)
_settings = PROFILE_SETTINGS["properties"]
PROFILE_SETTINGS_BODY = said(
    "bad profile setting: {detail}",
    obj(
        {
            **_settings,
            # the protocol's schema bounds the proxy by its pattern only
            "proxy": {**_settings["proxy"], "maxLength": 512},
        },
        unknown="unknown profile setting(s) {names}",
    ),
)
POLICY_TARGETS = said("'targets' must be a list of target names", array(string(64), 1024))
PROFILE_PRIORITY = said("'priority' must be an integer", integer(-1_000_000, 1_000_000))
# A text/event-stream answer: the schema of each of its events (as OpenAPI 3.2's itemSchema)
SSE_EVENT = {
    "type": "object",
    "contentMediaType": "text/event-stream",
    "properties": {
        "event": {"enum": ["hello", "batch", "close"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["event", "data"],
}
EMPTY_BODY = obj({})  # routes that take no body: nothing, or {} (what the CLI sends)


@attrs.frozen
class Operation:
    """One route's declaration. `body` None: the route reads no body; `path`: a schema per
    `{name}` of the pattern (default SEGMENT); `responses`: status -> schema (None: no body);
    every operation also answers errors as ERROR."""

    summary: str
    body: dict[str, Any] | None = None
    body_required: bool = True
    query: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    path: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    responses: dict[int, dict[str, Any] | None] = attrs.field(factory=lambda: {200: ANY_OBJECT})


def _op(summary: str, body: dict | None = None, **kw: Any) -> Operation:
    return Operation(summary, body, **kw)


ENROLL_NEEDS = "enroll needs 'token' and 'csr' (PEM) strings"
ADMIN = "/api/v1"
AGENT = "/agent/v1"

OPERATIONS: dict[tuple[str, str], Operation] = {
    # -- the server ---------------------------------------------------------------------
    ("GET", f"{ADMIN}/status"): _op(
        "The server's version, name and counts, the store's size and what retention keeps",
        query={"store": said("'store' must be 'now'", {"enum": ["now"]})},
        responses={
            200: fields(
                "version",
                "name",
                version=_STR,
                name=_STR,
                sessions=_INT,
                agents=_INT,
                active_jobs=_INT,
                store=ANY_OBJECT,
                retention=fields(
                    "job_retention",
                    "result_bytes_per_job",
                    "result_bytes_total",
                    "inventory_history",
                    job_retention=_NUM,
                    result_bytes_per_job=_INT,
                    result_bytes_total=_INT,
                    inventory_history=_INT,
                ),
                cluster=ANY_OBJECT,
            )
        },
    ),
    ("GET", f"{ADMIN}/openapi.json"): _op(
        "This document (OpenAPI 3.1)", responses={200: fields("openapi", openapi=_STR)}
    ),
    ("GET", f"{ADMIN}/ca"): _op(
        "The CA certificate agents trust (PEM)", responses={200: fields("ca", ca=_STR)}
    ),
    ("GET", f"{ADMIN}/settings"): _op("The runtime settings"),
    ("PUT", f"{ADMIN}/settings"): _op(
        "Change runtime settings",
        obj(
            {
                "persistent_connections": {"type": "boolean"},
                "poll_interval": said("poll_interval must be 1..86400 seconds", number(1, 86400)),
                "long_poll": said("long_poll must be 0..300 seconds (0: off)", number(0, 300)),
                "require_approval": {"type": "boolean"},
                "job_retention": said(
                    "job_retention must be 3600..315360000 seconds (1 hour to 10 years)",
                    number(3600, 3650 * 86400.0),
                ),
            },
            unknown="unknown setting(s) {names}",
            minProperties=1,
        ),
    ),
    # -- agents ---------------------------------------------------------------------------
    ("GET", f"{ADMIN}/agents"): _op(
        "Every enrolled agent", responses={200: listing("agents", AGENT_VIEW)}
    ),
    ("GET", f"{ADMIN}/agents/{{agent}}"): _op("One agent", responses={200: AGENT_VIEW}),
    ("GET", f"{ADMIN}/agents/{{agent}}/inventory"): _op(
        "An agent's stored inventory",
        responses={200: fields("agent", "classes", agent=_STR, classes=ANY_OBJECT)},
    ),
    ("GET", f"{ADMIN}/agents/{{agent}}/inventory/history"): _op(
        "The versions kept of an agent's inventory classes (newest first, without data)",
        query={"class": said("'class' must be an inventory class name", string(64, min_length=1))},
        responses={200: listing("versions", INVENTORY_VERSION, agent=_STR)},
    ),
    ("GET", f"{ADMIN}/agents/{{agent}}/inventory/classes/{{name}}"): _op(
        "One version of one inventory class of an agent, with its data (default: the current)",
        query={"version": said("'version' must be a version number >= 1", integer(1))},
        responses={200: fields("agent", "data", agent=_STR, data=FREE_FORM)},
    ),
    ("GET", f"{ADMIN}/agents/{{agent}}/inventory/classes/{{name}}/diff"): _op(
        "What changed in an inventory class between two versions (default: the current one "
        "and the one before it)",
        query={
            "from": said("'from' must be a version number >= 1", integer(1)),
            "to": said("'to' must be a version number >= 1", integer(1)),
        },
        responses={
            200: fields(
                "agent",
                "class",
                "from",
                "to",
                "added",
                "removed",
                "changed",
                added=ANY_OBJECT,
                removed=ANY_OBJECT,
                changed=ANY_OBJECT,
            )
        },
    ),
    ("POST", f"{ADMIN}/agents/{{agent}}/revoke"): _op(
        "Revoke an agent: refused everywhere from now on",
        EMPTY_BODY,
        body_required=False,
        responses={200: fields("agent_id", "revoked", "changed", changed=_BOOL)},
    ),
    ("POST", f"{ADMIN}/agents/{{agent}}/approve"): _op(
        "Approve an agent that enrolled while require_approval was on",
        EMPTY_BODY,
        body_required=False,
        responses={200: fields("agent_id", "approved", "changed", changed=_BOOL)},
    ),
    # -- enrollment tokens --------------------------------------------------------------
    ("POST", f"{ADMIN}/tokens"): _op(
        "Create an enrollment token",
        obj(
            {
                "ttl": said(
                    "'ttl' must be a positive number of seconds",
                    nullable(number(0, MAX_SECONDS, exclusive=True)),
                ),
                "uses": said(
                    "'uses' must be a positive integer (at most 1000000000)",
                    nullable(integer(1, 1_000_000_000)),
                ),
                "description": DESCRIPTION,
                "profile": nullable(CONFIG_NAME),
            }
        ),
        responses={201: fields("token", token=_STR, ttl=_OPT_NUM, uses=_OPT_INT, profile=_OPT_STR)},
    ),
    ("GET", f"{ADMIN}/tokens"): _op(
        "Enrollment tokens (without their secrets)", responses={200: listing("tokens")}
    ),
    # -- jobs -----------------------------------------------------------------------------
    ("POST", f"{ADMIN}/jobs"): _op(
        "Create a job: an action for every agent of `targets` or of the saved `target`",
        obj(
            {
                "action": said(
                    "'action' must be an action name like 'inventory.collect'", ACTION_NAME
                ),
                "args": said("'args' must be a JSON object", FREE_OBJECT),
                "targets": TARGETS_ALL_OR_IDS,
                "target": said("'target' must be a target name", string(64)),
                "ttl": said(
                    "'ttl' must be a number of seconds in (0, 2592000]",
                    nullable(number(0, 30 * 86400.0, exclusive=True)),
                ),
                "timeout": said(
                    "'timeout' must be a positive number of seconds",
                    nullable(number(0, MAX_SECONDS, exclusive=True)),
                ),
            },
            required=("action",),
        ),
        responses={201: JOB_CREATED},
    ),
    ("GET", f"{ADMIN}/jobs"): _op(
        "Jobs, newest first, a page at a time: `next` is the `before` of the following page",
        query={
            "state": said(
                "'state' must be a target state (some target in it), active or finished",
                {"type": "string", "maxLength": 32},
            ),
            "action": said("'action' must be an action name", {"type": "string", "maxLength": 64}),
            "since": said("'since' must be a number of seconds >= 0", number(0, MAX_EPOCH)),
            "limit": said("'limit' must be 1..1000", integer(1, 1000)),
            "before": said("'before' must be a job id", {"type": "string", "maxLength": 64}),
        },
        responses={200: listing("jobs", next={"type": ["string", "null"]})},
    ),
    # -- cancel and the advertised actions (issue 15) ------------------------------------
    ("POST", f"{ADMIN}/jobs/{{job}}/cancel"): _op(
        "Cancel a job's unfinished targets (all, or those of `agents`): those not started end "
        "`canceled` at once, running ones are told to stop",
        obj(
            {
                "agents": said(
                    "'agents' must be a non-empty list of agent ids",
                    array(AGENT_ID, min_items=1),
                )
            }
        ),
        body_required=False,
        path={"job": JOB_ID},
        responses={
            200: fields(
                "job",
                "canceled",
                "stopping",
                job=_STR,
                canceled=array(_STR),
                stopping=array(_STR),
            )
        },
    ),
    ("GET", f"{ADMIN}/actions"): _op(
        "The actions enrolled agents advertise: how many agents have each, its argument schema",
        responses={200: listing("actions")},
    ),
    ("GET", f"{ADMIN}/jobs/{{job}}"): _op(
        "A job: its counts and, unless ?results=false, every target's state and result; "
        "?format=csv: its results as CSV (text/csv, as /jobs/{job}/results.csv)",
        query={
            "results": {"type": "boolean"},
            "format": said("'format' must be json or csv", {"enum": ["json", "csv"]}),
        },
        responses={200: JOB_STATUS},
    ),
    ("GET", f"{ADMIN}/jobs/{{job}}/results.csv"): _op(
        "A job's results as CSV (text/csv): agent, name, state, delivered_at, started_at, "
        "finished_at, exit_code, error",
        responses={200: CSV_TEXT},
    ),
    ("GET", f"{ADMIN}/jobs/{{job}}/output"): _op(
        "A job's output after chunk `after`; `wait` seconds for the next one",
        query={
            "after": said("'after' must be an integer", integer(0, 2**63 - 1)),
            "wait": said("'wait' must be 0..60 seconds", number(0, 60)),
        },
        responses={200: listing("output")},
    ),
    # -- selections, targets and groups ----------------------------------------------------
    ("POST", f"{ADMIN}/selection"): _op(
        "The members of a selection, without saving it",
        obj(SELECTION_PROPERTIES),
        responses={200: MEMBERS},
    ),
    ("GET", f"{ADMIN}/targets"): _op(
        "Saved targets", responses={200: listing("targets", TARGET_VIEW)}
    ),
    ("POST", f"{ADMIN}/targets"): _op(
        "Save a target: a filter or a selection of agents",
        obj(
            {
                "name": said(f"'name' of a target must be {NAME_RULE}", TARGET_NAME),
                "description": DESCRIPTION,
                **SELECTION_PROPERTIES,
            },
            required=("name",),
        ),
        responses={201: TARGET_VIEW},
    ),
    ("GET", f"{ADMIN}/targets/{{name}}"): _op(
        "A saved target with its member count",
        responses={200: {**TARGET_VIEW, "required": ["name", "kind", "members"]}},
    ),
    ("DELETE", f"{ADMIN}/targets/{{name}}"): _op("Delete a target", responses={204: NONE}),
    ("GET", f"{ADMIN}/targets/{{name}}/members"): _op(
        "A target's members now", responses={200: MEMBERS}
    ),
    ("GET", f"{ADMIN}/groups"): _op("Groups", responses={200: listing("groups", GROUP_VIEW)}),
    ("POST", f"{ADMIN}/groups"): _op(
        "Create a group of agents",
        obj(
            {
                "name": said(f"'name' of a group must be {NAME_RULE}", TARGET_NAME),
                "description": DESCRIPTION,
                "agents": said("'agents' must be a list of agent ids", array(AGENT_ID)),
            },
            required=("name",),
        ),
        responses={201: GROUP_VIEW},
    ),
    ("GET", f"{ADMIN}/groups/{{name}}"): _op(
        "A group with its members", responses={200: GROUP_VIEW}
    ),
    ("DELETE", f"{ADMIN}/groups/{{name}}"): _op("Delete a group", responses={204: NONE}),
    ("POST", f"{ADMIN}/groups/{{name}}/members"): _op(
        "Add agents to a group and remove others",
        obj(
            {
                "add": said("'add' must be a list of agent ids", array(AGENT_ID)),
                "remove": said("'remove' must be a list of agent ids", array(AGENT_ID)),
            }
        ),
        responses={200: GROUP_VIEW},
    ),
    # -- inventory --------------------------------------------------------------------------
    ("GET", f"{ADMIN}/inventory/stale"): _op(
        "Inventory classes older than `older_than` seconds, per agent",
        query={
            "older_than": said("'older_than' must be a number of seconds >= 0", SECONDS_QUERY),
            "target": string(64),
            "class": array(string(64, min_length=1), 64),
        },
        responses={200: listing("stale", older_than=_NUM)},
    ),
    ("POST", f"{ADMIN}/inventory/refresh"): _op(
        "Collect just the stale classes from just those agents",
        obj(
            {
                "older_than": said(
                    "'older_than' must be a number of seconds >= 0", number(0, MAX_SECONDS)
                ),
                "ttl": said(
                    "'ttl' must be a number of seconds in (0, 2592000]",
                    nullable(number(0, 30 * 86400.0, exclusive=True)),
                ),
                "target": said("'target' must be a target name", nullable(string(64))),
                "classes": said(
                    "'classes' must be a non-empty list of inventory class names",
                    nullable(array(string(64, min_length=1), 64, min_items=1)),
                ),
            }
        ),
        responses={200: listing("jobs"), 201: listing("jobs")},
    ),
    # -- API tokens and the audit log -------------------------------------------------------
    ("GET", f"{ADMIN}/apitokens"): _op(
        "API tokens (without secrets)", responses={200: listing("tokens")}
    ),
    ("POST", f"{ADMIN}/apitokens"): _op(
        "Create a named API token with a role",
        obj(
            {
                "name": said(f"'name' of a API token must be {NAME_RULE}", TARGET_NAME),
                "role": said(f"'role' must be one of {', '.join(ROLES)}", {"enum": list(ROLES)}),
                "target": said("'target' must be a target name", nullable(string(64))),
                "ttl": said(
                    "'ttl' must be a positive number of seconds",
                    nullable(number(0, MAX_SECONDS, exclusive=True)),
                ),
            },
            required=("name", "role"),
        ),
        responses={201: fields("name", "role", "token", name=_STR, role=_STR, token=_STR)},
    ),
    ("DELETE", f"{ADMIN}/apitokens/{{name}}"): _op(
        "Revoke the API token(s) of that name", responses={204: NONE}
    ),
    ("GET", f"{ADMIN}/audit"): _op(
        "The audit log: the newest `limit` entries since `since`, oldest first",
        query={
            "since": said("'since' must be a number of seconds >= 0", number(0, MAX_EPOCH)),
            "limit": said("'limit' must be 1..100000", integer(1, 100_000)),
            "who": said("'who' must be a principal's name", {"type": "string", "maxLength": 64}),
            "action": said(
                "'action' must be an audit action (or a prefix ending in '.')",
                {"type": "string", "maxLength": 64},
            ),
        },
        responses={200: listing("entries")},
    ),
    # -- policies -----------------------------------------------------------------------------
    ("GET", f"{ADMIN}/policies"): _op(
        "Policies and the policy types this server knows",
        responses={200: listing("policies", POLICY_VIEW, types={"type": "array"})},
    ),
    ("POST", f"{ADMIN}/policies"): _op(
        "Create a policy",
        obj(
            {
                "name": CONFIG_NAME,
                "type": CONFIG_NAME,
                "document": FREE_OBJECT,
                "targets": POLICY_TARGETS,
            },
            required=("name", "type"),
            unknown="unknown field(s) {names} for a policy",
        ),
        responses={201: POLICY_VIEW},
    ),
    ("GET", f"{ADMIN}/policies/{{name}}"): _op(
        "A policy, with what each of its agents reports running", responses={200: POLICY_VIEW}
    ),
    ("PUT", f"{ADMIN}/policies/{{name}}"): _op(
        "Change a policy (a new version)",
        obj(
            {"type": CONFIG_NAME, "document": FREE_OBJECT, "targets": POLICY_TARGETS},
            unknown="cannot update {names} of a policy",
        ),
        responses={200: POLICY_VIEW},
    ),
    ("DELETE", f"{ADMIN}/policies/{{name}}"): _op(
        "Delete a policy", responses={200: fields("deleted", deleted=_STR)}
    ),
    ("POST", f"{ADMIN}/policies/{{name}}/push"): _op(
        "Push a policy to its connected agents and wait for their reports",
        EMPTY_BODY,
        body_required=False,
        query={"wait": said("'wait' must be 0..120 seconds", number(0, 120))},
        responses={200: fields("agents", agents=ANY_OBJECT)},
    ),
    # -- connection profiles ----------------------------------------------------------------
    ("GET", f"{ADMIN}/profiles"): _op(
        "Connection profiles", responses={200: listing("profiles", PROFILE_VIEW)}
    ),
    ("POST", f"{ADMIN}/profiles"): _op(
        "Create a connection profile",
        obj(
            {
                "name": CONFIG_NAME,
                "settings": PROFILE_SETTINGS_BODY,
                "targets": POLICY_TARGETS,
                "priority": PROFILE_PRIORITY,
            },
            required=("name",),
            unknown="unknown field(s) {names} for a profile",
        ),
        responses={201: PROFILE_VIEW},
    ),
    ("GET", f"{ADMIN}/profiles/{{name}}"): _op(
        "A connection profile", responses={200: PROFILE_VIEW}
    ),
    ("PUT", f"{ADMIN}/profiles/{{name}}"): _op(
        "Change a connection profile (a new version)",
        obj(
            {
                "settings": PROFILE_SETTINGS_BODY,
                "unset": said(
                    "'unset' must be a list of setting names",
                    array(string(64), 64),
                ),
                "targets": POLICY_TARGETS,
                "priority": PROFILE_PRIORITY,
            },
            unknown="cannot update {names} of a profile",
        ),
        responses={200: PROFILE_VIEW},
    ),
    ("DELETE", f"{ADMIN}/profiles/{{name}}"): _op(
        "Delete a connection profile", responses={200: fields("deleted", deleted=_STR)}
    ),
    ("POST", f"{ADMIN}/profiles/{{name}}/package"): _op(
        "Build an agent install package for the profile (application/gzip, a .tar.gz: wheels, "
        "CA, profile, install script and a new enrollment token scoped to the profile); 503 "
        "with the `reason` when its wheels cannot be had",
        obj(
            {
                "uses": said(
                    "'uses' must be a positive integer (at most 1000000000)",
                    integer(1, 1_000_000_000),
                ),
                "ttl": said(
                    "'ttl' must be a positive number of seconds",
                    number(0, MAX_SECONDS, exclusive=True),
                ),
                "server": said(
                    "'server' must be the https://HOST:PORT agents use",
                    string(520, SERVER_URL_PATTERN),
                ),
            },
            unknown="unknown field(s) {names} for an install package",
        ),
        body_required=False,
        responses={200: PACKAGE_ARCHIVE},
    ),
    # -- task servers and gateways ------------------------------------------------------------
    ("GET", f"{ADMIN}/events"): _op(
        "The console's live events (text/event-stream): a `hello` event, then `batch` events "
        "(at most 4 a second: `seq`, `resync`, `events`), a `close` event when the server ends "
        "the stream after `wait` seconds or when the client reads too slowly",
        query={
            "topics": said(
                "'topics' must be a comma-separated list of agents, jobs, policies, job:JOB_ID",
                {"type": "string", "maxLength": 1200},
            ),
            "wait": said("'wait' must be 0..86400 seconds", number(0, 86400)),
        },
        responses={200: SSE_EVENT},
    ),
    ("GET", f"{ADMIN}/taskservers"): _op(
        "Registered task servers with their state and client counts",
        responses={200: listing("taskservers", policy=_STR)},
    ),
    ("POST", f"{ADMIN}/taskservers"): _op(
        "Register a task server; the answer holds its one-time enrollment token",
        obj(
            {
                "name": said("'name' must be a node name like 'ts1' (a-z, 0-9, _ . -)", NODE_NAME),
                "max_clients": said(
                    "'max_clients' must be a positive integer", nullable(integer(1, 10_000_000))
                ),
                "ttl": said(
                    "'ttl' must be a number of seconds up to 30 days",
                    number(0, 30 * 86400.0, exclusive=True),
                ),
            },
            required=("name",),
        ),
        responses={201: NODE_REGISTERED},
    ),
    ("GET", f"{ADMIN}/gateways"): _op(
        "Registered gateways with their live links",
        responses={200: listing("gateways", server=_STR)},
    ),
    ("POST", f"{ADMIN}/gateways"): _op(
        "Register a gateway; the answer holds its one-time enrollment token",
        obj(
            {
                "name": said("'name' must be a node name like 'gw1' (a-z, 0-9, _ . -)", NODE_NAME),
                "max_clients": said(
                    "'max_clients' is for task servers; a gateway sets its own", {"type": "null"}
                ),
                "ttl": said(
                    "'ttl' must be a number of seconds up to 30 days",
                    number(0, 30 * 86400.0, exclusive=True),
                ),
            },
            required=("name",),
        ),
        responses={201: NODE_REGISTERED},
    ),
    # == the agent API ========================================================================
    ("POST", f"{AGENT}/enroll"): _op(
        "Enroll with a token and a certificate request; the answer holds the certificate",
        said(
            ENROLL_NEEDS,
            obj(
                {
                    "token": said(ENROLL_NEEDS, string(512)),
                    "csr": said(ENROLL_NEEDS, string(16384)),
                    "hostname": said(
                        "'hostname' must be a string of at most 255 printable characters",
                        string(255, pattern=PRINTABLE),
                    ),
                },
                required=("token", "csr"),
            ),
        ),
        responses={
            201: fields("agent_id", "certificate", "ca", agent_id=_STR, certificate=_STR, ca=_STR)
        },
    ),
    ("POST", f"{AGENT}/renew"): _op(
        "Renew this agent's certificate: a CSR for a new key, answered with a certificate "
        "for the same identity (the current certificate authenticates the call)",
        said(
            "renew needs 'csr' (PEM) string",
            obj({"csr": said("renew needs 'csr' (PEM) string", string(16384))}, required=("csr",)),
        ),
        responses={200: fields("certificate", "ca", certificate=_STR, ca=_STR)},
    ),
    ("POST", f"{AGENT}/jobs/{{job}}/accept"): _op(
        "Accept a job pushed to this agent",
        EMPTY_BODY,
        body_required=False,
        responses={200: fields("decision", decision=_STR)},
    ),
    ("POST", f"{AGENT}/jobs/{{job}}/output"): _op(
        "A chunk of a job's output",
        said(
            "output needs int 'seq', 'stream' (stdout/stderr/log), 'text'",
            obj(
                {
                    "seq": integer(0, MAX_INT32),
                    "stream": {"enum": ["stdout", "stderr", "log"]},
                    "text": string(MAX_TEXT, pattern=None),
                },
                required=("seq", "stream", "text"),
            ),
        ),
        responses={204: NONE},
    ),
    ("POST", f"{AGENT}/jobs/{{job}}/result"): _op(
        "A job's result on this agent",
        obj(
            {
                "state": said(
                    "result 'state' must be succeeded, failed, expired or canceled",
                    {"enum": ["succeeded", "failed", "expired", "canceled"]},
                ),
                "result": FREE_FORM,
                "error": said("'error' must be a string", nullable(string(MAX_TEXT, pattern=None))),
                "started": nullable(number(0, MAX_EPOCH)),
                "finished": nullable(number(0, MAX_EPOCH)),
                "received": nullable(number(0, MAX_EPOCH)),
            },
            required=("state",),
        ),
        responses={200: fields("stored", stored=_BOOL)},
    ),
    ("GET", f"{AGENT}/work"): _op(
        "Jobs and notices for an agent in HTTP mode; `wait`: a long-poll",
        query={"wait": said("'wait' must be a number of seconds", number(0, 86400))},
        responses={
            200: fields(
                "requests",
                "poll_interval",
                requests={"type": "array"},
                poll_interval=_NUM,
                long_poll=_NUM,
                persistent_connections=_BOOL,
                server_time=_NUM,
            )
        },
    ),
    ("GET", f"{AGENT}/settings"): _op(
        "What an agent needs to know to reach this server well",
        responses={
            200: fields(
                "poll_interval",
                persistent_connections=_BOOL,
                poll_interval=_NUM,
                long_poll=_NUM,
                keepalive=_NUM,
            )
        },
    ),
    ("GET", f"{AGENT}/whoami"): _op(
        "This agent's id and the transport that carried the request",
        responses={
            200: fields(
                "agent_id", "transport", agent_id=_STR, transport={"enum": ["https", "websocket"]}
            )
        },
    ),
    ("GET", f"{AGENT}/policies"): _op(
        "The policies that apply to this agent", responses={200: listing("policies")}
    ),
    ("POST", f"{AGENT}/policies/status"): _op(
        "The agent reports the policies it runs",
        obj(
            {
                "policies": (
                    {
                        "type": "object",
                        "maxProperties": 10_000,
                        "propertyNames": {"maxLength": 64},
                        "additionalProperties": obj(
                            {
                                "version": integer(0, MAX_INT32),
                                "state": {"enum": ["applied", "failed", "removed"]},
                                "error": nullable(string(MAX_TEXT, pattern=None)),
                                "at": nullable(number(0, MAX_EPOCH)),
                                "last_run": nullable(FREE_OBJECT),
                            },
                            required=("version", "state"),
                            closed=False,  # the agent's own bookkeeping may grow
                            maxProperties=64,
                        ),
                    }
                )
            },
            required=("policies",),
        ),
        responses={
            200: fields(
                "stored",
                stored=_INT,
                # after a scheduled inventory collection: the known digests of its next run
                inventory_known={"type": "object", "additionalProperties": _STR},
            )
        },
    ),
    ("GET", f"{AGENT}/profile"): _op(
        "The connection profile that applies to this agent (null: none)",
        responses={200: fields("profile", profile={"type": ["object", "null"]})},
    ),
    ("POST", f"{AGENT}/profile/status"): _op(
        "The agent reports the profile it runs (nulls: none)",
        obj(
            {
                "name": said("'name' must be a profile name or null", nullable(string(64))),
                "version": said(
                    "'version' must be an integer or null", nullable(integer(0, MAX_INT32))
                ),
            }
        ),
        responses={200: STORED},
    ),
}

# -- the fleet's state and removals (issue 15.5) ------------------------------------------------
TAG_KEY = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
AGENT_LABEL = obj(
    {
        "name": said(
            "'name' must be a display name of 1-255 characters (no NUL) or null (the hostname)",
            nullable(string(255, min_length=1)),
        ),
        "tags": said(
            f"'tags' must be an object of tag keys ({NAME_RULE}) to strings (at most 255)",
            {
                "type": "object",
                "maxProperties": 64,
                "propertyNames": {"pattern": TAG_KEY, "maxLength": 64},
                "additionalProperties": string(255),
            },
        ),
        "untag": said(
            f"'untag' must be a list of tag keys ({NAME_RULE})",
            array(string(64, TAG_KEY), max_items=64),
        ),
    },
    unknown="unknown members {names}: an agent takes 'name', 'tags' and 'untag'",
)

OPERATIONS[("GET", f"{ADMIN}/agents")] = _op(
    "Every enrolled agent (deleted ones with ?include=deleted); ?state=pending: those "
    "awaiting approval; ?limit=N&after=ID: a page of at most N in agent id order after ID "
    "(`next`: the `after` of the following page, null after the last)",
    query={
        "include": said("'include' must be 'deleted'", {"enum": ["deleted"]}),
        "state": said(
            "'state' must be ok, pending or revoked", {"enum": ["ok", "pending", "revoked"]}
        ),
        "limit": said("'limit' must be an integer 1..100000", integer(1, MAX_ITEMS)),
        "after": said("'after' must be an agent id", AGENT_ID),
    },
    responses={200: listing("agents", AGENT_VIEW, next=_OPT_STR)},
)
OPERATIONS.update(
    {
        ("PATCH", f"{ADMIN}/agents/{{agent}}"): _op(
            "Set an agent's display name and tags", AGENT_LABEL, responses={200: AGENT_VIEW}
        ),
        ("DELETE", f"{ADMIN}/agents/{{agent}}"): _op(
            "Delete an agent: revoked and hidden from listings; its history is kept",
            responses={200: fields("agent_id", "deleted", "changed", changed=_BOOL)},
        ),
        ("POST", f"{ADMIN}/tokens/{{token}}/revoke"): _op(
            "Withdraw an enrollment token: refused at once",
            EMPTY_BODY,
            body_required=False,
            responses={200: fields("token", "revoked", "changed", changed=_BOOL)},
        ),
        ("DELETE", f"{ADMIN}/taskservers/{{name}}"): _op(
            "Remove a task server: its identity refused, its links closed, its agents moved",
            responses={200: fields("name", "removed", "changed", changed=_BOOL)},
        ),
        ("DELETE", f"{ADMIN}/gateways/{{name}}"): _op(
            "Remove a gateway: its identity refused, its links closed",
            responses={200: fields("name", "removed", "changed", changed=_BOOL)},
        ),
    }
)
OPERATIONS[("GET", f"{ADMIN}/whoami")] = _op(
    "The caller's principal: token name, role, permissions, target scope",
    responses={
        200: fields(
            "name",
            "role",
            "permissions",
            "target",
            name=_STR,
            role=_STR,
            permissions={"type": "array", "items": _STR},
            target=_OPT_STR,
        )
    },
)
OPERATIONS[("GET", f"{ADMIN}/cluster")] = _op(
    "The server nodes of this cluster: each node's address, sessions, state (up or down) and "
    "last heartbeat, and the bus as this node sees it (a single server: one node, no bus)",
    responses={200: fields("node", "bus", "nodes", node=_STR, bus=_STR)},
)
