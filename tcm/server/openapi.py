"""The declarations of tcm.server.apischema as one OpenAPI 3.1 document.

Served at `GET /api/v1/openapi.json` to any valid API token. It covers both APIs: the admin
API (/api/v1, a bearer token) and the agent API (/agent/v1, the agent's client certificate:
security scheme `mutualTLS`; enrollment needs none). One document because both are served by
the same server from one set of declarations; the security scheme of each operation says
which credentials it takes.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import tcm
from tcm.server.apischema import ERROR, OPERATIONS, SEGMENT, Operation

_REASONS = {200: "OK", 201: "Created", 204: "No Content"}


def _operation_id(method: str, pattern: str) -> str:
    words = re.sub(r"[{}]", "", pattern).replace(".", "_").strip("/").split("/")
    return "_".join([method.lower(), *words])


def _security(pattern: str) -> list[dict[str, list[str]]]:
    if pattern.startswith("/api/v1/"):
        return [{"bearer": []}]
    if pattern == "/agent/v1/enroll":
        return []  # the enrollment token is in the body
    return [{"agentCertificate": []}]


def _parameters(pattern: str, op: Operation) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": op.path.get(name, SEGMENT)}
        for name in re.findall(r"\{(\w+)\}", pattern)
    ]
    for name, schema in op.query.items():
        param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
        if schema.get("type") == "array":
            param.update(style="form", explode=True)  # ?class=a&class=b
        out.append(param)
    return out


def _responses(op: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, schema in sorted(op.responses.items()):
        entry: dict[str, Any] = {"description": _REASONS.get(status, str(status))}
        if schema is not None:
            media = schema.get("contentMediaType", "application/json")  # CSV answers
            entry["content"] = {media: {"schema": schema}}
        out[str(status)] = entry
    out["default"] = {
        "description": "An error: the reason in `error`",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    return out


def operation_object(method: str, pattern: str, op: Operation) -> dict[str, Any]:
    """The OpenAPI Operation Object of one declaration."""
    out: dict[str, Any] = {
        "operationId": _operation_id(method, pattern),
        "summary": op.summary,
        "tags": ["admin" if pattern.startswith("/api/v1/") else "agent"],
        "security": _security(pattern),
        "responses": _responses(op),
    }
    parameters = _parameters(pattern, op)
    if parameters:
        out["parameters"] = parameters
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": op.body}},
        }
    return out


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every declared operation (built once)."""
    paths: dict[str, dict[str, Any]] = {}
    for (method, pattern), op in sorted(OPERATIONS.items(), key=lambda kv: kv[0][::-1]):
        paths.setdefault(pattern, {})[method.lower()] = operation_object(method, pattern, op)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tcm",
            "version": tcm.__version__,
            "description": "The admin API (/api/v1) and the agent API (/agent/v1) of a tcm "
            "server. Every request is checked against its declaration: unknown fields and "
            "values out of bounds are a 400 naming the field.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "admin.token or a named API token (tcm apitoken create)",
                },
                "agentCertificate": {
                    "type": "mutualTLS",
                    "description": "the agent's client certificate from enrollment",
                },
            },
        },
    }


def serve(request: Any) -> dict[str, Any]:
    """Route handler of GET /api/v1/openapi.json."""
    return document()
