"""The agent's certificate renewal: a new key and CSR, the same identity, no token.

When `fraction` (default 2/3) of the certificate's life has passed, the agent sends a CSR for
a new key to `POST /agent/v1/renew` over its link (the session's `request` envelopes, else
HTTPS with the current certificate) and keeps the answer. New connections present the new
certificate; the old one keeps working until it expires. The pair is written as
`key.next.pem` + `cert.next.pem` and renamed into place (`AgentState.promote_renewed`), so a
crash never leaves a key without its certificate.

An agent whose certificate expired (offline through the whole renewal window) cannot renew:
only enrollment with a token helps, and it says so instead of failing TLS forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import IAgentAPI, ISessionObserver
from tcm.tls import pki

DEFAULT_FRACTION = 2 / 3
RETRY = 30.0  # seconds between attempts when a renewal failed


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


def expired_message(not_after: float) -> str:
    """What an agent with an expired certificate tells its user."""
    import datetime

    when = datetime.datetime.fromtimestamp(not_after, datetime.UTC).isoformat(timespec="seconds")
    return (
        f"the agent's certificate expired at {when} and cannot be renewed: enroll again "
        f"with a token (tcm-agent --token TOKEN --server URL --ca-cert CA)"
    )


@implementer(ISessionObserver)
class CertificateRenewal:
    """Renews the agent's certificate over its link when `fraction` of its life passed."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        state_dir: str,
        identity: Any,
        api: IAgentAPI,
        fraction: float = DEFAULT_FRACTION,
        on_expired: Callable[[str], None] | None = None,
    ):
        if not 0 < fraction < 1:
            raise ValueError(f"the renewal fraction must be between 0 and 1, not {fraction}")
        self._reactor = reactor
        self._dir = state_dir
        self._identity = identity
        self._api = api
        self.fraction = fraction
        self._on_expired = on_expired
        self._timer: Any = None
        self._renewing = False
        self.last_renewal: float | None = None
        self.last_error: str | None = None

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
        """For `tcm-agent status`: serial, validity, when it renews, and any problem."""
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
            self.last_error = expired_message(pki.not_after(self._certificate()))
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

    # -- ISessionObserver: a way to the server opened, try then ---------------------------
    def session_opened(self, welcome: dict) -> None:
        if self.last_error is not None or self._due():
            self._check()

    def session_lost(self, reason: str, switched_off: bool) -> None:
        pass

    def polling_started(self) -> None:
        if self.last_error is not None or self._due():
            self._check()

    def _due(self) -> bool:
        return self._reactor.seconds() >= self.renew_at()

    # -- the renewal ---------------------------------------------------------------------
    @inlineCallbacks
    def renew(self):
        """A new key, its CSR to the server, the answer kept and put in force."""
        self._renewing = True
        try:
            key = pki.generate_key()
            csr = pki.make_csr(key)
            try:
                resp = yield self._api.call("POST", "/agent/v1/renew", {"csr": csr.decode()})
            except Exception as e:
                return self._failed(str(e))
            if resp.status != 200 or not isinstance(resp.body, dict):
                body = resp.body
                why = body.get("error", body) if isinstance(body, dict) else body
                return self._failed(f"refused ({resp.status}): {why}")
            cert_pem = str(resp.body.get("certificate", "")).encode()
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
            # never again at once, whatever the server's lifetime and skew
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
