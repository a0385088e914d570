"""docs/protocol.md matches the code: its examples decode, its schemas are the code's, and it
describes every message type, close code and error code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tcm.protocol import codes, schemas
from tcm.protocol.envelope import decode, encode
from tcm.tls import pki

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


# -- what the document states, asserted against a running server ----------------------------
# Each limit, timeout and code the text gives as a number is read from the text here and
# checked against a real server on loopback (tests/inproc.py): a change on either side that
# the other does not follow fails.

import pytest_twisted  # noqa: E402

from tcm.server.config import ServerConfig  # noqa: E402
from tests.inproc import start_server, within  # noqa: E402


def _limits_row(limit: str, column: int = 1) -> str:
    """A row of section 9's limits table: its default (1) or what happens when exceeded (2)."""
    row = re.search(rf"^\| {re.escape(limit)} \| (.*?) \| (.*?) \|$", TEXT, re.MULTILINE)
    assert row is not None, f"no row for {limit!r} in the limits table"
    return row.group(column)


def _seconds(text: str) -> float:
    found = re.match(r"(\d+(?:\.\d+)?) s\b", text)
    assert found, text
    return float(found.group(1))


def _mib(text: str) -> int:
    found = re.match(r"(\d+) MiB\b", text)
    assert found, text
    return int(found.group(1)) * 1024 * 1024


def test_the_documented_hello_timeout_is_the_server_default():
    documented = _seconds(_limits_row("time to `hello`"))
    assert documented == ServerConfig(state_dir="unused").handshake_timeout
    assert f"(default {documented:g} s, `--handshake-timeout`)" in TEXT  # section 4, rule 2


@pytest_twisted.inlineCallbacks
def test_documented_limits_hold_on_a_running_server(tmp_path):
    server = yield start_server(str(tmp_path / "server"))
    try:
        client, welcome, _ = yield server.session()
        data = welcome["data"]
        # message size and requests in flight: the defaults, sent in welcome
        assert data["max_message_size"] == _mib(_limits_row("message size"))
        in_flight = int(_limits_row("requests in flight per session").split()[0])
        assert data["max_in_flight"] == in_flight
        # the hello timeout the running server applies (its effect: the test below)
        assert server.parts.config.handshake_timeout == _seconds(_limits_row("time to `hello`"))
        # without task servers both assignment fields are there, task_server null
        assert "task_server" in data and data["task_server"] is None
        assert data["task_server_status"] == "no task server registered"
        assert '"task_server_status": "no task server\nregistered"' in TEXT
        # the agent API's request body limit: over it, 413
        body_limit = _mib(_limits_row("request body of an agent API call"))
        reply = yield server.agent_https("POST", "/agent/v1/enroll", raw=b" " * (body_limit + 1))
        assert reply.status == 413, reply
        yield client.shut()
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_hello_timeout_closes_4001_as_documented(tmp_path):
    server = yield start_server(str(tmp_path / "server"), handshake_timeout=0.3)
    try:
        identity = yield server.enroll_identity()
        client = yield server.ws_connect(identity)
        yield client.wait_closed()
        assert client.close_info[1] == codes.CLOSE_HELLO_TIMEOUT == 4001
        assert "closes\n   with **4001**" in TEXT
        yield server.check_serving()
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_invalid_utf8_closes_1007_as_documented(tmp_path):
    server = yield start_server(str(tmp_path / "server"))
    try:
        client, _, _ = yield server.session()
        client.send_raw(b'{"id": "\xff\xfe"}')  # a text frame, not UTF-8
        yield within(client.wait_closed())
        assert client.close_info[1] == 1007, client.close_info
        assert re.search(
            r"^\| 1007 \| \(RFC 6455\) \| a text frame that is not valid UTF-8", TEXT, re.M
        )
        assert (
            "not UTF-8" not in re.search(r"^\| `malformed` .*$", TEXT, re.M).group(0).split("(")[0]
        )
        yield server.check_serving()
    finally:
        yield server.stop()


def test_internal_is_documented_as_sent():
    # a running server sends it only on a fault of its own, which no input brings about; the
    # session's behaviour: tests/test_sessions.py::test_a_failed_request_is_answered_with_...
    row = re.search(r"^\| `internal` \| `ERR_INTERNAL` \| (.*) \|$", TEXT, re.M)
    assert row is not None and "not sent" not in row.group(1) and "reserved" not in row.group(1)


OPERATING = (DOC.parent / "operating.md").read_text(encoding="utf-8")
AGENT = (DOC.parent / "agent.md").read_text(encoding="utf-8")


def test_operating_md_states_what_exists():
    # revocation, approval and the exit status of a refused enrollment (tests/test_startup.py
    # runs a real agent with a bad token: status 1)
    assert "revocation commands\n  are planned" not in OPERATING
    assert "Approval of new agents is not built" not in OPERATING
    assert "enrollment is refused exits with status 1" in OPERATING
    assert "status 0" not in OPERATING


def _refusals() -> dict[int, list[str]]:
    """Section 9's upgrade refusals: status -> the reasons it quotes."""
    table = re.search(r"^\| status \| when \|\n\|---\|---\|\n((?:\|.*\|\n)+)", TEXT, re.M)
    assert table is not None, "no upgrade refusal table"
    out: dict[int, list[str]] = {}
    for row in table.group(1).splitlines():
        status, when = (c.strip() for c in row.strip("|").split("|", 1))
        out[int(status)] = re.findall(r'\("([^"]+)"', when)
    return out


def _matches(quoted: str, reason: str, agent_id: str = "") -> bool:
    """Whether a refusal reason is the one the document quotes (ID: the agent's id; [...]:
    anything)."""
    pattern = ".*".join(re.escape(p.replace("ID", agent_id)) for p in quoted.split("[...]"))
    return re.search(pattern, reason) is not None


@pytest_twisted.inlineCallbacks
def test_upgrade_refusals_are_the_documented_ones(tmp_path):
    refusals = _refusals()
    assert sorted(refusals) == [400, 403, 503]
    server = yield start_server(str(tmp_path / "server"))
    try:

        def refused(client, status: int) -> str:
            assert not client.opened_ok
            reason = client.close_info[2]
            assert f"upgrade failed [{status}]" in reason, reason
            return reason

        identity = yield server.enroll_identity()
        client = yield server.ws_connect(identity, protocols=["chat"])
        assert _matches(refusals[400][0], refused(client, 400))

        no_certificate, unknown, revoked = refusals[403]
        client = yield server.ws_connect(None)
        assert _matches(no_certificate, refused(client, 403))
        key = pki.generate_key()
        ca = server.parts.certificates.ca
        stranger = (ca.sign_csr(pki.make_csr(key), common_name="a-never"), pki.key_to_pem(key))
        client = yield server.ws_connect(stranger)
        assert _matches(unknown, refused(client, 403), "a-never")
        other = yield server.enroll_identity()
        reply = yield server.admin("POST", f"/api/v1/agents/{other.agent_id}/revoke")
        assert reply.status == 200, reply
        client = yield server.ws_connect(other)
        assert _matches(revoked, refused(client, 403), other.agent_id)

        reply = yield server.admin("PUT", "/api/v1/settings", {"persistent_connections": False})
        assert reply.status == 200, reply
        client = yield server.ws_connect(identity)
        assert _matches(refusals[503][0], refused(client, 503))
        reply = yield server.admin("PUT", "/api/v1/settings", {"persistent_connections": True})
        assert reply.status == 200, reply
        yield server.check_serving()
    finally:
        yield server.stop()


def _section(title: str) -> str:
    found = re.search(rf"^## {re.escape(title)}\n(.*?)^## ", TEXT, re.M | re.S)
    assert found is not None, title
    return found.group(1)


def test_keepalive_defaults_are_the_server_s():
    keepalive = _section("7. Keepalive")
    config = ServerConfig(state_dir="unused")
    stated = re.search(r"`welcome`\s+\(default (\d+) s", keepalive)
    timeout = re.search(r"keepalive timeout \(default (\d+) s\)", keepalive)
    silent = re.search(
        r"`2 × keepalive \+ keepalive_timeout` seconds \(default (\d+) s\)", keepalive
    )
    assert stated and timeout and silent
    assert float(stated.group(1)) == config.keepalive
    assert float(timeout.group(1)) == config.keepalive_timeout
    assert float(silent.group(1)) == 2 * config.keepalive + config.keepalive_timeout


@pytest_twisted.inlineCallbacks
def test_silent_sessions_close_4008_and_welcome_sends_the_keepalive(tmp_path):
    server = yield start_server(str(tmp_path / "server"), keepalive=0.3, keepalive_timeout=0.2)
    try:
        client, welcome, _ = yield server.session()  # sends nothing after hello, no pings
        assert welcome["data"]["keepalive"] == 0.3
        yield client.wait_closed()
        assert client.close_info[1] == codes.CLOSE_KEEPALIVE == 4008, client.close_info
        assert "close frame with **4008**" in _section("7. Keepalive").replace("\n", " ")
        yield server.check_serving()
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_over_the_message_size_closes_1009_as_documented(tmp_path):
    server = yield start_server(str(tmp_path / "server"), max_message_size=4096)
    try:
        client, welcome, _ = yield server.session()
        assert welcome["data"]["max_message_size"] == 4096
        client.send_json({"id": "big", "type": "request", "data": {"body": "x" * 5000}})
        yield client.wait_closed()
        assert client.close_info[1] == codes.CLOSE_TOO_BIG == 1009, client.close_info
        assert "closes the connection with **1009**" in _limits_row("message size", 2)
        yield server.check_serving()
    finally:
        yield server.stop()
