"""docs/protocol.md matches the code: its examples decode, its schemas are the code's, and it
describes every message type, close code and error code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tcm.protocol import codes, schemas
from tcm.protocol.envelope import decode, encode

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TEXT = DOC.read_text(encoding="utf-8")

# ```json blocks, each with the line before it (where a `<!-- schema: NAME -->` marker sits)
BLOCK = re.compile(
    r"(?:<!-- schema: (?P<schema>[a-z.]+) -->\n)?```json\n(?P<body>.*?)\n```", re.DOTALL
)
BLOCKS = [
    (m.group("schema"), m.group("body"), TEXT.count("\n", 0, m.start()) + 1)
    for m in BLOCK.finditer(TEXT)
]


def envelopes() -> list[tuple[int, str]]:
    out = []
    for schema, body, line in BLOCKS:
        value = json.loads(body)
        if schema is None and isinstance(value, dict) and "type" in value and "id" in value:
            out.append((line, body))
    return out


def nested_envelopes() -> list[tuple[int, dict]]:
    """Envelopes inside agent API answers (GET /agent/v1/work)."""
    out = []
    for schema, body, line in BLOCKS:
        value = json.loads(body)
        if schema is None and isinstance(value, dict):
            for item in value.get("requests", []):
                out.append((line, item))
    return out


def test_the_doc_has_json_blocks():
    assert len(BLOCKS) > 20


@pytest.mark.parametrize(("schema", "body", "line"), BLOCKS, ids=[f"line{b[2]}" for b in BLOCKS])
def test_every_json_block_is_json(schema, body, line):
    json.loads(body)


@pytest.mark.parametrize(("line", "body"), envelopes(), ids=[f"line{e[0]}" for e in envelopes()])
def test_every_example_envelope_decodes(line, body):
    env = decode(body.encode("utf-8"))
    assert decode(encode(env)) == env


@pytest.mark.parametrize(
    ("line", "obj"), nested_envelopes(), ids=[f"line{e[0]}" for e in nested_envelopes()]
)
def test_envelopes_in_api_answers_decode(line, obj):
    assert decode(json.dumps(obj).encode()).type in ("action.request", "notify")


def test_every_type_has_an_example():
    examples = {json.loads(body)["type"] for _, body in envelopes()}
    assert examples == set(schemas.DATA)


def test_every_type_is_mentioned():
    for mtype in schemas.DATA:
        assert f"`{mtype}`" in TEXT, mtype


def test_who_sends_what_is_documented():
    table = re.search(r"\| type \| agent → server \| server → agent \|.*?\n\n", TEXT, re.DOTALL)
    assert table is not None
    agent, server = set(), set()
    for row in table.group(0).strip().splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        mtype = cells[0].strip("`")
        if cells[1] == "✓":
            agent.add(mtype)
        if cells[2] == "✓":
            server.add(mtype)
    assert agent == schemas.AGENT_SENDS
    assert server == schemas.SERVER_SENDS


def test_quoted_schemas_are_the_code_s():
    quoted = {name: json.loads(body) for name, body, _ in BLOCKS if name is not None}
    expected = {"envelope": schemas.ENVELOPE, **schemas.DATA}
    assert set(quoted) == set(expected)
    for name, schema in expected.items():
        assert quoted[name] == json.loads(json.dumps(schema)), name


CLOSE_CODES = {
    name: value
    for name, value in vars(codes).items()
    if name.startswith("CLOSE_") and isinstance(value, int)
}
ERROR_CODES = {name: value for name, value in vars(codes).items() if name.startswith("ERR_")}


def test_close_codes_found():
    assert len(CLOSE_CODES) >= 14 and "CLOSE_NORMAL" in CLOSE_CODES  # the scan works


@pytest.mark.parametrize(("name", "value"), sorted(CLOSE_CODES.items()))
def test_every_close_code_is_documented(name, value):
    row = re.search(rf"^\| {value} \| `{name}` \|.*$", TEXT, re.MULTILINE)
    assert row is not None, f"no row for {value} {name}"
    reason = codes.CLOSE_REASONS.get(value)
    if reason is not None:
        words = re.findall(r"[a-z]+", reason.lower())
        assert any(w in row.group(0).lower() for w in words if len(w) > 5), (name, reason)


@pytest.mark.parametrize(("name", "value"), sorted(ERROR_CODES.items()))
def test_every_error_code_is_documented(name, value):
    assert re.search(rf"^\| `{re.escape(value)}` \| `{name}` \|", TEXT, re.MULTILINE), name


def test_names_and_limits():
    assert f"`{codes.SUBPROTOCOL}`" in TEXT
    assert "/agent/v1/ws" in TEXT
    assert f"**{codes.PROTOCOL_VERSION}**" in TEXT
    for path in (
        "/agent/v1/enroll",
        "/agent/v1/jobs/{job}/accept",
        "/agent/v1/jobs/{job}/output",
        "/agent/v1/jobs/{job}/result",
        "/agent/v1/work",
        "/agent/v1/whoami",
    ):
        assert f"`{path}`" in TEXT or f"{path}`" in TEXT, path
