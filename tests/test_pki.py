"""Keys, requests, certificates and the tcm CA, without sockets (tcm.tls, tcm.server.ca)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from tcm.server.ca import CertificateAuthority
from tcm.tls import pki
from tcm.tls.handshake import HandshakeLogger
from tcm.tls.pki import CertificateError
from tcm.tls.server import server_tls_options

NOW = 1_800_000_000.0  # a fixed "now" for the CA's clock


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority.load_or_create(
        str(tmp_path_factory.mktemp("ca")), clock=lambda: NOW
    )


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory):
    return CertificateAuthority.load_or_create(str(tmp_path_factory.mktemp("foreign")), "foreign")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


# -- keys, requests, certificates ------------------------------------------------------------


def test_generated_key_is_p256_and_survives_pem():
    key = pki.generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    pem = pki.key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not encrypted
    assert pki.load_key(pem).private_numbers() == key.private_numbers()


def test_csr_round_trip():
    key = pki.generate_key()
    csr = x509.load_pem_x509_csr(pki.make_csr(key, "agent-7"))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agent-7"
    assert csr.public_key() == key.public_key()


def test_certificate_helpers(ca):
    cert = pki.load_certificate(ca.cert_pem)
    assert pki.cert_to_pem(cert) == ca.cert_pem
    assert pki.common_name(cert) == "tcm CA"
    assert pki.fingerprint(cert) == cert.fingerprint(hashes.SHA256()).hex() == ca.fingerprint
    assert len(ca.fingerprint) == 64
    assert pki.not_after(cert) == pytest.approx(NOW + 3650 * 86400)


def test_common_name_missing_is_an_error(ca):
    key = pki.generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no cn")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no cn")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2030, 1, 1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(ValueError, match="no common name"):
        pki.common_name(cert)


# -- the CA ----------------------------------------------------------------------------------


def test_ca_certificate(ca):
    cert = ca.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.subject == cert.issuer
    constraints = _ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = _ext(cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    _ext(cert, x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=3650, minutes=5)
    assert ca.is_issued_by(cert)


def test_sign_csr_overrides_the_requested_identity(ca):
    key = pki.generate_key()
    pem = ca.sign_csr(pki.make_csr(key, "admin"), "agent-0001")
    cert = pki.load_certificate(pem)
    assert pki.common_name(cert) == "agent-0001"
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-0001")])
    assert cert.issuer == ca.certificate.subject
    assert cert.public_key() == key.public_key()
    assert ca.is_issued_by(cert)
    assert _ext(cert, x509.BasicConstraints).value.ca is False
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert (
        _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
        == _ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    )
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.SubjectAlternativeName)
    # Backdated for clock skew; valid for the requested days from "now".
    assert cert.not_valid_before_utc.timestamp() == NOW - 300
    assert pki.not_after(cert) == NOW + 365 * 86400


def test_sign_csr_ignores_requested_extensions(ca):
    key = pki.generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = pki.load_certificate(ca.sign_csr(csr, "agent-2"))
    assert _ext(cert, x509.BasicConstraints).value.ca is False
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.SubjectAlternativeName)


def test_serial_numbers_are_random(ca):
    csr = pki.make_csr(pki.generate_key())
    serials = {pki.load_certificate(ca.sign_csr(csr, "a")).serial_number for _ in range(3)}
    assert len(serials) == 3


def test_sign_csr_with_server_names(ca):
    pem = ca.sign_csr(
        pki.make_csr(pki.generate_key()), "gw", server_names=["gw.example", "10.0.0.5"]
    )
    cert = pki.load_certificate(pem)
    usages = list(_ext(cert, x509.ExtendedKeyUsage).value)
    assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


@pytest.mark.parametrize(
    "csr, match",
    [
        (b"not a csr", "not a PEM certificate signing request"),
        (b"", "not a PEM certificate signing request"),
    ],
)
def test_garbage_csr_is_rejected(ca, csr, match):
    with pytest.raises(CertificateError, match=match):
        ca.sign_csr(csr, "agent")


def test_csr_with_a_bad_signature_is_rejected(ca):
    csr = x509.load_pem_x509_csr(pki.make_csr(pki.generate_key(), "agent"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte is part of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CertificateError, match="signature does not verify"):
        ca.sign_csr(tampered, "agent")


def test_weak_key_is_rejected(ca):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CertificateError, match="RSA-1024 is too short"):
        ca.sign_csr(pki.make_csr(weak), "agent")


def test_rsa_key_is_accepted(ca):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = pki.load_certificate(ca.sign_csr(pki.make_csr(key), "legacy"))
    assert _ext(cert, x509.KeyUsage).value.key_encipherment


@pytest.mark.parametrize("name", ["", "x" * 65])
def test_unusable_common_name_is_rejected(ca, name):
    with pytest.raises(CertificateError, match="unusable common name"):
        ca.sign_csr(pki.make_csr(pki.generate_key()), name)


def test_certificate_error_is_a_value_error():
    assert issubclass(CertificateError, ValueError)


def test_leaf_never_outlives_the_ca(ca):
    cert = pki.load_certificate(ca.sign_csr(pki.make_csr(pki.generate_key()), "a", days=99999))
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_server_certificate_names(ca):
    key_pem, cert_pem = ca.issue_server_certificate(["tcm.example", "192.0.2.10", "127.0.0.1"])
    cert = pki.load_certificate(cert_pem)
    assert pki.load_key(key_pem).public_key() == cert.public_key()
    assert pki.common_name(cert) == "tcm.example"
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["tcm.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=397, minutes=5)
    assert lifetime <= datetime.timedelta(days=398)  # the CA/Browser Forum's limit
    assert ca.is_issued_by(cert)


def test_server_certificate_for_loopback_only(ca):
    _, cert_pem = ca.issue_server_certificate([])
    cert = pki.load_certificate(cert_pem)
    assert pki.common_name(cert) == "localhost"


def test_is_issued_by_rejects_a_foreign_ca(ca, foreign_ca):
    foreign_leaf = pki.load_certificate(
        foreign_ca.sign_csr(pki.make_csr(pki.generate_key()), "agent")
    )
    assert foreign_ca.is_issued_by(foreign_leaf)
    assert not ca.is_issued_by(foreign_leaf)
    assert not ca.is_issued_by(foreign_ca.certificate)


def test_is_issued_by_checks_the_signature_not_just_the_name(ca, tmp_path):
    # Another CA with the very same name: issuer names match, signatures do not.
    twin = CertificateAuthority.load_or_create(str(tmp_path), "tcm CA")
    leaf = pki.load_certificate(twin.sign_csr(pki.make_csr(pki.generate_key()), "agent"))
    assert leaf.issuer == ca.certificate.subject
    assert not ca.is_issued_by(leaf)


# -- files -----------------------------------------------------------------------------------


def test_ca_files_and_modes(tmp_path):
    directory = tmp_path / "state" / "ca"
    ca = CertificateAuthority.load_or_create(str(directory))
    assert _mode(directory / "ca.key") == 0o600
    assert _mode(directory / "ca.pem") == 0o644
    assert (directory / "ca.pem").read_bytes() == ca.cert_pem
    assert sorted(os.listdir(directory)) == ["ca.key", "ca.pem"]  # no temporary files left


def test_reload_keeps_the_same_ca(tmp_path):
    first = CertificateAuthority.load_or_create(str(tmp_path))
    issued = pki.load_certificate(first.sign_csr(pki.make_csr(pki.generate_key()), "agent"))
    second = CertificateAuthority.load_or_create(str(tmp_path))
    assert second.fingerprint == first.fingerprint
    assert second.cert_pem == first.cert_pem
    assert second.is_issued_by(issued)
    again = pki.load_certificate(second.sign_csr(pki.make_csr(pki.generate_key()), "agent"))
    assert first.is_issued_by(again)


def test_lost_certificate_is_made_again_from_the_key(tmp_path):
    first = CertificateAuthority.load_or_create(str(tmp_path))
    issued = pki.load_certificate(first.sign_csr(pki.make_csr(pki.generate_key()), "agent"))
    os.unlink(tmp_path / "ca.pem")
    second = CertificateAuthority.load_or_create(str(tmp_path))
    assert second.fingerprint != first.fingerprint
    assert second.is_issued_by(issued)  # same name, same key: old certificates still verify


def test_lost_key_is_an_error_not_a_new_ca(tmp_path):
    CertificateAuthority.load_or_create(str(tmp_path))
    os.unlink(tmp_path / "ca.key")
    with pytest.raises(CertificateError, match="ca.key is missing"):
        CertificateAuthority.load_or_create(str(tmp_path))
    assert not (tmp_path / "ca.key").exists()


def test_key_that_does_not_fit_the_certificate(tmp_path):
    CertificateAuthority.load_or_create(str(tmp_path))
    pki.write_private(str(tmp_path / "ca.key"), pki.key_to_pem(pki.generate_key()))
    with pytest.raises(CertificateError, match="does not belong"):
        CertificateAuthority.load_or_create(str(tmp_path))


def test_readable_ca_key_is_warned_about(tmp_path):
    CertificateAuthority.load_or_create(str(tmp_path))
    os.chmod(tmp_path / "ca.key", 0o644)
    with capturedLogs() as events:
        CertificateAuthority.load_or_create(str(tmp_path))
    assert any("accessible to other users" in e.get("log_format", "") for e in events)


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_write_modes_do_not_depend_on_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        pki.write_private(str(tmp_path / "k"), b"secret")
        pki.write_public(str(tmp_path / "c"), b"public")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k") == 0o600
    assert _mode(tmp_path / "c") == 0o644
    assert (tmp_path / "k").read_bytes() == b"secret"


def test_write_private_replaces_a_readable_file(tmp_path):
    path = tmp_path / "agent.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    pki.write_private(str(path), b"new")
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o600
    assert os.listdir(tmp_path) == ["agent.key"]


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "agent.key"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        pki.write_private(str(path), "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["agent.key"]


# -- TLS helpers without sockets -------------------------------------------------------------


def test_client_options_need_both_certificate_and_key(ca):
    with pytest.raises(ValueError, match="both"):
        pki.client_tls_options("localhost", ca.cert_pem, cert_pem=ca.cert_pem)


def test_server_options_refuse_a_key_of_another_certificate(ca):
    key_pem, _ = ca.issue_server_certificate(["a.example"])
    _, cert_pem = ca.issue_server_certificate(["b.example"])
    with pytest.raises(CertificateError, match="does not belong"):
        server_tls_options(key_pem, cert_pem, [ca.cert_pem])


def test_server_options_need_a_client_ca(ca):
    key_pem, cert_pem = ca.issue_server_certificate([])
    with pytest.raises(CertificateError, match="at least one CA"):
        server_tls_options(key_pem, cert_pem, [])


class _FakeTLSTransport:
    def __init__(self, peer):
        self._peer = peer

    def getPeerCertificate(self):
        return self._peer


def test_peer_common_name(ca):
    x509_peer = crypto.X509.from_cryptography(ca.certificate)
    assert pki.peer_common_name(_FakeTLSTransport(x509_peer)) == "tcm CA"
    assert pki.peer_common_name(_FakeTLSTransport(ca.certificate)) == "tcm CA"
    assert pki.peer_common_name(_FakeTLSTransport(None)) is None
    assert pki.peer_common_name(StringTransport()) is None  # no TLS at all


def test_negotiated_tls_without_tls():
    none = {"version": None, "cipher": None, "handshake": None}
    assert pki.negotiated_tls(StringTransport()) == none
    assert pki.negotiated_tls(object()) == none


def test_describe_tls_error():
    queue = [("SSL routines", "", "certificate verify failed")]
    assert pki.describe_tls_error(SSL.Error(queue)) == "certificate verify failed"
    assert pki.describe_tls_error(SSL.Error([])) == "unknown TLS error"
    assert pki.describe_tls_error(SSL.SysCallError(104, "ECONNRESET")) == "ECONNRESET"
    assert pki.describe_tls_error(ValueError("hostname mismatch")) == "hostname mismatch"


def test_handshake_logger_passes_on_a_refusal():
    class Refusing(protocol.Factory):
        def buildProtocol(self, addr):
            return None

    assert HandshakeLogger(Refusing()).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is None


def test_handshake_logger_counts_and_logs():
    logger = HandshakeLogger(protocol.Factory.forProtocol(protocol.Protocol))
    error = SSL.Error([("SSL routines", "", "unsupported protocol")])
    with capturedLogs() as events:
        logger.handshakeFailed(IPv4Address("TCP", "192.0.2.1", 4433), error)
        logger.handshakeFailed(IPv6Address("TCP", "2001:db8::1", 4433), error)
    assert logger.failures == {"unsupported protocol": 2}
    assert [(e["log_level"].name, e["peer"], e["reason"]) for e in events] == [
        ("warn", "192.0.2.1:4433", "unsupported protocol"),
        ("warn", "[2001:db8::1]:4433", "unsupported protocol"),
    ]
