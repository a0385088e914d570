"""Size and shape before storing (issue 16.2), against a real in-process server: a job too
large for the agents' sessions is refused 413 and not stored; a header line or a body beyond
its limit is answered 431/413 at once and the connection closed; enrollment refuses a
hostname that is too long or not printable, and a CSR the CA does not accept."""

from __future__ import annotations

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet import threads

from tcm import httplimits as web
from tcm.tls import pki
from tests.harness import tls_exchange
from tests.inproc import start_server

MAX_MESSAGE_SIZE = 4096
PATIENCE = 5.0  # seconds a raw client waits for the answer and the close (twisted.web: 60)


@pytest_twisted.async_yield_fixture
async def server(tmp_path):
    srv = await start_server(str(tmp_path / "server"), max_message_size=MAX_MESSAGE_SIZE)
    try:
        yield srv
    finally:
        await srv.stop()


def exchange(server, *parts: bytes):
    return threads.deferToThread(tls_exchange, server.port, server.ca_pem, list(parts), PATIENCE)


@pytest_twisted.ensureDeferred
async def test_a_long_header_line_is_answered_431_and_closed_at_once(server):
    long_header = b"GET /api/v1/jobs HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
    received, closed = await exchange(server, long_header)
    assert received.startswith(b"HTTP/1.1 431 "), received[:200]
    assert closed
    long_path = b"GET /api/v1/" + b"p" * 20_000 + b" HTTP/1.1\r\nhost: x\r\n\r\n"
    received, closed = await exchange(server, long_path)
    assert received.startswith(b"HTTP/1.1 431 "), received[:200]
    assert b"over 16384 bytes" in received
    assert closed
    await server.check_serving()


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_answered_413_before_it_is_read(server, monkeypatch):
    declared = (
        b"POST /api/v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % (web.MAX_BODY + 1)
    )
    received, closed = await exchange(server, declared)  # no body sent: answered at once
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert closed
    # a chunked body is counted as it comes
    monkeypatch.setattr(web.LimitedRequest, "max_body", 1000)
    chunked = (
        b"POST /api/v1/jobs HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"x" * 0x200
        + b"\r\n"
    )
    received, closed = await exchange(server, chunked, chunked[-0x207:] * 2)
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert b"over 1000 bytes" in received
    assert closed
    monkeypatch.undo()
    await server.check_serving()


@pytest_twisted.ensureDeferred
async def test_a_job_too_large_for_a_session_is_refused_413_and_not_stored(server):
    client, _welcome, identity = await server.session()
    args = {"text": "x" * MAX_MESSAGE_SIZE}
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "args": args, "targets": [identity.agent_id]}
    )
    assert reply.status == 413, reply
    assert "--max-message-size" in reply.body["error"]
    assert reply.body["limit"] == MAX_MESSAGE_SIZE
    listing = await server.admin("GET", "/api/v1/jobs")
    assert listing.body["jobs"] == []
    # a job that fits goes through
    reply = await server.admin(
        "POST", "/api/v1/jobs", {"action": "ping", "targets": [identity.agent_id]}
    )
    assert reply.status == 201, reply
    await server.check_serving()


def _csr(key, common_name: str = "tcm-agent") -> str:
    return pki.make_csr(key, common_name).decode()


def _bad_signature_csr() -> str:
    csr = x509.load_pem_x509_csr(pki.make_csr(pki.generate_key()))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte is part of the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


async def _enroll(server, csr: str, hostname: str = "web-01"):
    token = await server.create_token(uses=1)
    body = {"token": token, "csr": csr, "hostname": hostname}
    return await server.agent_https("POST", "/agent/v1/enroll", body)


@pytest.mark.parametrize(
    "hostname", ["h" * 256, "h" * 5000, "web\x0001", "web\n01", "web\x7f", "web\x9b01"]
)
@pytest_twisted.ensureDeferred
async def test_enrollment_refuses_a_hostname_too_long_or_not_printable(server, hostname):
    reply = await _enroll(server, _csr(pki.generate_key()), hostname)
    assert reply.status == 400, reply
    assert "'hostname' must be a string of at most 255 printable characters" in reply.body["error"]


@pytest_twisted.ensureDeferred
async def test_enrollment_accepts_a_printable_hostname_of_255(server):
    reply = await _enroll(server, _csr(pki.generate_key()), "h" * 250 + ".é-01")
    assert reply.status == 201, reply


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["p256", "p384", "p521", "rsa2048", "ed25519"],
)
@pytest_twisted.ensureDeferred
async def test_enrollment_accepts_the_documented_keys_and_ignores_the_subject(server, make_key):
    reply = await _enroll(server, _csr(make_key(), common_name="a-someone-else"))
    assert reply.status == 201, reply
    cert = pki.load_certificate(reply.body["certificate"].encode())
    assert pki.common_name(cert) == reply.body["agent_id"] != "a-someone-else"


@pytest.mark.parametrize(
    "csr, why",
    [
        (lambda: _bad_signature_csr(), "signature does not verify"),
        (
            lambda: _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "RSA-1024 is too short",
        ),
        (lambda: _csr(ec.generate_private_key(ec.SECP224R1())), "elliptic curve"),
    ],
    ids=["bad-signature", "rsa1024", "p224"],
)
@pytest_twisted.ensureDeferred
async def test_enrollment_refuses_a_csr_the_ca_does_not_accept(server, csr, why):
    reply = await _enroll(server, csr())
    assert reply.status == 400, reply
    assert why in reply.body["error"]


def test_a_request_without_a_body_gets_no_temporary_file(monkeypatch):
    """twisted.web opens a temporary file for a request of unknown length; one that has no
    body at all (no Content-Length, no Transfer-Encoding: a GET, a WebSocket upgrade) gets
    an empty in-memory one. A chunked body still goes where Twisted puts it."""
    from twisted.web import http
    from twisted.web.test.requesthelper import DummyChannel

    opened = []
    real = http._getContentFile
    monkeypatch.setattr(http, "_getContentFile", lambda n: opened.append(n) or real(n))

    def request(*headers: tuple[bytes, bytes]) -> web.LimitedRequest:
        req = web.LimitedRequest(DummyChannel())
        for name, value in headers:
            req.requestHeaders.addRawHeader(name, value)
        return req

    get = request((b"host", b"x"))
    get.gotLength(None)
    assert get.content.read() == b"" and opened == []
    chunked = request((b"host", b"x"), (b"transfer-encoding", b"chunked"))
    chunked.gotLength(None)
    assert opened == [None]  # Twisted's own choice (a temporary file) for an unknown size
    sized = request((b"content-length", b"5"))
    sized.gotLength(5)
    assert opened == [None, 5]
