"""TLS versions and suites of every tcm TLS port (server, task server, gateway: all from
``tcm.tls.server.server_tls_options``), and testssl.sh against a real server and gateway.

- in memory: TLS 1.2 offers only ECDHE with AEAD suites (no CBC, no SHA-1 MAC), TLS 1.3 its
  own suites; a TLS 1.2 client offering only CBC suites is refused, an AEAD one served, a
  TLS 1.1 one refused;
- testssl.sh (Debian package `testssl.sh`, installed by .ci/run) against a real server and a
  real gateway on loopback: protocols, cipher categories, server defaults (the certificate)
  and the vulnerability checks, with no finding above LOW except the private CA's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from OpenSSL import SSL

from tcm.server.ca import CertificateAuthority
from tcm.tls.server import TLS12_CIPHERS, server_tls_options
from tests.harness import GatewayProc, Server

AEAD = ("GCM", "CHACHA20-POLY1305")


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("ca")))


@pytest.fixture(scope="module")
def options(ca):
    key_pem, cert_pem = ca.issue_server_certificate(["tcm.example"])
    return server_tls_options(key_pem, cert_pem, [ca.cert_pem])


def _handshake(server_ctx: SSL.Context, client_ctx: SSL.Context) -> str:
    """Run a handshake over memory; the cipher agreed (SSL.Error when refused)."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, conn in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    conn.do_handshake()
                    done[side] = True
                except SSL.WantReadError:
                    pass
        moved = False
        for source, sink in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                data = b""
            if data:
                sink.bio_write(data)
                moved = True
        if all(done.values()) and not moved:
            return str(client.get_cipher_name())
    raise AssertionError("handshake did not finish")


def _client(version: int, ciphers: str | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    if ciphers:
        ctx.set_cipher_list(ciphers.encode())
    return ctx


def test_tls12_offers_only_ecdhe_aead_suites(options):
    offered = SSL.Connection(options.getContext(), None).get_cipher_list()
    tls12 = [c for c in offered if not c.startswith("TLS_")]  # TLS 1.3 names start TLS_
    assert tls12 and set(tls12) <= set(TLS12_CIPHERS.split(":"))
    for name in tls12:
        assert name.startswith("ECDHE-") and name.endswith(AEAD + ("SHA256", "SHA384"))
        assert any(a in name for a in AEAD), name
        assert "CBC" not in name and not name.endswith("-SHA"), name
    assert any(c.startswith("TLS_") for c in offered)  # TLS 1.3 as OpenSSL has it


def test_a_cbc_only_tls12_client_is_refused_an_aead_one_served(options):
    server_ctx = options.getContext()
    with pytest.raises(SSL.Error):
        _handshake(server_ctx, _client(SSL.TLS1_2_VERSION, "ECDHE-ECDSA-AES128-SHA256"))
    with pytest.raises(SSL.Error):
        _handshake(server_ctx, _client(SSL.TLS1_2_VERSION, "ECDHE-ECDSA-AES256-SHA"))
    assert _handshake(server_ctx, _client(SSL.TLS1_2_VERSION)) in TLS12_CIPHERS.split(":")
    assert _handshake(server_ctx, _client(SSL.TLS1_3_VERSION)).startswith("TLS_")


# -- testssl.sh against real services ---------------------------------------------------------

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
# The private CA is what tcm is built on: agents and the CLI trust ca.pem, no public store,
# and revocation is tcm's own (`tcm agents revoke`, enforced per connection), not CRL/OCSP.
PRIVATE_CA = ("cert_chain_of_trust", "cert_trust", "cert_caIssuers", "cert_revocation")
SEVERITIES = ["OK", "INFO", "LOW", "MEDIUM", "HIGH", "CRITICAL"]


def _testssl(port: int, out: str) -> list[dict]:
    """Run testssl.sh's protocol, cipher, server-default and vulnerability checks; its
    findings (JSON)."""
    assert TESTSSL is not None
    result = subprocess.run(
        [
            TESTSSL,
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--connect-timeout",
            "5",
            "--openssl-timeout",
            "5",
            "--jsonfile",
            out,
            "-p",
            "-s",
            "-S",
            "-U",
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert os.path.exists(out), result.stdout[-3000:] + result.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def _above_low(findings: list[dict]) -> list[dict]:
    return [
        f
        for f in findings
        if f.get("severity") in SEVERITIES
        and SEVERITIES.index(f["severity"]) > SEVERITIES.index("LOW")
        and f.get("id") not in PRIVATE_CA
    ]


@pytest.mark.skipif(TESTSSL is None, reason="testssl.sh is not installed (.ci/run installs it)")
def test_testssl_finds_nothing_above_low_on_server_and_gateway(tmp_path):
    server = Server(str(tmp_path))
    server.start()
    gateway = GatewayProc(str(tmp_path), "gw1", {"up": server})
    try:
        gateway.start()
        for name, port in (("server", server.port), ("gateway", gateway.port)):
            findings = _testssl(port, str(tmp_path / f"{name}.json"))
            by_id = {f.get("id"): f for f in findings}
            assert by_id["TLS1_2"]["finding"].startswith("offered"), by_id["TLS1_2"]
            assert by_id["TLS1_3"]["finding"].startswith("offered"), by_id["TLS1_3"]
            for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
                assert "not offered" in by_id[old]["finding"], by_id[old]
            assert "not offered" in by_id["cipherlist_AVERAGE"]["finding"]
            assert by_id["LUCKY13"]["severity"] == "OK", by_id["LUCKY13"]
            assert _above_low(findings) == [], (name, _above_low(findings))
    finally:
        gateway.stop()
        server.stop()
