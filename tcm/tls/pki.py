"""Keys, certificate requests, certificates and TLS options, shared by the agent and the server.

Everything here is plain data in and out (PEM bytes, ``cryptography`` objects) except the
TLS helpers at the end, which build Twisted connection creators and read live TLS
transports. The certificate authority itself lives on the server side (``tcm.server.ca``);
the server side of TLS next to this module (``tcm.tls.server``).
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from tcm import compat
from tcm.tls.resumption import (
    Resumed,
    connection_of,
    offer_resumption,
    offered_token,
    resumed_peer,
)

__all__ = [
    "CertificateError",
    "PresentingClientTLS",
    "cert_to_pem",
    "client_tls_options",
    "common_name",
    "describe_tls_error",
    "fingerprint",
    "generate_key",
    "key_to_pem",
    "load_certificate",
    "load_certificates",
    "load_key",
    "make_csr",
    "negotiated_tls",
    "not_after",
    "public_key_der",
    "peer_common_name",
    "peer_subject",
    "signature_hash",
    "write_private",
    "write_public",
]


class CertificateError(ValueError):
    """A certificate, key or request that tcm cannot use; the message says why."""


# -- keys and requests -------------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key (cheaper TLS handshakes than RSA-2048)."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """The key as unencrypted PKCS#8 PEM; protect it with file modes (``write_private``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> CertificateIssuerPrivateKeyTypes:
    """Load an unencrypted PEM private key (any format OpenSSL reads: PKCS#8, SEC1, PKCS#1)."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise ValueError(f"unsupported private key type {type(key).__name__}")
    return key


def public_key_der(public_key: CertificatePublicKeyTypes) -> bytes:
    """The public key as DER SubjectPublicKeyInfo: equal bytes, same key."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str = "tcm-agent") -> bytes:
    """A PEM certificate signing request for ``key``.

    The subject is only a hint: the tcm CA decides the identity it certifies.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, signature_hash(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_key_id(csr_pem: bytes) -> str | None:
    """SHA-256 of a CSR's public key (hex), or None if it does not parse."""
    try:
        key = x509.load_pem_x509_csr(csr_pem).public_key()
    except ValueError:
        return None
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return digest.finalize().hex()


def signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """The hash to sign with ``key``: SHA-256, or None for Ed25519/Ed448 (they hash inside)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


# -- certificates ------------------------------------------------------------------------


def load_certificate(pem: bytes) -> x509.Certificate:
    """The first certificate of a PEM file (a leaf or a CA certificate)."""
    return x509.load_pem_x509_certificate(pem)


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in file order (a full chain, a CA bundle)."""
    return x509.load_pem_x509_certificates(pem)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def common_name(cert: x509.Certificate) -> str:
    """The subject CN of ``cert``; ``ValueError`` when it has none."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        raise ValueError(f"certificate {cert.subject.rfc4514_string()!r} has no common name")
    value = attributes[0].value
    return value.decode("utf-8") if isinstance(value, bytes) else value


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of the DER certificate, lower-case hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def server_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate names (subject alt names), in order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def names_in(cert_pem: bytes, names: Iterable[str]) -> bool:
    """Whether the certificate names every one of ``names`` (DNS or IP subject alt names)."""
    wanted = set(names)
    return not wanted or wanted <= set(server_names(load_certificate(cert_pem)))


def not_after(cert: x509.Certificate) -> float:
    """When ``cert`` expires, as seconds since the epoch."""
    return cert.not_valid_after_utc.timestamp()


# -- files -------------------------------------------------------------------------------


def write_private(path: str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, readable by its owner only (0600)."""
    _write_atomically(path, data, 0o600)


def write_public(path: str, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, world-readable (0644)."""
    _write_atomically(path, data, 0o644)


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    # The temporary file is created with its final mode, so a private key is never
    # readable by others, not even for a moment; fchmod undoes whatever the umask removed.
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not possible on every platform (Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- TLS ---------------------------------------------------------------------------------


def client_tls_options(
    hostname: str,
    ca_pem: bytes,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
) -> IOpenSSLClientConnectionCreator:
    """TLS 1.2+ client options that trust only ``ca_pem`` and verify ``hostname``.

    ``ca_pem`` may hold several certificates (e.g. the admin's CA for a server certificate
    from elsewhere); all of them are trusted. ``hostname`` may be a DNS name or an IP
    literal (``"127.0.0.1"``, ``"::1"`` or ``"[::1]"``); an IP is checked against the
    server certificate's IP SANs and is not sent as SNI. With ``cert_pem`` and ``key_pem``
    the client presents that certificate (mutual TLS); extra certificates after the first
    one in ``cert_pem`` are sent as its chain.

    The OpenSSL context (trust store, protocol settings) is made once per process for a
    ``hostname`` and ``ca_pem`` and shared; a client certificate is set on each connection
    it makes (``SSL_use_certificate``). A context of its own per identity cost about 30 KB
    once used, most of a swarm agent's memory beside its connection (issue 17); what
    identities may share, they share: a server and a relay node hold a few, a swarm
    thousands. A certificate with a chain still gets a context of its own (pyOpenSSL sets
    no chain on a connection).
    """
    if (cert_pem is None) != (key_pem is None):
        raise ValueError("give both cert_pem and key_pem, or neither")
    if cert_pem is None or key_pem is None:
        return _shared_client_options(hostname, ca_pem)
    leaf, *chain = load_certificates(cert_pem)
    key = load_key(key_pem)
    if public_key_der(leaf.public_key()) != public_key_der(key.public_key()):
        raise CertificateError("the private key does not belong to the certificate")
    if chain:
        return _client_options(hostname, ca_pem, leaf, key, chain)
    return PresentingClientTLS(_shared_client_options(hostname, ca_pem), cert_pem, key_pem)


@implementer(IOpenSSLClientConnectionCreator)
class PresentingClientTLS:
    """Client options that present a certificate: shared options (context, trust, host
    check) with this certificate and key set on each connection they make. The certificate
    and key are kept as PEM and loaded at each connection (tens of microseconds beside a
    handshake's milliseconds), so an identity without a connection holds no parsed copy."""

    __slots__ = ("_shared", "_cert_pem", "_key_pem")

    def __init__(self, shared: IOpenSSLClientConnectionCreator, cert_pem: bytes, key_pem: bytes):
        self._shared = shared
        self._cert_pem = cert_pem
        self._key_pem = key_pem

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._shared.clientConnectionForTLS(tlsProtocol)
        connection.use_certificate(load_certificate(self._cert_pem))
        # load_key returns only the key types a connection takes (no ML-DSA)
        connection.use_privatekey(load_key(self._key_pem))  # type: ignore[arg-type]
        return connection


@functools.lru_cache(maxsize=64)
def _shared_client_options(hostname: str, ca_pem: bytes) -> IOpenSSLClientConnectionCreator:
    """The options every client identity trusting ``ca_pem`` uses for ``hostname``."""
    return _client_options(hostname, ca_pem)


def _client_options(
    hostname: str,
    ca_pem: bytes,
    leaf: x509.Certificate | None = None,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    chain: Sequence[x509.Certificate] = (),
) -> IOpenSSLClientConnectionCreator:
    authorities = load_certificates(ca_pem)
    if not authorities:
        raise ValueError("ca_pem holds no certificate")
    trust_root = ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(ca)) for ca in authorities]
    )
    extra: dict[str, Any] = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
    if leaf is not None and key is not None:
        # cryptography objects rather than ssl.PrivateCertificate: the latter hands
        # pyOpenSSL X509/PKey objects to the context, which pyOpenSSL 26 deprecates.
        extra.update(privateKey=key, certificate=leaf)
        if chain:
            extra["extraCertChain"] = list(chain)
    if hostname.startswith("[") and hostname.endswith("]"):
        hostname = hostname[1:-1]
    options = ssl.optionsForClientTLS(hostname, trustRoot=trust_root, extraCertificateOptions=extra)
    context = compat.client_options_context(options)
    if context is not None:
        offer_resumption(context)  # a connection may offer a resumption token
    return options


def peer_certificate(transport: object) -> x509.Certificate | None:
    """The certificate the peer presented on ``transport``, or None.

    ``transport`` may be a TLS transport, a protocol wrapper around one (attribute lookups
    are forwarded), or a transport without TLS. With tcm's server options a certificate
    is only ever present after it verified against the tcm CA.
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    try:
        peer = get_peer_certificate()
    except (AttributeError, SSL.Error):
        # The TLS connection is already gone, or the transport is not TLS after all.
        return None
    if isinstance(peer, crypto.X509):
        peer = peer.to_cryptography()
    return peer


def peer_common_name(transport: object) -> str | None:
    """The subject CN of the peer's certificate on ``transport`` (see peer_certificate), or
    on a connection resumed with a token, the agent id the token names (tcm.tls.resumption)."""
    peer = peer_certificate(transport)
    if peer is None:
        resumed = resumed_peer(transport)
        return None if resumed is None else resumed.agent_id
    try:
        return common_name(peer)
    except ValueError:
        return None


def peer_subject(transport: object) -> tuple[str | None, str | None]:
    """(CN, OU) of the peer's verified certificate: for an agent, its id and the name of
    the server it enrolled with (None when the certificate predates server names). On a
    connection resumed with a token, what the token says of them."""
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None, None
    try:
        peer = get_peer_certificate()
    except (AttributeError, SSL.Error):
        return None, None
    if peer is None:
        resumed = resumed_peer(transport)
        return (None, None) if resumed is None else (resumed.agent_id, resumed.server)
    if not isinstance(peer, crypto.X509):
        peer = crypto.X509.from_cryptography(peer)
    subject = peer.get_subject()
    return subject.CN, subject.OU


def peer_fingerprint(transport: object) -> str | None:
    """The SHA-256 fingerprint of the peer's certificate on ``transport`` (on a connection
    resumed with a token: of the certificate the token was given for), or None."""
    peer = peer_certificate(transport)
    if peer is None:
        resumed = resumed_peer(transport)
        return None if resumed is None else resumed.fingerprint
    return fingerprint(peer)


def resumption_peer(transport: object) -> Resumed | None:
    """What a resumption token for the agent on ``transport`` names (tcm.tls.resumption):
    from its verified certificate, or on a connection resumed with a token, from that
    token. None without either."""
    peer = peer_certificate(transport)
    if peer is None:
        return resumed_peer(transport)
    try:
        cn = common_name(peer)
    except ValueError:
        return None
    units = peer.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    unit = units[0].value if units else None
    return Resumed(cn, unit if isinstance(unit, str) else None, fingerprint(peer), not_after(peer))


def handshake_kind(transport: object) -> str:
    """How the TLS handshake on ``transport`` went: "token" (resumed with a resumption
    token, tcm.tls.resumption), "ticket" (a session resumed otherwise), "full", or "none"
    (not a TLS connection)."""
    handle = connection_of(transport)
    if handle is None:
        return "none"
    if resumed_peer(transport) is not None:
        return "token"  # the server's side
    if not compat.tls_session_reused(handle):
        return "full"
    return "token" if offered_token(handle) else "ticket"  # the client's


def split_url(url: str) -> tuple[str, int]:
    """(host, port) of an https:// or wss:// URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "wss") or not parts.hostname:
        raise ValueError(f"server URL must be https://HOST[:PORT], not {url!r}")
    return parts.hostname, parts.port or 443


def negotiated_tls(transport: object) -> dict[str, str | None]:
    """``{"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "handshake": "full"}``
    for a TLS transport; ``handshake`` as ``handshake_kind`` says (full, ticket, token).

    All values are None when the transport is not TLS or the handshake has not completed.
    """
    result: dict[str, str | None] = {"version": None, "cipher": None, "handshake": None}
    handle = connection_of(transport)
    if handle is None:
        return result
    cipher = handle.get_cipher_name()
    if cipher is not None:
        result["version"] = handle.get_protocol_version_name()
        result["cipher"] = cipher
        result["handshake"] = handshake_kind(transport)
    return result


def describe_tls_error(error: BaseException) -> str:
    """A short, stable reason for a TLS failure, fit for a log line or a metrics label.

    ``OpenSSL.SSL.Error`` carries OpenSSL's error queue, ``[(library, function, reason),
    ...]``; its reasons are fixed strings such as ``"certificate verify failed"`` or
    ``"tlsv1 alert unknown ca"``.
    """
    if isinstance(error, SSL.SysCallError):
        if len(error.args) == 2:
            return str(error.args[1])
        return "system call error"
    if isinstance(error, SSL.Error):
        queue = error.args[0] if error.args else None
        if isinstance(queue, Sequence) and not isinstance(queue, str | bytes):
            reasons: list[str] = []
            for entry in queue:
                reason = entry[-1] if isinstance(entry, tuple) and entry else str(entry)
                if reason and reason not in reasons:
                    reasons.append(str(reason))
            if reasons:
                return "; ".join(reasons)
        elif queue:
            return str(queue)
        return "unknown TLS error"
    # Twisted's own hostname check (service_identity) fails the handshake this way.
    return str(error) or type(error).__name__
