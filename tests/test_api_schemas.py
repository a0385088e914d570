"""Declared request schemas (tcm/server/apischema.py): every route of both APIs has one, every
value in one is bounded, and the router refuses what breaks one with a 400 naming the field,
before the handler runs, over HTTPS and over a session alike."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import pytest_twisted

from tcm.server import apischema
from tcm.server.apicheck import CheckedOperation, InvalidRequest
from tcm.server.apischema import OPERATIONS
from tests.inproc import inproc_server, routers  # noqa: F401  (fixture)


def test_every_route_of_both_apis_is_declared_and_checked(tmp_path):
    routes = [r for router in routers(str(tmp_path)) for r in router.routes()]
    undeclared = [f"{r.method} {r.pattern}" for r in routes if r.check is None]
    assert not undeclared, f"routes without a declaration in apischema.py: {undeclared}"
    stale = set(OPERATIONS) - {(r.method, r.pattern) for r in routes}
    assert not stale, f"declarations without a route: {stale}"


# -- every schema is a bounded JSON Schema -----------------------------------------------------


def _free(schema: dict[str, Any]) -> bool:
    """A value whose owner checks it (a job's args, a policy document, a job's result)."""
    return "owner checks it" in schema.get("description", "")


def _unbounded(schema: Any, where: str) -> list[str]:
    """Where in `schema` a number, string, array or open object has no bound."""
    if not isinstance(schema, dict) or "enum" in schema or "const" in schema:
        return []
    out: list[str] = []
    for i, alternative in enumerate(schema.get("anyOf", [])):
        out += _unbounded(alternative, f"{where}|{i}")
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if not kinds and "anyOf" not in schema and not _free(schema):
        out.append(f"{where}: any value")
    if {"number", "integer"} & set(kinds) and not (
        ("minimum" in schema or "exclusiveMinimum" in schema) and "maximum" in schema
    ):
        out.append(f"{where}: a number without both bounds")
    if "string" in kinds and "maxLength" not in schema:
        out.append(f"{where}: a string without maxLength")
    if "array" in kinds:
        if "maxItems" not in schema:
            out.append(f"{where}: an array without maxItems")
        out += _unbounded(schema.get("items"), f"{where}[]")
    if "object" in kinds:
        for name, sub in (schema.get("properties") or {}).items():
            out += _unbounded(sub, f"{where}.{name}")
        extra = schema.get("additionalProperties", True)
        if extra is not False and "maxProperties" not in schema:
            out.append(f"{where}: an open object without maxProperties")
        if isinstance(extra, dict):
            out += _unbounded(extra, f"{where}.*")
    return out


def _request_schemas():
    for (method, pattern), op in OPERATIONS.items():
        check = CheckedOperation(method, pattern, op)
        yield f"{method} {pattern} path", check.path_schema
        yield f"{method} {pattern} query", check.query_schema
        if op.body is not None:
            yield f"{method} {pattern} body", op.body


def test_every_request_schema_is_draft_2020_12_and_bounded():
    problems = []
    for where, schema in _request_schemas():
        jsonschema.Draft202012Validator.check_schema(schema)
        problems += _unbounded(schema, where)
    assert not problems, "\n".join(problems)


def test_the_bounds_check_sees_an_unbounded_value():
    assert _unbounded({"type": "object", "properties": {"n": {"type": "integer"}}}, "b") == [
        "b.n: a number without both bounds",
        "b: an open object without maxProperties",
    ]


def test_every_response_schema_is_draft_2020_12():
    for op in OPERATIONS.values():
        for schema in op.responses.values():
            if schema is not None:
                jsonschema.Draft202012Validator.check_schema(schema)


# -- the messages --------------------------------------------------------------------------------


def _refusal(method: str, pattern: str, body: Any = None, query: Any = None, **path: str):
    check = CheckedOperation(method, pattern, OPERATIONS[(method, pattern)])
    with pytest.raises(InvalidRequest) as e:
        check.check_path(path)
        check.check_query(query or {})
        check.check_body(body, present=body is not None)
    return e.value


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"uses": 10**40}, "'uses' must be a positive integer"),
        ({"uses": 0}, "'uses' must be a positive integer"),
        ({"ttl": 1e300}, "'ttl' must be a positive number"),
        ({"description": "x" * 256}, "'description' must be a string of at most 255"),
        ({"description": "a\x00b"}, "'description' must be a string"),  # PostgreSQL: no NUL
        ({"uses": 1, "colour": "red", "blue": 1}, "unknown field(s) blue, colour"),
    ],
)
def test_token_bodies_refused_naming_the_field(body, message):
    assert _refusal("POST", "/api/v1/tokens", body).message.startswith(message)


def test_unknown_fields_are_named_with_the_known_ones():
    e = _refusal("POST", "/api/v1/jobs", {"action": "ping", "targets": "all", "colour": 1})
    assert e.message == "unknown field(s) colour"
    assert e.extra == {"known": ["action", "args", "target", "targets", "timeout", "ttl"]}


def test_a_nested_field_is_named_by_its_path():
    report = {"policies": {"inv": {"version": "2", "state": "applied"}}}
    e = _refusal("POST", "/agent/v1/policies/status", report)
    assert e.message == "'policies.inv.version' must be integer"
    # the profile settings keep the words the CLI and its tests know
    e = _refusal("POST", "/api/v1/profiles", {"name": "p", "settings": {"keepalive": 1e9}})
    assert e.message == "bad profile setting: 'keepalive' must be smaller than or equal to 3600"
    e = _refusal("POST", "/api/v1/selection", {"agents": ["a", "b" * 65]})
    assert e.message == "'agents' must be a list of agent ids"


def test_query_and_path_parameters_are_checked():
    e = _refusal("GET", "/api/v1/audit", query={b"limit": [b"0"]})
    assert e.message == "'limit' must be 1..100000"
    e = _refusal("GET", "/api/v1/audit", query={b"limit": [b"many"]})
    assert e.message == "'limit' must be 1..100000"
    e = _refusal("GET", "/api/v1/audit", query={b"sort": [b"desc"]})
    assert e.message == "unknown query parameter(s) sort"
    e = _refusal("GET", "/api/v1/jobs/{job}/output", query={b"wait": [b"nan"]}, job="j")
    assert e.message == "'wait' must be 0..60 seconds"
    e = _refusal("GET", "/api/v1/agents/{agent}", agent="a" * 257)
    assert e.message.startswith("'agent' must be")


def test_a_body_that_is_not_an_object():
    assert _refusal("POST", "/api/v1/jobs", [1]).message == "request body must be a JSON object"
    # a route that reads no body takes none or {} (what the CLI sends), nothing else
    check = CheckedOperation(
        "POST",
        "/api/v1/agents/{agent}/revoke",
        OPERATIONS[("POST", "/api/v1/agents/{agent}/revoke")],
    )
    check.check_body(None, present=False)
    check.check_body({})
    for body in ({"why": "lost"}, None, []):  # None: a JSON `null`
        with pytest.raises(InvalidRequest):
            check.check_body(body)


# -- through a real server -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_huge_uses_is_a_400_not_a_500(inproc_server):  # noqa: F811
    reply = await inproc_server.admin(
        "POST", "/api/v1/tokens", raw=b'{"uses": 1' + b"0" * 40 + b"}"
    )
    assert reply.status == 400, reply
    assert "'uses'" in reply.body["error"]
    assert (await inproc_server.admin("GET", "/api/v1/tokens")).body == {"tokens": []}


@pytest_twisted.ensureDeferred
async def test_a_job_with_an_unknown_field_is_a_400_naming_it(inproc_server):  # noqa: F811
    body = {"action": "ping", "targets": "all", "priority": "high"}
    reply = await inproc_server.admin("POST", "/api/v1/jobs", body)
    assert reply.status == 400, reply
    assert reply.body["error"] == "unknown field(s) priority"
    assert "action" in reply.body["known"]
    assert (await inproc_server.admin("GET", "/api/v1/jobs")).body["jobs"] == []


@pytest_twisted.ensureDeferred
async def test_authentication_comes_before_the_schema(inproc_server):  # noqa: F811
    reply = await inproc_server.admin("POST", "/api/v1/jobs", {"colour": 1}, token=None)
    assert reply.status == 401


@pytest_twisted.ensureDeferred
async def test_the_agent_api_checks_the_same_over_both_transports(inproc_server):  # noqa: F811
    server = inproc_server
    client, _welcome, identity = await server.session()
    body = {"name": "p", "version": 1, "colour": "red"}
    over_https = await server.agent_https(
        "POST", "/agent/v1/profile/status", body, identity=identity
    )
    over_ws = await client.request("POST", "/agent/v1/profile/status", body)
    assert over_https.status == over_ws["data"]["status"] == 400
    assert over_https.body == over_ws["data"]["body"]
    assert over_https.body["error"] == "unknown field(s) colour"
    bad_seq = {"seq": 2**40, "stream": "stdout", "text": "x"}
    reply = await client.request("POST", "/agent/v1/jobs/j1/output", bad_seq)
    assert reply["data"]["status"] == 400
    assert "'seq'" in reply["data"]["body"]["error"]


def test_declarations_are_plain_data():
    # the same dictionaries serve the router and the OpenAPI document: nothing compiled in
    for op in OPERATIONS.values():
        assert isinstance(op, apischema.Operation)
        assert op.body is None or op.body["type"] == "object"


def test_a_query_is_checked_each_time_though_no_query_is_checked_once():
    op = apischema.Operation("t", query={"n": {"type": "integer", "minimum": 1}})
    check = CheckedOperation("GET", "/api/v1/t", op)
    for _ in range(2):
        check.check_query({})
        check.check_query({b"n": [b"3"]})
        with pytest.raises(InvalidRequest):
            check.check_query({b"n": [b"0"]})
