"""Bad input against a real in-process server: each is answered with the documented error or
close code, never a crash, and the server keeps serving everyone else.

Every test of a handled case ends with ``server.check_serving()``: a new, well-behaved
agent enrolls, gets a ``welcome`` and an answer to an agent API call over its session.
"""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs

from tcm.protocol import codes
from tcm.tls import pki
from tests.inproc import TIMEOUT, AgentIdentity, start_server, wait_for, within

HANDSHAKE_TIMEOUT = 0.5
MAX_MESSAGE_SIZE = 4096
MAX_IN_FLIGHT = 2


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    srv = await start_server(
        str(tmp_path / "server"),
        handshake_timeout=HANDSHAKE_TIMEOUT,
        max_message_size=MAX_MESSAGE_SIZE,
        max_in_flight=MAX_IN_FLIGHT,
    )
    try:
        yield srv
    finally:
        await srv.stop()


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def foreign_identity(agent_id: str) -> AgentIdentity:
    """A client certificate for ``agent_id`` from a CA the server has never seen (the leaf
    followed by that CA, so only the trust decision can refuse it)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("foreign CA"))
        .issuer_name(_name("foreign CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(agent_id))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return AgentIdentity(agent_id, pki.cert_to_pem(leaf) + pki.cert_to_pem(ca), pki.key_to_pem(key))


def assert_clean_close(client, code: int, reason_part: str) -> None:
    was_clean, got_code, reason = client.close_info
    assert (got_code, was_clean) == (code, True), client.close_info
    assert reason_part in reason


def assert_refused_upgrade(client, status: int, reason_part: str) -> None:
    """Autobahn's client reports a refused upgrade as an unclean close (1006) whose reason
    quotes the HTTP status line."""
    assert not client.opened_ok
    was_clean, code, reason = client.close_info
    assert (was_clean, code) == (False, 1006), client.close_info
    assert f"WebSocket connection upgrade failed [{status}]: " in reason
    assert reason_part in reason


# -- frames on an open session -------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[1, 2]", b'"just a string"', b"NaN", b"{}" + b" " * 10 + b"}"],
    ids=["broken", "array", "string", "nan", "trailing-garbage"],
)
@pytest_twisted.inlineCallbacks
def test_malformed_frame_gets_error_and_session_lives(server, payload):
    client, _, identity = yield server.session()
    client.send_raw(payload)
    error = yield client.wait_message({"type": "error"})
    assert error["data"]["code"] == codes.ERR_MALFORMED
    assert "in_reply_to" not in error  # nothing to name: no id could be read
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["type"] == "response"
    assert reply["data"]["status"] == 200
    assert reply["data"]["body"]["agent_id"] == identity.agent_id
    assert client.close_info is None
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_unknown_message_type_gets_error_naming_it(server):
    client, _, _ = yield server.session()
    client.send_json({"id": "msg-unknown-1", "type": "no.such.type", "data": {}})
    error = yield client.wait_reply("msg-unknown-1")
    assert error["type"] == "error"
    assert error["data"]["code"] == codes.ERR_UNKNOWN_TYPE
    assert "no.such.type" in error["data"]["message"]
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200
    yield server.check_serving()


@pytest.mark.parametrize(
    "message, mentions",
    [
        ({"id": "msg-schema-1", "type": "request", "data": {"method": "GET"}}, "path"),
        (
            {
                "id": "msg-schema-1",
                "type": "request",
                "data": {"method": "PATCH", "path": "/agent/v1/whoami"},
            },
            "method",
        ),
        ({"id": "msg-schema-1", "type": "request", "data": {"method": "GET", "path": "x"}}, "path"),
        (
            {
                "id": "msg-schema-1",
                "type": "request",
                "bogus": 1,
                "data": {"method": "GET", "path": "/agent/v1/whoami"},
            },
            "envelope",
        ),
    ],
    ids=["no-path", "bad-method", "relative-path", "extra-envelope-field"],
)
@pytest_twisted.inlineCallbacks
def test_schema_violation_gets_error_naming_the_id(server, message, mentions):
    client, _, _ = yield server.session()
    client.send_json(message)
    error = yield client.wait_reply("msg-schema-1")
    assert error["type"] == "error"
    assert error["data"]["code"] == codes.ERR_SCHEMA
    assert mentions in error["data"]["message"]
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_unknown_agent_api_route_over_session_is_404(server):
    client, _, _ = yield server.session()
    reply = yield client.request("GET", "/agent/v1/no/such/route")
    assert reply["type"] == "response"
    assert reply["data"]["status"] == 404
    assert "no such resource" in reply["data"]["body"]["error"]
    reply = yield client.request("DELETE", "/agent/v1/whoami")
    assert reply["data"]["status"] == 405
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200
    yield server.check_serving()


# -- the start and the end of a session ----------------------------------------------------


@pytest.mark.parametrize(
    "first, reason",
    [
        (
            {
                "id": "first-1",
                "type": "request",
                "data": {"method": "GET", "path": "/agent/v1/whoami"},
            },
            "first message must be hello",
        ),
        (b"{not json", "first message must be a valid hello"),
        (
            {"id": "first-1", "type": "hello", "data": {"protocol": 1}},
            "first message must be a valid hello",
        ),
    ],
    ids=["request", "malformed", "invalid-hello"],
)
@pytest_twisted.inlineCallbacks
def test_first_message_not_hello_closes_4002(server, first, reason):
    identity = yield server.enroll_identity()
    client = yield server.ws_connect(identity)
    assert client.opened_ok
    if isinstance(first, bytes):
        client.send_raw(first)
    else:
        client.send_json(first)
    error = yield client.wait_message({"type": "error"})
    if isinstance(first, dict):
        assert error["in_reply_to"] == "first-1"
    yield client.wait_closed()
    assert_clean_close(client, codes.CLOSE_PROTOCOL_ERROR, reason)
    assert identity.agent_id not in server.parts.presence.registry
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_no_hello_within_handshake_timeout_closes_4001(server):
    identity = yield server.enroll_identity()
    started = time.monotonic()
    client = yield server.ws_connect(identity)
    assert client.opened_ok
    yield client.wait_closed()
    elapsed = time.monotonic() - started
    assert_clean_close(client, codes.CLOSE_HELLO_TIMEOUT, "no hello within the handshake timeout")
    assert HANDSHAKE_TIMEOUT * 0.8 <= elapsed < HANDSHAKE_TIMEOUT + 2.0
    assert client.messages == []
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_message_over_the_size_limit_closes_1009(server):
    client, welcome, _ = yield server.session()
    assert welcome["data"]["max_message_size"] == MAX_MESSAGE_SIZE
    filler = "x" * (MAX_MESSAGE_SIZE + 100)
    client.send_json(
        {
            "id": "big-1",
            "type": "request",
            "data": {"method": "POST", "path": "/agent/v1/whoami", "body": filler},
        }
    )
    yield client.wait_closed()
    was_clean, code, reason = client.close_info
    assert code == codes.CLOSE_TOO_BIG, client.close_info
    assert str(MAX_MESSAGE_SIZE) in reason  # e.g. "frame exceeds payload limit of 4096 octets"
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_binary_frame_closes_4002(server):
    client, _, identity = yield server.session()
    client.send_raw(b'{"id": "bin-1", "type": "hello", "data": {}}', binary=True)
    yield client.wait_closed()
    assert_clean_close(client, codes.CLOSE_PROTOCOL_ERROR, "text frames")
    yield wait_for(
        lambda: identity.agent_id not in server.parts.presence.registry,
        what="the closed session to leave the registry",
    )
    yield server.check_serving()


# -- refused upgrades and TLS ------------------------------------------------------------


@pytest.mark.parametrize("protocols", [["chat"], []], ids=["chat", "none"])
@pytest_twisted.inlineCallbacks
def test_wrong_subprotocol_is_refused_400(server, protocols):
    identity = yield server.enroll_identity()
    client = yield server.ws_connect(identity, protocols=protocols)
    assert_refused_upgrade(client, 400, "tcm.v1")
    assert "unsupported subprotocol" in client.close_reason
    assert client.messages == []
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_no_client_certificate_is_refused_403(server):
    client = yield server.ws_connect(None)
    assert_refused_upgrade(client, 403, "client certificate required")
    reply = yield server.agent_https("GET", "/agent/v1/whoami")
    assert reply.status == 403
    assert reply.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert "client certificate required" in reply.body["error"]
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_certificate_of_an_agent_never_enrolled_is_refused_403(server):
    """From the right CA, but for an id the server does not know (a wiped database)."""
    key = pki.generate_key()
    cert = server.parts.certificates.ca.sign_csr(pki.make_csr(key), common_name="a-never-enrolled")
    stranger = AgentIdentity("a-never-enrolled", cert, pki.key_to_pem(key))
    client = yield server.ws_connect(stranger)
    assert_refused_upgrade(client, 403, "unknown agent a-never-enrolled")
    reply = yield server.agent_https("GET", "/agent/v1/whoami", identity=stranger)
    assert reply.status == 403
    assert reply.body == {"error": "unknown agent a-never-enrolled: enroll again"}
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_certificate_from_a_foreign_ca_fails_tls_and_is_logged(server):
    enrolled = yield server.enroll_identity()
    impostor = foreign_identity(enrolled.agent_id)  # the id of a real agent, a wrong CA
    failures = server.handshakes.failures
    assert failures == {}
    with capturedLogs() as events:
        try:
            reply = yield server.agent_https("GET", "/agent/v1/whoami", identity=impostor)
        except Exception as e:
            https_error = e
        else:
            pytest.fail(f"HTTPS with a foreign certificate was answered: {reply}")
        client = yield server.ws_connect(impostor)
        yield wait_for(lambda: sum(failures.values()) >= 2, what="two logged TLS failures")
    assert "unknown ca" in repr(https_error)
    assert not client.opened_ok
    was_clean, code, reason = client.close_info
    assert (was_clean, code) == (False, 1006)
    assert "unknown ca" in reason
    assert failures == {"certificate verify failed": 2}
    warnings = [e for e in events if e.get("log_namespace", "").endswith("HandshakeLogger")]
    assert len(warnings) == 2
    assert all(w["reason"] == "certificate verify failed" for w in warnings)
    assert all(w["peer"].startswith("127.0.0.1:") for w in warnings)
    # The real agent (same id, right CA) is not affected.
    client, _, _ = yield server.session(enrolled)
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["body"]["agent_id"] == enrolled.agent_id
    yield server.check_serving()


# -- enrollment --------------------------------------------------------------------------


def _csr() -> str:
    return pki.make_csr(pki.generate_key()).decode()


@pytest_twisted.inlineCallbacks
def test_enroll_with_unknown_token_is_403(server):
    token = yield server.create_token()
    token_id = token.partition(".")[0]
    for bad in ("nope", "nope.nope", f"{token_id}.wrong-secret", ""):
        reply = yield server.agent_https(
            "POST", "/agent/v1/enroll", {"token": bad, "csr": _csr(), "hostname": "h"}
        )
        assert (reply.status, reply.body) == (403, {"error": "unknown enrollment token"}), bad
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_enroll_with_used_up_token_is_403(server):
    token = yield server.create_token(uses=1)
    first = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": _csr()})
    assert first.status == 201
    second = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": _csr()})
    assert second.status == 403
    assert "used up" in second.body["error"]
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_an_agent_asking_again_with_its_key_gets_the_same_identity(server):
    # Its first answer was lost (the agent gave up waiting on a busy server): the same key
    # and token again give the same agent and certificate, and do not use the token twice.
    token = yield server.create_token(uses=1)
    csr = _csr()
    first = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": csr})
    again = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": csr})
    assert first.status == again.status == 201
    assert again.body == first.body
    # another key with that token: used up, as before
    other = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": _csr()})
    assert other.status == 403 and "used up" in other.body["error"]
    # the same key with another token is a new enrollment, not the remembered one
    token2 = yield server.create_token(uses=1)
    third = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token2, "csr": csr})
    assert third.status == 201 and third.body["agent_id"] != first.body["agent_id"]
    yield server.check_serving()


def test_remembered_enrollments_are_bounded_in_time_and_number():
    from tcm.server.agentapi import RE_ENROLL_WINDOW, RecentEnrollments

    recent = RecentEnrollments(limit=3)
    for i in range(5):
        recent.remember(f"k{i}", i, now=float(i))
    assert len(recent) == 3 and recent.get("k0") is None and recent.get("k4") == 4
    recent.remember("late", "x", now=4.0 + RE_ENROLL_WINDOW)
    assert len(recent) == 1 and recent.get("late") == "x"


@pytest_twisted.inlineCallbacks
def test_enroll_with_expired_token_is_403(server):
    token = yield server.create_token(ttl=0.3)
    yield sleep(0.5)
    reply = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": _csr()})
    assert reply.status == 403
    assert "expired" in reply.body["error"]
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_enroll_with_garbage_csr_is_400(server):
    token = yield server.create_token()  # unlimited uses: see the test below
    for csr in (
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        server.ca_pem.decode(),
    ):
        reply = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": csr})
        assert reply.status == 400, csr
        assert reply.body["error"].startswith("bad certificate request"), reply.body
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_refused_enrollment_does_not_use_up_the_token(server):
    token = yield server.create_token(uses=1)
    reply = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": "junk"})
    assert reply.status == 400
    reply = yield server.agent_https("POST", "/agent/v1/enroll", {"token": token, "csr": _csr()})
    assert reply.status == 201, reply.body  # actual: 403 "enrollment token used up"


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b'{"token": "x"}',
        b'{"csr": "x"}',
        b'{"token": 1, "csr": "x"}',
        b'{"token": "x", "csr": null}',
        b"not json",
        b"[1]",
        b"",
        b"\xff\xfe",
    ],
    ids=[
        "empty-object",
        "no-csr",
        "no-token",
        "token-number",
        "csr-null",
        "not-json",
        "array",
        "no-body",
        "not-utf8",
    ],
)
@pytest_twisted.inlineCallbacks
def test_enroll_with_bad_body_is_400(server, raw):
    reply = yield server.agent_https("POST", "/agent/v1/enroll", raw=raw)
    assert reply.status == 400
    assert reply.body["error"]
    yield server.check_serving()


# -- admin API ---------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_admin_api_needs_the_token(server):
    for token, message in (
        (None, "missing bearer token"),
        ("wrong", "invalid API token"),
        (server.admin_token + "x", "invalid API token"),
    ):
        reply = yield server.admin("GET", "/api/v1/status", token=token)
        assert reply.status == 401, token
        assert message in reply.body["error"]
    # Another scheme with the right secret is refused as well.
    reply = yield server.https(
        "GET",
        "/api/v1/status",
        headers={b"authorization": [f"Basic {server.admin_token}".encode()]},
    )
    assert reply.status == 401
    reply = yield server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": "all"}, token="wrong"
    )
    assert reply.status == 401
    yield server.check_serving()


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[]", 400, "JSON object"),
        (b"", 400, "JSON object"),
        (b'{"targets": "all"}', 400, "'action'"),
        (b'{"action": 5, "targets": "all"}', 400, "'action'"),
        (b'{"action": "Bad Action!", "targets": "all"}', 400, "'action'"),
        (b'{"action": "ping"}', 400, "'targets'"),
        (b'{"action": "ping", "targets": "everyone"}', 400, "'targets'"),
        (b'{"action": "ping", "targets": []}', 400, "'targets'"),
        (b'{"action": "ping", "targets": [1]}', 400, "'targets'"),
        (b'{"action": "ping", "targets": {"a": 1}}', 400, "'targets'"),
        (b'{"action": "ping", "targets": "all", "args": [1]}', 400, "'args'"),
        (b'{"action": "ping", "targets": "all", "ttl": "soon"}', 400, "'ttl'"),
        (b'{"action": "ping", "targets": "all", "ttl": -1}', 400, "ttl"),
        (b'{"action": "ping", "targets": "all", "timeout": 0}', 400, "timeout"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_admin_bad_job_body_is_400(server, body, status, message):
    reply = yield server.admin("POST", "/api/v1/jobs", raw=body)
    assert reply.status == status, reply.body
    assert message in reply.body["error"]
    jobs = yield server.admin("GET", "/api/v1/jobs")
    assert jobs.body["jobs"] == []  # nothing was created
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_admin_job_for_unknown_agent_is_400_naming_it(server):
    known = yield server.enroll_identity()
    reply = yield server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": [known.agent_id, "a-no-such-agent"]}
    )
    assert reply.status == 400
    assert reply.body == {
        "error": "unknown agent ids: a-no-such-agent",  # named in the message too
        "unknown": ["a-no-such-agent"],
    }
    jobs = yield server.admin("GET", "/api/v1/jobs")
    assert jobs.body["jobs"] == []
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_admin_unknown_route_method_and_job(server):
    reply = yield server.admin("GET", "/api/v1/no/such/thing")
    assert reply.status == 404
    assert "no such resource" in reply.body["error"]
    reply = yield server.admin("DELETE", "/api/v1/jobs")
    assert reply.status == 405
    assert "GET" in reply.body["error"] and "POST" in reply.body["error"]
    reply = yield server.admin("GET", "/api/v1/jobs/0123456789abcdef")
    assert reply.status == 404
    assert reply.body == {"error": "no such job: 0123456789abcdef"}
    reply = yield server.admin("GET", "/api/v1/agents/a-no-such-agent")
    assert reply.status == 404
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_admin_job_with_nan_is_400_and_harms_no_agent(server):
    identity = yield server.enroll_identity()
    body = b'{"action": "ping", "args": {"x": NaN}, "targets": ["%s"]}' % (
        identity.agent_id.encode()
    )
    reply = yield server.admin("POST", "/api/v1/jobs", raw=body)
    assert reply.status == 400, reply  # actual: 500 "internal server error"
    client, _, _ = yield server.session(identity)  # actual: dropped right after welcome
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200


# -- jobs on a session -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_action_without_handler_fails_target_at_once(server):
    """An action no enrolled agent advertises is refused before anything is stored; a target
    whose agent lacks a handler another agent has ends `unsupported` at once, never sent."""
    client, _, identity = yield server.session(capabilities=["ping"])
    other, _, _ = yield server.session(capabilities=["ping", "no.such.action"])
    reply = yield server.admin(
        "POST", "/api/v1/jobs", {"action": "nope.action", "targets": [identity.agent_id]}
    )
    assert reply.status == 400
    assert "no enrolled agent has action 'nope.action'" in reply.body["error"]
    assert "ping" in reply.body["known"]
    reply = yield server.admin(
        "POST", "/api/v1/jobs", {"action": "no.such.action", "targets": [identity.agent_id]}
    )
    assert reply.status == 201
    job_id = reply.body["job"]
    status = (yield server.admin("GET", f"/api/v1/jobs/{job_id}")).body
    [result] = status["results"]
    assert result["agent"] == identity.agent_id
    assert result["state"] == "unsupported"
    assert "agent has no handler" in result["error"]
    assert "no.such.action" in result["error"]
    assert status["counts"]["unsupported"] == status["counts"]["total"] == 1
    assert status["counts"]["failed"] == 0
    # Nothing was pushed to the agent, and its session lives on.
    assert not [m for m in client.messages if m.get("type") == "action.request"]
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200
    yield server.check_serving()


@pytest_twisted.inlineCallbacks
def test_in_flight_limit_answers_error(server):
    """Results stay in flight until the store commits them; a blocked store thread keeps
    them there, so the third request meets the limit deterministically."""
    client, welcome, identity = yield server.session()
    assert welcome["data"]["max_in_flight"] == MAX_IN_FLIGHT
    jobs = []
    for _ in range(MAX_IN_FLIGHT):
        reply = yield server.admin(
            "POST", "/api/v1/jobs", {"action": "ping", "targets": [identity.agent_id]}
        )
        assert reply.status == 201
        jobs.append(reply.body["job"])
        pushed = yield client.wait_message({"type": "action.request"})
        assert pushed["data"]["job"] == jobs[-1]
    release = threading.Event()
    blocked = server.parts.db.run(release.wait, TIMEOUT)  # the store's only thread
    try:
        ids = [f"result-{i}" for i in range(MAX_IN_FLIGHT)]
        for msg_id, job in zip(ids, jobs, strict=True):
            client.send_json(
                {
                    "id": msg_id,
                    "type": "request",
                    "data": {
                        "method": "POST",
                        "path": f"/agent/v1/jobs/{job}/result",
                        "body": {"state": "succeeded", "result": {"pong": True}},
                    },
                }
            )
        client.send_json(
            {
                "id": "one-too-many",
                "type": "request",
                "data": {"method": "GET", "path": "/agent/v1/whoami"},
            }
        )
        error = yield client.wait_reply("one-too-many")
        assert error["type"] == "error"
        assert error["data"]["code"] == codes.ERR_IN_FLIGHT
        assert str(MAX_IN_FLIGHT) in error["data"]["message"]
        assert not [m for m in client.messages if m.get("in_reply_to") in ids]
    finally:
        release.set()
    yield within(blocked)
    for msg_id in ids:
        reply = yield client.wait_reply(msg_id)
        assert (reply["data"]["status"], reply["data"]["body"]) == (200, {"stored": True})
    reply = yield client.request("GET", "/agent/v1/whoami")  # the slots are free again
    assert reply["data"]["status"] == 200
    assert client.close_info is None
    yield server.check_serving()


# -- found while writing these tests -------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_request_for_the_websocket_endpoint_over_a_session(server):
    client, _, identity = yield server.session()
    client.send_json(
        {"id": "ws-1", "type": "request", "data": {"method": "GET", "path": "/agent/v1/ws"}}
    )
    reply = yield client.wait_reply("ws-1")  # actual: the connection drops (1006)
    assert reply["type"] in ("response", "error")
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200


@pytest_twisted.inlineCallbacks
def test_request_header_outside_latin1_gets_an_answer(server):
    client, _, _ = yield server.session()
    client.send_json(
        {
            "id": "hdr-1",
            "type": "request",
            "data": {"method": "GET", "path": "/agent/v1/whoami", "headers": {"x-note": "\u20ac"}},
        }
    )
    reply = yield client.wait_reply("hdr-1")  # actual: the connection drops (1006)
    assert reply["type"] == "error" or reply["data"]["status"] == 400
    reply = yield client.request("GET", "/agent/v1/whoami")
    assert reply["data"]["status"] == 200
