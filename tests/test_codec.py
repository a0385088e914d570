"""The tcm.v1 codec: envelopes to text frames and back, and every way a frame can be refused."""

from __future__ import annotations

import json
import math

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcm.protocol import codes, schemas
from tcm.protocol.envelope import (
    DEFAULT_MAX_MESSAGE_SIZE,
    Envelope,
    ProtocolError,
    decode,
    encode,
    error_for,
    new_id,
    validate,
)

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# One realistic message of every type, as the server and the agent really send them.
EXAMPLES: dict[str, Envelope] = {
    "hello": Envelope(
        type="hello",
        id="6f1c0a9e2d4b4f7e8a1c3b5d7e9f0a1b",
        sender="a-3f9c2e1d0b8a7f6e5d4c",
        data={
            "agent_version": "0.1.0",
            "protocol": 1,
            "capabilities": [
                {"name": "ping", "streams": False, "task": False},
                {"name": "inventory.collect", "streams": False, "task": False},
                {
                    "name": "command.run",
                    "streams": True,
                    "task": True,
                    "schema": {"type": "object", "required": ["argv"]},
                },
            ],
            "hostname": "web-01.example.org",
            "platform": "Linux-6.1.0-18-amd64-x86_64-with-glibc2.36",
            "running": ["9c1d2e3f4a5b6c7d"],
        },
    ),
    "welcome": Envelope(
        type="welcome",
        id="1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e",
        in_reply_to="6f1c0a9e2d4b4f7e8a1c3b5d7e9f0a1b",
        data={
            "session": "4e5f6a7b8c9d0e1f",
            "agent_id": "a-3f9c2e1d0b8a7f6e5d4c",
            "keepalive": 50.0,
            "poll_interval": 60.0,
            "max_message_size": 1048576,
            "max_in_flight": 64,
            "server_version": "0.1.0",
        },
    ),
    "action.request": Envelope(
        type="action.request",
        id="req-9c1d2e3f4a5b6c7d",
        expires=1767225600.5,
        data={
            "job": "9c1d2e3f4a5b6c7d",
            "action": "command.run",
            "args": {"argv": ["uname", "-a"], "env": {"LC_ALL": "C"}, "max_output": 65536},
            "timeout": 30.0,
        },
    ),
    "action.cancel": Envelope(
        type="action.cancel",
        id="cancel-9c1d2e3f4a5b6c7d",
        data={"job": "9c1d2e3f4a5b6c7d", "reason": "canceled by admin"},
    ),
    "request": Envelope(
        type="request",
        id="0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a",
        data={
            "method": "POST",
            "path": "/agent/v1/jobs/9c1d2e3f4a5b6c7d/result",
            "headers": {"accept": "application/json"},
            "body": {
                "state": "succeeded",
                "result": {"exit_code": 0, "stdout": "Linux web-01 6.1.0\n", "stderr": ""},
                "error": None,
                "started": 1767222000.25,
                "finished": 1767222000.75,
            },
        },
    ),
    "response": Envelope(
        type="response",
        id="5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d",
        in_reply_to="0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a",
        data={
            "status": 200,
            "headers": {"content-type": "application/json"},
            "body": {"stored": True},
        },
    ),
    "error": Envelope(
        type="error",
        id="aa00bb11cc22dd33ee44ff5566778899",
        in_reply_to="0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a",
        data={"code": codes.ERR_IN_FLIGHT, "message": "more than 64 requests in flight"},
    ),
    "notify": Envelope(
        type="notify",
        id="99887766554433221100ffeeddccbbaa",
        targets=["a-3f9c2e1d0b8a7f6e5d4c", "a-0011223344556677aabb"],
        trace=["gw-1", "server-a"],
        data={"topic": "policies", "version": 7},
    ),
}


def test_every_type_has_an_example():
    assert set(EXAMPLES) == set(schemas.DATA)


@pytest.mark.parametrize("mtype", sorted(schemas.DATA))
def test_round_trip(mtype):
    env = EXAMPLES[mtype]
    frame = encode(env)
    assert isinstance(frame, bytes)
    frame.decode("utf-8")  # a text frame
    assert decode(frame) == env
    assert decode(frame.decode()) == env  # str payloads too
    validate(env)


def test_encoding_is_compact_and_ordered():
    frame = encode(EXAMPLES["notify"])
    assert b" " not in frame
    assert list(json.loads(frame)) == ["id", "type", "targets", "trace", "data"]


def test_absent_optional_fields_are_not_sent():
    env = Envelope(type="notify", data={"topic": "settings"})
    assert set(json.loads(encode(env))) == {"id", "type", "data"}


def test_new_ids_are_unique_hex():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_reply_names_the_original():
    env = EXAMPLES["request"]
    answer = env.reply("response", {"status": 204})
    assert answer.in_reply_to == env.id
    assert answer.id != env.id
    assert decode(encode(answer)) == answer


def test_is_expired():
    env = EXAMPLES["action.request"]
    assert not env.is_expired(env.expires - 0.001)
    assert env.is_expired(env.expires)
    assert not EXAMPLES["notify"].is_expired(1e12)


# -- every refusal ----------------------------------------------------------------------------


def refusal(payload, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(payload, **kw)
    return info.value


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b"{'id': 'x'}", b"not json", b'{"id":"a",}', b"\x00", b"{}}"],
)
def test_malformed_json(payload):
    e = refusal(payload)
    assert e.code == codes.ERR_MALFORMED
    assert e.msg_id is None


@pytest.mark.parametrize("payload", [b"[]", b"[1,2]", b'"hello"', b"42", b"null", b"true"])
def test_not_an_object(payload):
    e = refusal(payload)
    assert e.code == codes.ERR_MALFORMED
    assert "object" in e.message


def test_unknown_type_keeps_the_id():
    e = refusal(b'{"id":"m-1","type":"action.pause","data":{}}')
    assert e.code == codes.ERR_UNKNOWN_TYPE
    assert e.msg_id == "m-1"
    assert "action.pause" in e.message


@pytest.mark.parametrize(
    "obj",
    [
        {"id": "m-2", "type": "hello", "data": {"protocol": 1, "capabilities": []}},
        {
            "id": "m-2",
            "type": "hello",
            "data": {"agent_version": "1", "protocol": 0, "capabilities": []},
        },
        {
            "id": "m-2",
            "type": "hello",
            "data": {"agent_version": "1", "protocol": 1, "capabilities": [{"name": "Bad Name"}]},
        },
        {"id": "m-2", "type": "request", "data": {"method": "PATCH", "path": "/x"}},
        {"id": "m-2", "type": "request", "data": {"method": "GET", "path": "relative"}},
        {"id": "m-2", "type": "response", "data": {"status": 99}},
        {
            "id": "m-2",
            "type": "action.request",
            "data": {"job": "j", "action": "ping", "args": {}, "timeout": 0},
        },
        {"id": "m-2", "type": "error", "data": {"code": "x"}},
        {"id": "m-2", "type": "notify", "data": {}},
        # the envelope itself
        {"id": "m-2", "type": "notify", "data": {"topic": "t"}, "extra": 1},
        {"id": "m-2", "type": "notify", "data": []},
        {"id": "m-2", "type": "notify"},
        {"id": "m-2", "type": "notify", "data": {"topic": "t"}, "expires": "soon"},
        {"id": "m-2", "type": "notify", "data": {"topic": "t"}, "expires": True},
        {"id": "m-2", "type": "notify", "data": {"topic": "t"}, "targets": "a-1"},
        {"id": "m-2", "type": "notify", "data": {"topic": "t"}, "in_reply_to": ""},
        {"id": "m-2", "type": "", "data": {}},
        {"id": "m-2", "type": 7, "data": {}},
    ],
)
def test_schema_violation_keeps_the_id(obj):
    e = refusal(json.dumps(obj).encode())
    assert e.code == codes.ERR_SCHEMA
    assert e.msg_id == "m-2"


@pytest.mark.parametrize("bad_id", [None, 7, ["m"], {"m": 1}])
def test_schema_violation_without_a_usable_id(bad_id):
    obj = {"type": "notify", "data": {"topic": "t"}}
    if bad_id is not None:
        obj["id"] = bad_id
    e = refusal(json.dumps(obj).encode())
    assert e.code == codes.ERR_SCHEMA
    assert e.msg_id is None
    assert error_for(e).in_reply_to is None


def test_too_large():
    frame = encode(EXAMPLES["request"])
    e = refusal(frame, max_size=len(frame) - 1)
    assert e.code == codes.ERR_TOO_LARGE
    assert str(len(frame)) in e.message
    assert decode(frame, max_size=len(frame)) == EXAMPLES["request"]


def test_default_limit_and_no_limit():
    big = Envelope(
        type="notify", id="big", data={"topic": "t", "pad": "x" * DEFAULT_MAX_MESSAGE_SIZE}
    )
    frame = encode(big)
    assert refusal(frame).code == codes.ERR_TOO_LARGE
    assert decode(frame, max_size=0) == big  # 0: no limit (the agent's side)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("where", ["expires", "data"])
def test_nan_and_infinity_are_rejected(literal, where):
    if where == "expires":
        text = '{"id":"m-3","type":"notify","expires":LIT,"data":{"topic":"t"}}'
    else:
        text = '{"id":"m-3","type":"response","data":{"status":200,"body":[LIT]}}'
    text = text.replace("LIT", literal)
    e = refusal(text.encode())
    assert e.code == codes.ERR_MALFORMED


@pytest.mark.parametrize(
    "text",
    [
        '{"id":"m-3","type":"notify","expires":1e400,"data":{"topic":"t"}}',
        '{"id":"m-3","type":"response","data":{"status":200,"body":{"n":-1e400}}}',
    ],
)
def test_overflowing_numbers_are_rejected(text):
    e = refusal(text.encode())
    assert e.code in (codes.ERR_MALFORMED, codes.ERR_SCHEMA)


@pytest.mark.parametrize("number", ["1.8e308", "-1.8e308", "1" + "0" * 309 + ".0"])
def test_numbers_just_past_the_largest_float_are_rejected(number):
    text = '{"id":"m-3","type":"response","data":{"status":200,"body":{"n":N}}}'
    e = refusal(text.replace("N", number).encode())
    assert e.code == codes.ERR_MALFORMED


def test_the_largest_floats_and_negative_zero_are_kept():
    values = ["1.7976931348623157e308", "-1.7976931348623157e308", "-0.0", "5e-324", "0.25"]
    text = '{"id":"m-3","type":"response","data":{"status":200,"body":[V]}}'
    env = decode(text.replace("V", ",".join(values)).encode())
    assert env.data["body"] == [float(v) for v in values]
    assert str(env.data["body"][2]) == "-0.0"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id":"m-4","type":"notify","data":{"topic":"\xff"}}',
        b'{"id":"m-4","type":"notify","data":{"topic":"\xc3\x28"}}',
        b'{"id":"m-4","type":"notify","data":{"topic":"\xe2\x82"}}',
    ],
)
def test_invalid_utf8(payload):
    e = refusal(payload)
    assert e.code == codes.ERR_MALFORMED


@pytest.mark.parametrize(
    "payload",
    [
        '{"id":"m-4","type":"notify","data":{"topic":"t"}}'.encode("utf-16"),
        '{"id":"m-4","type":"notify","data":{"topic":"t"}}'.encode("utf-32-le"),
        b'{"id":"m-4","type":"notify","data":{"topic":"\xed\xa0\x80"}}',  # encoded surrogate
    ],
    ids=["utf-16", "utf-32-le", "encoded-surrogate"],
)
def test_bytes_that_are_not_utf8_are_refused(payload):
    refusal(payload)


def test_deep_nesting_is_refused_not_crashing():
    deep = (
        b'{"id":"m-5","type":"notify","data":{"topic":"t","x":'
        + b"[" * 100000
        + b"]" * 100000
        + b"}}"
    )
    assert refusal(deep, max_size=0).code == codes.ERR_MALFORMED


def test_validate_refuses_what_decode_would():
    with pytest.raises(ProtocolError) as info:
        validate(Envelope(type="welcome", id="w", data={"session": "s"}))
    assert info.value.code == codes.ERR_SCHEMA
    assert info.value.msg_id == "w"


# -- error_for -------------------------------------------------------------------------------


def test_error_for_names_the_offending_id():
    e = refusal(b'{"id":"offender-17","type":"request","data":{"method":"GET"}}')
    err = error_for(e)
    assert err.type == "error"
    assert err.in_reply_to == "offender-17"
    assert err.data == {"code": codes.ERR_SCHEMA, "message": e.message}
    assert decode(encode(err)) == err  # the answer is itself a valid message


def test_error_for_without_id():
    err = error_for(refusal(b"\x00garbage"))
    assert err.in_reply_to is None
    assert err.data["code"] == codes.ERR_MALFORMED
    validate(err)


@pytest.mark.parametrize("bad_id", ["", "x" * 129])
def test_error_for_an_invalid_id_is_a_valid_message(bad_id):
    e = refusal(json.dumps({"id": bad_id, "type": "notify", "data": {"topic": "t"}}).encode())
    validate(error_for(e))


# -- properties --------------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_errors(payload):
    try:
        env = decode(payload)
    except ProtocolError as e:
        assert e.code in {codes.ERR_MALFORMED, codes.ERR_SCHEMA, codes.ERR_UNKNOWN_TYPE}
    else:
        assert isinstance(env, Envelope)


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Values for decode-only properties: NaN and infinities become literals json.loads may reject.
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
DATA_KEYS = sorted({k for schema in schemas.DATA.values() for k in schema["properties"]})
# Mostly well-formed envelopes with some fields missing, mistyped or extra, so that decoding
# gets past the envelope schema and into each type's data schema.
envelope_ish = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=130) | any_json,
        "type": st.sampled_from(sorted(schemas.DATA)) | st.text(max_size=12) | any_json,
        "data": st.dictionaries(
            st.sampled_from(DATA_KEYS) | st.text(max_size=6), any_json, max_size=6
        )
        | any_json,
        "sender": st.text(max_size=20) | any_json,
        "target": st.text(max_size=20),
        "targets": st.lists(st.text(max_size=20), max_size=3) | any_json,
        "in_reply_to": st.text(max_size=20) | any_json,
        "expires": st.floats() | st.integers() | any_json,
        "trace": st.lists(st.text(max_size=20), max_size=3),
        "extra": any_json,
    },
)


def check_decode(obj) -> None:
    try:
        text = json.dumps(obj)
    except (ValueError, RecursionError):
        return
    try:
        env = decode(text.encode())
    except ProtocolError as e:
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            if e.code != codes.ERR_MALFORMED:
                valid_id = 0 < len(obj["id"]) <= 128
                assert e.msg_id == (obj["id"] if valid_id else None)
                assert error_for(e).in_reply_to == e.msg_id
        else:
            assert e.msg_id is None
    else:
        assert isinstance(obj, dict)
        assert env.id == obj["id"] and env.type == obj["type"] and env.data == obj["data"]
        validate(env)


@PROPERTY
@given(any_json)
def test_arbitrary_json_raises_only_protocol_errors(obj):
    check_decode(obj)


@PROPERTY
@given(envelope_ish)
def test_envelope_ish_dicts_raise_only_protocol_errors(obj):
    check_decode(obj)


def _name():
    return st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True)


ids = st.text(min_size=1, max_size=128)
short = st.text(max_size=40)
number = st.integers(min_value=0, max_value=2**53) | st.floats(
    min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False
)
capability = st.fixed_dictionaries(
    {"name": _name()},
    optional={
        "streams": st.booleans(),
        "task": st.booleans(),
        "schema": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    },
)
# printable text: no control characters (C0, DEL, C1), as hello's hostname and platform
printable = st.text(
    st.characters(
        blacklist_categories=("Cs",),
        blacklist_characters=[chr(c) for c in (*range(32), *range(127, 160))],
    ),
    max_size=255,
)
headers = st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3)

DATA_STRATEGIES = {
    "hello": st.fixed_dictionaries(
        {
            "agent_version": st.text(max_size=64),
            "protocol": st.integers(1, 10),
            "capabilities": st.lists(capability, max_size=4),
        },
        optional={
            "hostname": printable,
            "platform": printable,
            "running": st.lists(st.text(min_size=1, max_size=64), max_size=4),
        },
    ),
    "welcome": st.fixed_dictionaries(
        {"session": short, "keepalive": number, "poll_interval": number},
        optional={
            "agent_id": short,
            "max_message_size": st.integers(0, 2**31),
            "max_in_flight": st.integers(1, 1024),
            "server_version": short,
        },
    ),
    "action.request": st.fixed_dictionaries(
        {
            "job": st.text(min_size=1, max_size=64),
            "action": _name(),
            "args": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        },
        optional={"timeout": st.floats(min_value=0.001, max_value=1e6)},
    ),
    "action.cancel": st.fixed_dictionaries(
        {"job": st.text(min_size=1, max_size=64)}, optional={"reason": st.text(max_size=256)}
    ),
    "request": st.fixed_dictionaries(
        {
            "method": st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
            "path": st.text(max_size=60).map(lambda p: "/" + p),
        },
        optional={"headers": headers, "body": json_values},
    ),
    "response": st.fixed_dictionaries(
        {"status": st.integers(100, 599)}, optional={"headers": headers, "body": json_values}
    ),
    "error": st.fixed_dictionaries({"code": short, "message": short}),
    "notify": st.fixed_dictionaries(
        {"topic": st.text(max_size=64)},
        optional={"version": st.none() | st.integers() | short},
    ),
}


def test_every_type_has_a_strategy():
    assert set(DATA_STRATEGIES) == set(schemas.DATA)


@st.composite
def envelopes(draw):
    mtype = draw(st.sampled_from(sorted(DATA_STRATEGIES)))
    optional = st.none() | st.text(max_size=128)
    return Envelope(
        type=mtype,
        data=draw(DATA_STRATEGIES[mtype]),
        id=draw(ids),
        sender=draw(optional),
        target=draw(optional),
        targets=draw(st.none() | st.lists(st.text(max_size=128), max_size=3)),
        in_reply_to=draw(st.none() | ids),
        expires=draw(st.none() | number),
        trace=draw(st.none() | st.lists(st.text(max_size=256), max_size=3)),
    )


@PROPERTY
@given(envelopes())
def test_valid_envelopes_round_trip_unchanged(env):
    validate(env)
    frame = encode(env)
    back = decode(frame, max_size=0)
    assert back == env
    assert encode(back) == frame
    for field in attrs.fields(Envelope):  # ints stay ints, floats stay finite floats
        a, b = getattr(env, field.name), getattr(back, field.name)
        assert type(a) is type(b)
        if isinstance(a, float):
            assert math.isfinite(b)


@pytest.mark.parametrize("field", ["hostname", "platform"])
@pytest.mark.parametrize("bad", ["web\x00-01", "line\nbreak", "esc\x1b[31m", "c1\x85"])
def test_hello_hostname_and_platform_refuse_control_characters(field, bad):
    data = {"agent_version": "1", "protocol": 1, "capabilities": [], field: bad}
    with pytest.raises(ProtocolError, match=f"data.{field} must match pattern"):
        decode(encode(Envelope(type="hello", id=new_id(), sender="a-1", data=data)))
