"""The certificates service: what the server's parts ask of its CA (tcm/server/ca.py), and
the server's own TLS identity, renewed before it expires when tcm made it (`ServerTLS`)."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import ICertificates
from tcm.protocol import link
from tcm.server.ca import CertificateAuthority
from tcm.server.config import ServerConfig
from tcm.tls import pki
from tcm.tls.resumption import ResumptionKeys
from tcm.tls.server import server_tls_options

#: A self-made server certificate is issued again when this part of its life has passed.
SERVER_RENEW_FRACTION = 2 / 3

#: How often a running server checks whether its certificate is due (seconds).
SERVER_CERT_CHECK = 3600.0


@implementer(ICertificates)
class Certificates:
    """Agents' and nodes' certificates, signed by this server's CA, and its own TLS identity.

    `unit` (this server's name) goes into agents' certificates: gateways route by it."""

    def __init__(self, ca: CertificateAuthority, unit: str, clock: Callable[[], float] = time.time):
        self.ca = ca
        self.unit = unit
        self._clock = clock

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate agents and nodes trust (PEM)."""
        return self.ca.cert_pem

    def sign_agent(self, csr_pem: bytes, agent_id: str, days: float) -> bytes:
        """An agent's client certificate living `days` (a fraction for hours); ValueError
        for a bad CSR. Enrollment and renewal alike."""
        return self.ca.sign_csr(
            csr_pem,
            common_name=agent_id,
            unit=self.unit,
            lifetime=datetime.timedelta(days=days),
        )

    def sign_node(self, csr_pem: bytes, name: str, days: float, hostnames: list[str]) -> bytes:
        """A node's certificate (`node:NAME`), a client one that also serves its own names,
        living `days` (a fraction for hours)."""
        return self.ca.sign_csr(
            csr_pem,
            common_name=link.NODE_PREFIX + name,
            lifetime=datetime.timedelta(days=days),
            client=True,
            server_names=list(dict.fromkeys([*hostnames, "localhost", "127.0.0.1", "::1"])),
        )

    def verify_issued(self, cert: x509.Certificate) -> str:
        """The subject of a certificate this CA issued and that is valid now; ValueError."""
        return self.ca.verify_issued(cert)

    def server_identity(self, config: ServerConfig) -> tuple[bytes, bytes]:
        """This server's TLS key and certificate (PEM): the admin's, or one issued by the CA
        for the configured names (issued again when the names change, and when 2/3 of its
        life has passed)."""
        if config.cert and config.key:
            with open(config.cert, "rb") as f:
                cert_pem = f.read()
            with open(config.key, "rb") as f:
                key_pem = f.read()
            return key_pem, cert_pem
        cert_path = os.path.join(config.state_dir, "server.pem")
        key_path = os.path.join(config.state_dir, "server.key")
        names = sorted({config.interface, *config.hostnames} - {"0.0.0.0", "::", ""})
        if (
            not os.path.exists(cert_path)
            or not _file_names(cert_path, names)
            or _due(cert_path, self._clock())
        ):
            key_pem, cert_pem = self.ca.issue_server_certificate(names)
            pki.write_private(key_path, key_pem)
            pki.write_public(cert_path, cert_pem)
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
        return key_pem, cert_pem


def _due(cert_path: str, now: float) -> bool:
    with open(cert_path, "rb") as f:
        cert = pki.load_certificate(f.read())
    start = cert.not_valid_before_utc.timestamp()
    return now >= start + SERVER_RENEW_FRACTION * (pki.not_after(cert) - start)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The listeners' TLS: this server's identity, rebuilt when `check` finds a new one, so
    new connections get the renewed certificate while open ones keep theirs."""

    _log = Logger()

    def __init__(
        self,
        certificates: Certificates,
        config: ServerConfig,
        resumption: tuple[ResumptionKeys, Callable[[], float]] | None = None,
    ):
        self._certificates = certificates
        self._config = config
        self._resumption = resumption  # resumes handshakes with the tokens of welcomes
        self.cert_pem = b""
        self.options: Any = None
        self.check()

    def check(self) -> bool:
        """Renew the self-made certificate when due; True when the options were rebuilt."""
        key_pem, cert_pem = self._certificates.server_identity(self._config)
        if cert_pem == self.cert_pem:
            return False
        options = server_tls_options(
            key_pem,
            cert_pem,
            [self._certificates.ca_pem],
            groups=self._config.tls_groups,
            resumption=self._resumption,
        )
        if self.options is not None:
            cert = pki.load_certificate(cert_pem)
            self._log.info(
                "server certificate renewed: serial {serial:x}, valid until {until}",
                serial=cert.serial_number,
                until=cert.not_valid_after_utc.isoformat(),
            )
        self.options, self.cert_pem = options, cert_pem
        return True

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.options.getContext(), None)


def _file_names(cert_path: str, names: list[str]) -> bool:
    with open(cert_path, "rb") as f:
        return pki.names_in(f.read(), names)
