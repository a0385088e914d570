"""JSON Schemas of the tcm.v1 envelope and of each message type's `data`.

These dictionaries are the normative schemas; docs/protocol.md quotes them and a test checks
that every example in that document validates against them.
"""

from __future__ import annotations

from typing import Any

_ID = {"type": "string", "minLength": 1, "maxLength": 128}
_NAME = {"type": "string", "pattern": r"^[a-z][a-z0-9_.-]{0,63}$"}
_JOB = {"type": "string", "minLength": 1, "maxLength": 64}

ENVELOPE: dict[str, Any] = {
    "type": "object",
    "required": ["id", "type", "data"],
    "properties": {
        "id": _ID,
        "type": {"type": "string", "minLength": 1, "maxLength": 64},
        "sender": {"type": "string", "maxLength": 128},
        "target": {"type": "string", "maxLength": 128},
        "targets": {"type": "array", "items": {"type": "string", "maxLength": 128}},
        "in_reply_to": _ID,
        "expires": {"type": "number"},
        "data": {"type": "object"},
        "trace": {"type": "array", "items": {"type": "string", "maxLength": 256}},
    },
    "additionalProperties": False,
}

CAPABILITY = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": _NAME,
        "streams": {"type": "boolean"},
        "task": {"type": "boolean"},
        "schema": {"type": "object"},
    },
}

PRINTABLE = r"^[^\u0000-\u001f\u007f-\u009f]*$"  # no control characters

#: A resumption token (tcm.tls.resumption): a welcome's `resume`, and the node link's `open`
#: carries one from the relay node that sealed it (tcm/protocol/link.py)
RESUME = {
    "type": "object",
    "required": ["identity", "key", "lifetime"],
    "properties": {
        "identity": {"type": "string", "maxLength": 1368},
        "key": {"type": "string", "maxLength": 64},
        "lifetime": {"type": "number", "exclusiveMinimum": 0},
    },
}

DATA: dict[str, dict[str, Any]] = {
    # agent -> server, first message of a session
    "hello": {
        "type": "object",
        "required": ["agent_version", "protocol", "capabilities"],
        "properties": {
            "agent_version": {"type": "string", "maxLength": 64},
            "protocol": {"type": "integer", "minimum": 1},
            "capabilities": {"type": "array", "items": CAPABILITY, "maxItems": 1024},
            # printable: shown in listings and the console as they are
            "hostname": {"type": "string", "maxLength": 255, "pattern": PRINTABLE},
            "platform": {"type": "string", "maxLength": 255, "pattern": PRINTABLE},
            "running": {"type": "array", "items": _JOB, "maxItems": 10000},
            "policy_types": {"type": "array", "items": _NAME, "maxItems": 1024},
            "profile": {
                "type": ["object", "null"],
                "properties": {"name": _NAME, "version": {"type": "integer"}},
            },
        },
    },
    # server -> agent, answer to hello
    "welcome": {
        "type": "object",
        "required": ["session", "keepalive", "poll_interval"],
        "properties": {
            "session": {"type": "string"},
            "agent_id": {"type": "string"},
            "keepalive": {"type": "number", "minimum": 0},
            "poll_interval": {"type": "number", "minimum": 0},
            "max_message_size": {"type": "integer", "minimum": 0},
            "max_in_flight": {"type": "integer", "minimum": 1},
            "server_version": {"type": "string"},
            "server_time": {"type": "number"},
            "policy_count": {"type": "integer", "minimum": 0},
            "profile_count": {"type": "integer", "minimum": 0},
            "resume": RESUME,
        },
    },
    # server -> agent: run an action. The same bytes go to every target of a job.
    "action.request": {
        "type": "object",
        "required": ["job", "action", "args"],
        "properties": {
            "job": _JOB,
            "action": _NAME,
            "args": {"type": "object"},
            "timeout": {"type": "number", "exclusiveMinimum": 0},
        },
    },
    # server -> agent: stop a job an operator canceled (the runner ends its handler; the
    # agent reports the target `canceled`). Agents that do not know it answer an error.
    "action.cancel": {
        "type": "object",
        "required": ["job"],
        "properties": {
            "job": _JOB,
            "reason": {"type": "string", "maxLength": 256},
        },
    },
    # agent -> server: one call of the agent API (an HTTP request carried by the session)
    "request": {
        "type": "object",
        "required": ["method", "path"],
        "properties": {
            "method": {"enum": ["GET", "POST", "PUT", "DELETE"]},
            "path": {"type": "string", "pattern": "^/", "maxLength": 2048},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {},
        },
    },
    # server -> agent: the answer to a request
    "response": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "integer", "minimum": 100, "maximum": 599},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {},
        },
    },
    # either way: a message could not be taken
    "error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
        },
    },
    # server -> agent: something the agent should fetch again (policies, profile, settings)
    "notify": {
        "type": "object",
        "required": ["topic"],
        "properties": {
            "topic": {"type": "string", "maxLength": 64},
            "version": {"type": ["integer", "string", "null"]},
            "name": {"type": "string", "maxLength": 64},
        },
    },
}

# Which side may send which type (for docs and for the receivers' checks).
AGENT_SENDS = frozenset({"hello", "request", "error"})
SERVER_SENDS = frozenset(
    {"welcome", "action.request", "action.cancel", "response", "error", "notify"}
)

# Names of policies, connection profiles and policy types (also targets, by convention).
NAME_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"

_URL = {"type": "string", "pattern": r"^(https|wss)://[^/\s]+", "maxLength": 512}

# A connection profile's settings: how an agent reaches its servers. The server checks a
# profile against this before storing it; the agent checks what it receives again.
PROFILE_SETTINGS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "servers": {"type": "array", "items": _URL, "minItems": 1, "maxItems": 16},
        "gateways": {"type": "array", "items": _URL, "maxItems": 64},
        "task_servers": {"type": "array", "items": _URL, "maxItems": 64},
        "proxy": {
            "type": ["string", "null"],
            "pattern": r"^http://([^@/\s]+@)?[^:/\s]+:[0-9]{1,5}/?$",
        },
        "persistent_connections": {"type": "boolean"},
        "keepalive": {"type": "number", "minimum": 5, "maximum": 3600},
        "keepalive_timeout": {"type": "number", "minimum": 1, "maximum": 600},
        "poll_interval": {"type": "number", "minimum": 1, "maximum": 86400},
        "long_poll": {"type": "boolean"},
        "backoff_initial": {"type": "number", "minimum": 0.05, "maximum": 3600},
        "backoff_max": {"type": "number", "minimum": 0.1, "maximum": 86400},
        "fallback_delay": {"type": "number", "minimum": 0, "maximum": 3600},
    },
}
PROFILE_KEYS = tuple(PROFILE_SETTINGS["properties"])
