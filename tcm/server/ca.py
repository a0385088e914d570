"""The tcm certificate authority.

The CA certifies agent identities: an agent sends a CSR, the server decides which identity
(common name) the certificate carries. Agents trust the CA certificate for the server's
certificate too, unless the admin installs a certificate of his own. The CA is server state;
it builds on the TLS layer (``tcm.tls``), where the server's TLS options, handshake logging
and the certificate helpers live.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

from tcm.tls import pki
from tcm.tls.pki import CertificateError

__all__ = ["CertificateAuthority", "CertificateError"]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

#: Issued certificates start this much in the past, so a peer whose clock is a little
#: behind the server's does not reject a certificate fresh from enrollment.
CLOCK_SKEW = datetime.timedelta(minutes=5)

#: Names every server certificate carries, so loopback clients can always verify it.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

#: The server certificate's default lifetime: under the 398 days browsers accept.
SERVER_CERT_DAYS = 397

#: The shortest certificate the CA issues (agents' certificates may live a few minutes).
MIN_LIFETIME = datetime.timedelta(seconds=60)

_ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MINIMUM_RSA_BITS = 2048


class CertificateAuthority:
    """tcm's own CA: an ECDSA P-256 key and a self-signed certificate that may only
    sign end-entity certificates (path length 0)."""

    _log = Logger()

    def __init__(
        self,
        key: CertificateIssuerPrivateKeyTypes,
        certificate: x509.Certificate,
        clock: Callable[[], float] = time.time,
    ):
        if pki.public_key_der(key.public_key()) != pki.public_key_der(certificate.public_key()):
            raise CertificateError("the CA key does not belong to the CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.value.ca:
            raise CertificateError("the CA certificate is not a CA (BasicConstraints ca=False)")
        self._key = key
        self._clock = clock
        self.certificate = certificate
        self.cert_pem = pki.cert_to_pem(certificate)
        self.fingerprint = pki.fingerprint(certificate)

    @classmethod
    def load_or_create(
        cls,
        directory: str,
        name: str = "tcm CA",
        clock: Callable[[], float] = time.time,
    ) -> CertificateAuthority:
        """The CA kept in ``directory`` (``ca.pem``, ``ca.key``); created on first use.

        A missing certificate next to an existing key is made again from that key (a
        crash between the two writes); a missing key is an error, never a new CA:
        a new CA would cut off every enrolled agent.
        """
        os.makedirs(directory, mode=0o700, exist_ok=True)
        cert_path = os.path.join(directory, CA_CERT_FILE)
        key_path = os.path.join(directory, CA_KEY_FILE)
        have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
        if have_cert and not have_key:
            raise CertificateError(
                f"{cert_path} exists but {key_path} is missing: restore the key from a "
                f"backup, or remove {cert_path} to start a new CA (every agent must then "
                f"enroll again)"
            )
        if have_key:
            key = _read_key(key_path)
            if have_cert:
                with open(cert_path, "rb") as f:
                    certificate = pki.load_certificate(f.read())
                ca = cls(key, certificate, clock)
                cls._log.info(
                    "loaded CA {fingerprint} from {directory}",
                    fingerprint=ca.fingerprint,
                    directory=directory,
                )
                return ca
            cls._log.warn(
                "{cert_path} is missing: making it again from the CA key", cert_path=cert_path
            )
        else:
            key = pki.generate_key()
            # The key first: a certificate without its key would be worthless.
            pki.write_private(key_path, pki.key_to_pem(key))
        certificate = _self_signed_ca(key, name, _utc(clock()))
        pki.write_public(cert_path, pki.cert_to_pem(certificate))
        ca = cls(key, certificate, clock)
        cls._log.info(
            "created CA {fingerprint} in {directory}",
            fingerprint=ca.fingerprint,
            directory=directory,
        )
        return ca

    @staticmethod
    def new_pem(
        name: str = "tcm CA", clock: Callable[[], float] = time.time
    ) -> tuple[bytes, bytes]:
        """A new CA as (key PEM, certificate PEM), written nowhere (a cluster's first node
        stores it sealed in the database before any node writes it to its state directory)."""
        key = pki.generate_key()
        return pki.key_to_pem(key), pki.cert_to_pem(_self_signed_ca(key, name, _utc(clock())))

    def sign_csr(
        self,
        csr_pem: bytes,
        common_name: str,
        days: int = 365,
        client: bool = True,
        server_names: Sequence[str] = (),
        unit: str | None = None,
        lifetime: datetime.timedelta | None = None,
    ) -> bytes:
        """Certify the key of a CSR as ``common_name``; the PEM certificate.

        The CSR's own subject and extensions are ignored: the server decides identities.
        ``client`` grants clientAuth; ``server_names`` (DNS names or IP addresses) grant
        serverAuth with those names as SANs. ``unit`` becomes the subject's OU: an agent's
        certificate names the server it belongs to there (gateways route by it).
        ``lifetime``, when given, replaces ``days`` (agents' certificates of a few hours).
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as e:
            raise CertificateError(f"not a PEM certificate signing request: {e}") from None
        try:
            public_key = csr.public_key()
            valid = csr.is_signature_valid
        except (UnsupportedAlgorithm, ValueError) as e:
            raise CertificateError(f"unsupported key in certificate signing request: {e}") from None
        if not valid:
            raise CertificateError("certificate signing request signature does not verify")
        return pki.cert_to_pem(
            self._issue(
                public_key,
                common_name,
                lifetime or datetime.timedelta(days=days),
                client,
                server_names,
                unit,
            )
        )

    def verify_issued(self, cert: x509.Certificate) -> str:
        """The subject CN of a client certificate this CA issued and that is valid now;
        ValueError otherwise (a certificate forwarded by a reverse proxy is checked here)."""
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise ValueError("not issued by this tcm CA") from None
        now = _utc(self._clock())
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ValueError("expired or not yet valid")
        return pki.common_name(cert)

    def issue_server_certificate(
        self, hostnames: Iterable[str], days: int = SERVER_CERT_DAYS
    ) -> tuple[bytes, bytes]:
        """A new key and a serverAuth certificate for ``hostnames`` as ``(key_pem, cert_pem)``.

        Names that parse as IP addresses become IP SANs, the rest DNS SANs; the loopback
        names ``localhost``, ``127.0.0.1`` and ``::1`` are always added. The first name is
        the common name. 397 days (398 with the clock-skew backdating) is the longest lifetime
        browsers and Apple platforms accept for a TLS server certificate since 2020; the server
        renews it before it expires (tcm/server/certificates.py).
        """
        names = _unique([*hostnames, *LOOPBACK_NAMES])
        key = pki.generate_key()
        lifetime = datetime.timedelta(days=days)
        certificate = self._issue(key.public_key(), names[0], lifetime, False, names)
        return pki.key_to_pem(key), pki.cert_to_pem(certificate)

    def is_issued_by(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed ``cert`` (issuer name and signature; not validity dates)."""
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            return False
        return True

    def _issue(
        self,
        public_key: CertificatePublicKeyTypes,
        common_name: str,
        lifetime: datetime.timedelta,
        client: bool,
        server_names: Sequence[str],
        unit: str | None = None,
    ) -> x509.Certificate:
        _check_public_key(public_key)
        if lifetime < MIN_LIFETIME:
            raise CertificateError(
                f"a certificate lives at least {MIN_LIFETIME.total_seconds():.0f} s, "
                f"not {lifetime.total_seconds():.0f} s"
            )
        if not client and not server_names:
            raise CertificateError("a certificate needs client=True or server_names")
        try:
            attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
            if unit:
                attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
            subject = x509.Name(attributes)
        except ValueError as e:
            raise CertificateError(f"unusable common name {common_name!r}: {e}") from None
        now = _utc(self._clock())
        # A certificate outliving its CA would fail verification from that day anyway.
        expires = min(now + lifetime, self.certificate.not_valid_after_utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        try:
            ca_key_id = self.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier
            ).value
            authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_key_id
            )
        except x509.ExtensionNotFound:
            authority_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.certificate.public_key()  # type: ignore[arg-type]
            )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            # a tenth of a short life at most: an agent renews at a part of the whole span
            .not_valid_before(now - min(CLOCK_SKEW, lifetime / 10))
            .not_valid_after(expires)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(authority_key_id, critical=False)
        )
        if server_names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_general_names(server_names)), critical=False
            )
        return builder.sign(self._key, pki.signature_hash(self._key))


def _self_signed_ca(
    key: CertificateIssuerPrivateKeyTypes, name: str, now: datetime.datetime
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, pki.signature_hash(key))
    )


def _leaf_key_usage(public_key: CertificatePublicKeyTypes) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        # Only RSA keys can encrypt a TLS 1.2 (non-ECDHE) pre-master secret.
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _check_public_key(public_key: CertificatePublicKeyTypes) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _ACCEPTED_CURVES):
            raise CertificateError(
                f"unsupported key: elliptic curve {public_key.curve.name} "
                f"(use P-256, P-384 or P-521)"
            )
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < _MINIMUM_RSA_BITS:
            raise CertificateError(
                f"unsupported key: RSA-{public_key.key_size} is too short "
                f"(at least {_MINIMUM_RSA_BITS} bits)"
            )
    elif not isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise CertificateError(f"unsupported key type {type(public_key).__name__}")


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    result: list[x509.GeneralName] = []
    for name in _unique(names):
        address = _parse_ip(name)
        if address is not None:
            result.append(x509.IPAddress(address))
            continue
        try:
            result.append(x509.DNSName(name.encode("idna").decode("ascii")))
        except UnicodeError as e:
            raise CertificateError(f"not a usable host name: {name!r} ({e})") from None
    return result


def _parse_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def _unique(names: Iterable[str]) -> list[str]:
    """Names without blanks and duplicates (IP addresses compared by value), first wins."""
    seen: set[object] = set()
    result: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        address = _parse_ip(name)
        if address is not None:
            name = str(address)
        key = address if address is not None else name
        if key not in seen:
            seen.add(key)
            result.append(name)
    return result


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC)


def _read_key(path: str) -> CertificateIssuerPrivateKeyTypes:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        pem = f.read()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        CertificateAuthority._log.warn(
            "{path} is accessible to other users (mode {mode:o}); it should be 0600",
            path=path,
            mode=stat.S_IMODE(mode),
        )
    try:
        return pki.load_key(pem)
    except ValueError as e:
        raise CertificateError(f"cannot load the CA key {path}: {e}") from None
