"""Checking a request against its declaration (tcm/server/apischema.py): path parameters,
query parameters and body, each compiled with fastjsonschema once, when the route is added.

A failure becomes `InvalidRequest` whose message names the field: the declaration's own
wording (`x-message`, `x-unknown`) where it has one, else `'field.path' <what is wrong>`.
Query parameters arrive as text and are read as the type their schema names before they are
checked.
"""

from __future__ import annotations

import math
import re
from typing import Any

import fastjsonschema

from tcm.server.apischema import SEGMENT, Operation, obj


class InvalidRequest(ValueError):
    """A request that breaks its operation's declaration: answered 400 with `message`
    (which names the field) and `extra` (e.g. the known fields)."""

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.message = message
        self.extra = extra


_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _steps(name: str) -> list[str | int]:
    """fastjsonschema's `data.a[0].b` as ["a", 0, "b"]."""
    rest = name[len("data") :] if name.startswith("data") else name
    return [k if k else int(i) for k, i in _PATH_PART.findall(rest)]


def _label(steps: list[str | int]) -> str:
    out = ""
    for s in steps:
        out += f"[{s}]" if isinstance(s, int) else (f".{s}" if out else s)
    return out


def _schemas_along(schema: dict[str, Any], steps: list[str | int]) -> list[dict[str, Any]]:
    """The schemas met walking `steps` down from `schema` (best effort: through
    properties, additionalProperties and items)."""
    met = [schema]
    for step in steps:
        current = met[-1]
        if isinstance(step, int):
            nxt = current.get("items")
        else:
            nxt = (current.get("properties") or {}).get(step)
            if nxt is None and isinstance(current.get("additionalProperties"), dict):
                nxt = current["additionalProperties"]
        if not isinstance(nxt, dict):
            break
        met.append(nxt)
    return met


def _explain(
    e: fastjsonschema.JsonSchemaValueException, schema: dict[str, Any], where: str
) -> InvalidRequest:
    steps = _steps(e.name or "data")
    label = _label(steps)
    if e.rule == "additionalProperties" and isinstance(e.value, dict):
        definition = e.definition or {}
        unknown = sorted(set(e.value) - set(definition.get("properties") or {}))
        names = ", ".join(unknown)
        template = definition.get("x-unknown")
        if template is not None:
            message = template.format(names=names)
        elif label:
            message = f"unknown field(s) {names} in '{label}'"
        else:
            message = f"unknown {where}(s) {names}"
        return InvalidRequest(message, known=sorted(definition.get("properties") or {}))
    detail = e.message
    if detail.startswith(e.name or "data"):
        detail = detail[len(e.name or "data") :].strip()
    # the outermost x-message on the way down: the wording that names the field as a whole;
    # "{detail}" in it is what is wrong below that field ("'keepalive' must be number")
    met = _schemas_along(schema, steps)
    for depth, sub in [*enumerate(met)][1:] + [(0, schema)]:
        message = sub.get("x-message")
        if message is not None:
            below = _label(steps[depth:]) or label
            return InvalidRequest(message.format(detail=f"'{below}' {detail}" if below else detail))
    if not label:
        return InvalidRequest(f"{where} {detail}")
    return InvalidRequest(f"'{label}' {detail}")


def _coerce(name: str, raw: list[str], schema: dict[str, Any]) -> Any:
    """A query parameter's text as the JSON value its schema types it as."""
    kind = schema.get("type")
    if kind == "array":
        return [_coerce(name, [r], schema.get("items") or {}) for r in raw]
    text = raw[-1]
    try:
        if kind == "number":
            value: Any = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        if kind == "integer":
            return int(text)
    except ValueError:
        raise InvalidRequest(schema.get("x-message", f"'{name}' must be a {kind}")) from None
    if kind == "boolean":
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise InvalidRequest(schema.get("x-message", f"'{name}' must be true or false"))
    return text


VALID_PATHS_KEPT = 1024


class CheckedOperation:
    """An Operation compiled: checks a request's path parameters, query and body."""

    def __init__(self, method: str, pattern: str, operation: Operation):
        self.method = method
        self.pattern = pattern
        self.operation = operation
        self.path_schema = obj(
            {p: operation.path.get(p, SEGMENT) for p in re.findall(r"\{(\w+)\}", pattern)}
        )
        self.query_schema = obj(operation.query)
        self._path = fastjsonschema.compile(self.path_schema)
        self._query = fastjsonschema.compile(self.query_schema)
        self._body = fastjsonschema.compile(operation.body) if operation.body else None
        # Path parameters found valid: a push to ten thousand agents brings ten thousand
        # results for one job id, checked once (issue 17). Bounded; only valid ones kept.
        self._valid_paths: set[tuple[str, ...]] = set()
        self._no_query_valid = False  # a request without a query passed the check

    def check_path(self, params: dict[str, str]) -> None:
        key = tuple(params.values())
        if key in self._valid_paths:
            return
        self._run(self._path, self.path_schema, params, "path parameter")
        if len(self._valid_paths) >= VALID_PATHS_KEPT:
            self._valid_paths.clear()
        self._valid_paths.add(key)

    def check_query(self, args: dict[bytes, list[bytes]]) -> None:
        if not args and self._no_query_valid:
            return  # the answer for no query at all does not change: checked once
        query: dict[str, Any] = {}
        for key, values in args.items():
            name = key.decode("utf-8", "replace")
            texts = [v.decode("utf-8", "replace") for v in values]
            schema = self.operation.query.get(name)
            query[name] = texts[-1] if schema is None else _coerce(name, texts, schema)
        self._run(self._query, self.query_schema, query, "query parameter")
        if not args:
            self._no_query_valid = True

    @property
    def reads_body(self) -> bool:
        return self._body is not None

    def check_body(self, body: Any, present: bool = True) -> None:
        """`body` as parsed; `present` False: the request had none (an empty body)."""
        assert self._body is not None and self.operation.body is not None
        if not present:
            if self.operation.body_required:
                raise InvalidRequest("request body must be a JSON object")
            return
        if self.operation.body.get("type") == "object" and not isinstance(body, dict):
            raise InvalidRequest("request body must be a JSON object")
        self._run(self._body, self.operation.body, body, "field")

    @staticmethod
    def _run(validate: Any, schema: dict[str, Any], value: Any, where: str) -> None:
        try:
            validate(value)
        except fastjsonschema.JsonSchemaValueException as e:
            raise _explain(e, schema, where) from None
