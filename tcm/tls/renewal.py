"""Certificate renewal, for agents and relay nodes alike: a new key and CSR, the same
identity, no token.

When `fraction` (default 2/3) of the certificate's life has passed, a CSR for a new key goes
to whoever issues (`_issue`: the agent's API over its session, a node's HTTPS link endpoint,
an embedded node's own server) and the answer is kept. New connections present the new
certificate (`Identity.renewed`); the old one keeps working until it expires. The pair is
written as `key.next.pem` + `cert.next.pem` and renamed into place (`promote_renewed`), so
a crash never leaves a key without its certificate.

A certificate that expired (offline through the whole renewal window) cannot be renewed:
only enrollment with a token helps, and that is said instead of failing TLS forever.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from tcm.tls import pki
from tcm.tls.identity import Identity

DEFAULT_FRACTION = 2 / 3
RETRY = 30.0  # seconds between attempts when a renewal failed


class RenewalFailed(Exception):
    """The issuer refused or could not be reached; the message says which."""


def promote_renewed(state_dir: str) -> None:
    """Put a renewed key and certificate in place (a renewal interrupted between renames)."""
    key_next = os.path.join(state_dir, "key.next.pem")
    cert_next = os.path.join(state_dir, "cert.next.pem")
    if os.path.exists(cert_next):
        if os.path.exists(key_next):
            os.replace(key_next, os.path.join(state_dir, "key.pem"))
        os.replace(cert_next, os.path.join(state_dir, "cert.pem"))
    elif os.path.exists(key_next):  # the certificate never came: the key is worthless
        os.unlink(key_next)


def utc(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


class CertificateRenewal:
    """Renews an identity's certificate when `fraction` of its life passed (`_issue` says
    how: subclasses)."""

    _log = Logger()
    common_name = "tcm-agent"  # the CSR's subject (the issuer ignores it for agents)

    def __init__(
        self,
        reactor: Any,
        state_dir: str,
        identity: Identity,
        fraction: float = DEFAULT_FRACTION,
        on_expired: Callable[[str], None] | None = None,
    ):
        if not 0 < fraction < 1:
            raise ValueError(f"the renewal fraction must be between 0 and 1, not {fraction}")
        self._reactor = reactor
        self._dir = state_dir
        self._identity = identity
        self.fraction = fraction
        self._on_expired = on_expired
        self._timer: Any = None
        self._renewing = False
        self.last_renewal: float | None = None
        self.last_error: str | None = None

    def _issue(self, csr_pem: bytes) -> Deferred[bytes]:
        """The certificate (PEM) for this CSR; fails with RenewalFailed saying why."""
        raise NotImplementedError

    def expired_message(self, not_after: float) -> str:
        return f"the certificate expired at {utc(not_after)} and cannot be renewed: enroll again"

    # -- the certificate in force ----------------------------------------------------------
    def _certificate(self) -> Any:
        """The certificate in force (None for an identity without one: nothing to renew)."""
        pem = self._identity.cert_pem
        return pki.load_certificate(pem) if pem else None

    def renew_at(self) -> float:
        """When the certificate is due for renewal (epoch seconds; never without one)."""
        cert = self._certificate()
        if cert is None:
            return float("inf")
        start = cert.not_valid_before_utc.timestamp()
        return start + self.fraction * (cert.not_valid_after_utc.timestamp() - start)

    def expired(self) -> bool:
        cert = self._certificate()
        return cert is not None and self._reactor.seconds() >= pki.not_after(cert)

    def status(self) -> dict[str, Any] | None:
        """Serial, validity, when it renews, and any problem (status pages, `status`)."""
        cert = self._certificate()
        if cert is None:
            return None
        return {
            "serial": f"{cert.serial_number:x}",
            "not_before": cert.not_valid_before_utc.timestamp(),
            "not_after": cert.not_valid_after_utc.timestamp(),
            "renew_at": self.renew_at(),
            "expired": self.expired(),
            "last_renewal": self.last_renewal,
            "last_error": self.last_error,
        }

    # -- scheduling --------------------------------------------------------------------------
    def start(self) -> None:
        """Check now, and again when renewal is due."""
        self._check()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, at: float) -> None:
        self.stop()
        self._timer = self._reactor.callLater(max(0.0, at - self._reactor.seconds()), self._check)

    def _check(self) -> None:
        if self._renewing:
            return
        now = self._reactor.seconds()
        if self.expired():
            self.last_error = self.expired_message(pki.not_after(self._certificate()))
            self._log.error("{why}", why=self.last_error)
            self.stop()
            if self._on_expired is not None:
                self._on_expired(self.last_error)
            return
        due = self.renew_at()
        if due == float("inf"):
            return
        if now < due:
            self._schedule(due)
            return
        self.renew()

    def _due(self) -> bool:
        return self._reactor.seconds() >= self.renew_at()

    # -- the renewal ---------------------------------------------------------------------
    @inlineCallbacks
    def renew(self):
        """A new key, its CSR to the issuer, the answer kept and put in force."""
        self._renewing = True
        try:
            key = pki.generate_key()
            csr = pki.make_csr(key, common_name=self.common_name)
            try:
                cert_pem = yield self._issue(csr)
            except RenewalFailed as e:
                return self._failed(str(e))
            except Exception as e:
                return self._failed(pki.describe_tls_error(e))
            try:
                cert = pki.load_certificate(cert_pem)
            except ValueError as e:
                return self._failed(f"not a certificate: {e}")
            if pki.public_key_der(cert.public_key()) != pki.public_key_der(key.public_key()):
                return self._failed("the certificate is not for the new key")
            self._keep(pki.key_to_pem(key), cert_pem)
            self.last_renewal = self._reactor.seconds()
            self.last_error = None
            self._log.info(
                "certificate renewed: serial {serial:x}, valid until {until}",
                serial=cert.serial_number,
                until=cert.not_valid_after_utc.isoformat(),
            )
            # never again at once, whatever the issuer's lifetime and skew
            self._schedule(max(self.renew_at(), self._reactor.seconds() + RETRY))
        finally:
            self._renewing = False

    def _failed(self, why: str) -> None:
        self.last_error = f"certificate renewal failed: {why}"
        self._log.warn("{why}; trying again in {retry:.0f} s", why=self.last_error, retry=RETRY)
        self._schedule(self._reactor.seconds() + RETRY)

    def _keep(self, key_pem: bytes, cert_pem: bytes) -> None:
        pki.write_private(os.path.join(self._dir, "key.next.pem"), key_pem)
        pki.write_public(os.path.join(self._dir, "cert.next.pem"), cert_pem)
        promote_renewed(self._dir)
        self._identity.renewed(cert_pem, key_pem)


class FollowRenewals:
    """For processes that share a state directory with the one that renews (a gateway's
    other workers): adopt the certificate on disk when it changed, checked every `every`
    seconds, for the next connections."""

    def __init__(self, reactor: Any, state_dir: str, identity: Identity, every: float = RETRY):
        self._reactor = reactor
        self._dir = state_dir
        self._identity = identity
        self.every = every
        self._timer: Any = None

    def start(self) -> None:
        self.check()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def check(self) -> bool:
        """Adopt a changed certificate; True when it did."""
        self._timer = self._reactor.callLater(self.every, self.check)
        try:
            with open(os.path.join(self._dir, "cert.pem"), "rb") as f:
                cert_pem = f.read()
            with open(os.path.join(self._dir, "key.pem"), "rb") as f:
                key_pem = f.read()
            cert, key = pki.load_certificate(cert_pem), pki.load_key(key_pem)
        except (OSError, ValueError):
            return False  # between the renames of a renewal: next time
        if cert_pem == self._identity.cert_pem:
            return False
        if pki.public_key_der(cert.public_key()) != pki.public_key_der(key.public_key()):
            return False  # the key renamed, the certificate not yet
        self._identity.renewed(cert_pem, key_pem)
        return True
