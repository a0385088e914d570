"""The server side of TLS: one port for agents with a client certificate and for everyone
else without one.

``server_tls_options`` asks for a client certificate, verifies any it gets against the given
CAs (the tcm CA) and lets the handshake go on without one. Whether a request needs a
certificate is for the resource to decide (``tcm.tls.pki.peer_common_name``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from OpenSSL import SSL, crypto
from twisted.internet import ssl

from tcm import compat
from tcm.tls import pki
from tcm.tls.pki import CertificateError
from tcm.tls.resumption import ResumptionKeys, serve_resumption

__all__ = ["DEFAULT_TLS_GROUPS", "TLS12_CIPHERS", "server_tls_options"]

#: `--tls-groups` when not given: OpenSSL's own list, which puts the hybrid post-quantum
#: X25519MLKEM768 first where the OpenSSL has it (3.5+), then X25519 and the NIST curves.
DEFAULT_TLS_GROUPS = None

#: Seconds a TLS session stays resumable (its ticket's lifetime): a reconnecting agent that
#: offers its last session skips the certificate signature and verification. Bounded, since a
#: resumed session does not verify the client certificate again (its expiry included).
RESUMABLE_FOR = 600

# TLS 1.2 suites: ECDHE (forward secrecy) with AEAD only, ECDSA and RSA certificates (the tcm
# CA makes ECDSA, an admin's --cert may be RSA). No CBC (LUCKY13, padding oracles), no SHA-1
# MACs, no static RSA key exchange, no DHE. TLS 1.3 keeps OpenSSL's own suites, all AEAD.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
    ]
)


def tls_groups(value: str) -> str:
    """`--tls-groups` checked against this OpenSSL: the value, or ValueError naming it."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    if not value or not compat.set_tls_groups(ctx, value):
        raise ValueError(
            f"TLS groups {value!r}: not known to this OpenSSL "
            f"(e.g. X25519MLKEM768:X25519 or X25519)"
        )
    return value


#: `--tls-groups`, the same on server, task server and gateway (twisted.python.usage form).
TLS_GROUPS_OPTION = [
    "tls-groups",
    None,
    None,
    "TLS key exchange groups offered to agents, colon-separated in OpenSSL's form "
    "(default: OpenSSL's list, hybrid post-quantum X25519MLKEM768 first where "
    "available; X25519 alone takes less memory per session: docs/operating.md).",
    tls_groups,
]


class _ServerCertificateOptions(ssl.CertificateOptions):
    """``CertificateOptions`` whose context also names the acceptable client CAs and uses
    a fixed session id context."""

    def __init__(
        self,
        *,
        clientCAs: Sequence[x509.Certificate],
        groups: str | None = None,
        resumption: tuple[ResumptionKeys, Callable[[], float]] | None = None,
        **kwargs: object,
    ):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._clientCAs = list(clientCAs)
        self._groups = groups
        self._resumption = resumption
        self._prepared: SSL.Context | None = None

    def getContext(self) -> SSL.Context:
        ctx = super().getContext()  # made once and cached by CertificateOptions
        if ctx is not self._prepared:
            # pyOpenSSL refuses changes to a context once a connection used it, so these
            # go here, the first time the context is handed out (server_tls_options asks
            # for it at once, before any connection).
            for authority in self._clientCAs:
                # Without this list a client with several certificates cannot tell which
                # one to send; Twisted does not send it by itself.
                ctx.add_client_ca(authority)
            # Twisted sets a random session id context per context; a fixed one keeps the
            # meaning clear. Resuming a session with a verified client certificate needs one.
            ctx.set_session_id(b"tcm")
            ctx.set_timeout(RESUMABLE_FOR)
            if self._groups and not compat.set_tls_groups(ctx, self._groups):
                raise CertificateError(
                    f"TLS groups {self._groups!r}: not known to this OpenSSL "
                    f"(e.g. X25519MLKEM768:X25519 or X25519)"
                )
            if self._resumption is not None:
                serve_resumption(ctx, *self._resumption)
            self._prepared = ctx
        return ctx


def server_tls_options(
    key_pem: bytes,
    cert_pem: bytes,
    ca_pems: Sequence[bytes],
    chain_pems: Sequence[bytes] = (),
    groups: str | None = DEFAULT_TLS_GROUPS,
    resumption: tuple[ResumptionKeys, Callable[[], float]] | None = None,
) -> ssl.CertificateOptions:
    """TLS 1.2+ server options: the server's key and certificate, optional client
    certificates verified against ``ca_pems``, session tickets on, TLS 1.2 limited to
    ECDHE with AEAD suites (``TLS12_CIPHERS``).

    The server certificate may come from anywhere (the admin's own CA); ``ca_pems`` only
    decides which client certificates are accepted. Give the tcm CA alone: every client
    certificate these CAs verify is taken as an agent identity (its CN) by
    ``tcm.tls.pki.peer_common_name``, so a public or corporate CA here would let its
    certificates pose as agents. Certificates after the
    first in ``cert_pem`` (a full chain file) and those in ``chain_pems`` are sent as the
    chain. The context is built at once, so a key that does not fit the certificate fails
    here and not at the first handshake. ``groups``: the key exchange groups offered, in
    OpenSSL's colon-separated form (``--tls-groups``; None: OpenSSL's default, hybrid
    post-quantum first). ``resumption``: (keys, clock) to resume TLS 1.3 handshakes that
    offer a token those keys sealed, across restarts (``tcm.tls.resumption``).
    """
    try:
        key = pki.load_key(key_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"cannot load the server key: {e}") from None
    leaf, *chain = _load_all(cert_pem, "the server certificate")
    for pem in chain_pems:
        chain.extend(_load_all(pem, "a chain certificate"))
    authorities = [ca for pem in ca_pems for ca in _load_all(pem, "a client CA certificate")]
    if not authorities:
        raise CertificateError("at least one CA certificate is needed to verify clients")
    if pki.public_key_der(key.public_key()) != pki.public_key_der(leaf.public_key()):
        raise CertificateError("the server key does not belong to the server certificate")
    options = _ServerCertificateOptions(
        # cryptography objects for key, certificate and chain: pyOpenSSL 26 deprecates
        # its own X509/PKey there. caCerts still goes into an X509Store, which wants X509.
        privateKey=key,
        certificate=leaf,
        extraCertChain=chain or None,
        verify=True,
        caCerts=[crypto.X509.from_cryptography(ca) for ca in authorities],
        requireCertificate=False,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        enableSessionTickets=True,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
        clientCAs=authorities,
        groups=groups,
        resumption=resumption,
    )
    options.getContext()
    return options


def _load_all(pem: bytes, what: str) -> list[x509.Certificate]:
    try:
        certificates = pki.load_certificates(pem)
    except ValueError as e:
        raise CertificateError(f"cannot load {what}: {e}") from None
    if not certificates:
        raise CertificateError(f"no certificate in {what}")
    return certificates
