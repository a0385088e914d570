"""Envelope value object and the codec between envelopes and WebSocket text frames.

Decoding never raises anything but `ProtocolError`, whatever the bytes (a property test holds
this to account). A `ProtocolError` carries the offending message id when one could be read, so
the receiver can answer with an `error` envelope that names it and keep the session.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from typing import Any

import attrs
import fastjsonschema

from tcm.protocol import codes, schemas

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


class ProtocolError(Exception):
    """A message that cannot be taken: bad JSON, schema violation, unknown type, too large."""

    def __init__(self, code: str, message: str, msg_id: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.msg_id = msg_id


@attrs.frozen(slots=True)
class Envelope:
    """One tcm.v1 message."""

    type: str
    data: dict[str, Any]
    id: str = attrs.field(factory=lambda: new_id())
    sender: str | None = None
    target: str | None = None
    targets: list[str] | None = None
    in_reply_to: str | None = None
    expires: float | None = None
    trace: list[str] | None = None
    # whether its JSON text had \ud... escapes, the only way to a lone surrogate (not valid
    # text: no store holds it); not on the wire. True unless decoded: then checked once.
    escapes: bool = attrs.field(default=True, eq=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        for name in ("sender", "target", "targets", "in_reply_to", "expires", "trace"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["data"] = self.data
        return out

    def reply(self, type: str, data: dict[str, Any], **kw: Any) -> Envelope:
        """An envelope answering this one."""
        return Envelope(type=type, data=data, in_reply_to=self.id, **kw)

    def error_reply(self, code: str, message: str) -> Envelope:
        """The `error` envelope that answers this one."""
        return Envelope(type="error", data={"code": code, "message": message}, in_reply_to=self.id)

    def is_expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


def new_id() -> str:
    """A unique message id: 128 random bits, hex."""
    return os.urandom(16).hex()


def _compile(schema: dict[str, Any]):
    return fastjsonschema.compile(schema)


_validate_envelope = _compile(schemas.ENVELOPE)
# Each type's validator is compiled when a message of that type first comes: the generated
# code of all of them is a megabyte and a half, and an agent sees a few types only (issue 17).
_validate_data: dict[str, Callable[[Any], Any]] = {}


def _data_validator(mtype: str) -> Callable[[Any], Any] | None:
    validator = _validate_data.get(mtype)
    if validator is None and mtype in schemas.DATA:
        validator = _validate_data[mtype] = _compile(schemas.DATA[mtype])
    return validator


# One encoder for every frame (json.dumps with options builds a JSONEncoder per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(envelope: Envelope) -> bytes:
    """Serialise an envelope to the UTF-8 JSON text of one WebSocket text frame."""
    return _ENCODER.encode(envelope.to_dict()).encode()


def validate(envelope: Envelope) -> None:
    """Check an envelope we are about to send; raises ProtocolError like decode would."""
    _check(envelope.to_dict())


def _check(obj: dict[str, Any]) -> str:
    raw_id = obj.get("id")
    msg_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= 128 else None
    try:
        _validate_envelope(obj)
    except fastjsonschema.JsonSchemaValueException as e:
        raise ProtocolError(codes.ERR_SCHEMA, f"envelope: {e.message}", msg_id) from None
    mtype = obj["type"]
    validator = _validate_data.get(mtype) or _data_validator(mtype)
    if validator is None:
        raise ProtocolError(codes.ERR_UNKNOWN_TYPE, f"unknown message type {mtype!r}", msg_id)
    try:
        validator(obj["data"])
    except fastjsonschema.JsonSchemaValueException as e:
        raise ProtocolError(codes.ERR_SCHEMA, f"{mtype}: {e.message}", msg_id) from None
    return mtype


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str, _isinf: Callable[[float], bool] = math.isinf) -> float:
    # Called by json.loads for every number with a fraction or exponent of every frame (a
    # job result has half a dozen timestamps), so kept to one check: building float("inf")
    # and float("-inf") here on each call made json.loads of a result frame 60 % slower.
    value = float(text)
    if _isinf(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# One decoder for every frame (json.loads with hooks builds a JSONDecoder per call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def decode(payload: bytes | str, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Envelope:
    """Parse and validate one frame's payload into an Envelope.

    Raises ProtocolError for anything else than a valid tcm.v1 message.
    """
    if max_size and len(payload) > max_size:
        raise ProtocolError(
            codes.ERR_TOO_LARGE, f"message of {len(payload)} bytes over the limit of {max_size}"
        )
    try:
        if isinstance(payload, bytes):
            payload = payload.decode("utf-8")  # strictly: JSON text frames are UTF-8
        obj = _DECODER.decode(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(codes.ERR_MALFORMED, f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(codes.ERR_MALFORMED, "a message must be a JSON object")
    try:
        _check(obj)
    except RecursionError:
        raise ProtocolError(codes.ERR_MALFORMED, "message nested too deeply") from None
    return Envelope(
        type=obj["type"],
        data=obj["data"],
        id=obj["id"],
        sender=obj.get("sender"),
        target=obj.get("target"),
        targets=obj.get("targets"),
        in_reply_to=obj.get("in_reply_to"),
        expires=obj.get("expires"),
        trace=obj.get("trace"),
        escapes="\\ud" in payload or "\\uD" in payload,
    )


def error_for(exc: ProtocolError) -> Envelope:
    """The `error` envelope that answers a message that failed to decode."""
    env = Envelope(type="error", data={"code": exc.code, "message": exc.message})
    if exc.msg_id is not None:
        env = attrs.evolve(env, in_reply_to=exc.msg_id)
    return env
