"""The agent's certificate renewal: over its link (the session's `request` envelopes, else
HTTPS with the current certificate), `POST /agent/v1/renew` with a CSR for a new key.

The schedule, the files (`key.next.pem` + `cert.next.pem`, renamed into place) and the swap
of the TLS identity are the shared ones of tcm/tls/renewal.py; this adds the agent's call and
its session observer's hooks (a way to the server opened: try then, if due or failing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import inlineCallbacks
from zope.interface import implementer

from tcm.interfaces import IAgentAPI, ISessionObserver
from tcm.tls import renewal
from tcm.tls.identity import Identity
from tcm.tls.renewal import DEFAULT_FRACTION, RETRY, RenewalFailed, promote_renewed, utc

__all__ = ["RETRY", "CertificateRenewal", "expired_message", "promote_renewed"]


def expired_message(not_after: float) -> str:
    """What an agent with an expired certificate tells its user."""
    return (
        f"the agent's certificate expired at {utc(not_after)} and cannot be renewed: enroll "
        f"again with a token (tcm-agent --token TOKEN --server URL --ca-cert CA)"
    )


@implementer(ISessionObserver)
class CertificateRenewal(renewal.CertificateRenewal):
    """Renews the agent's certificate over its link when `fraction` of its life passed."""

    def __init__(
        self,
        reactor: Any,
        state_dir: str,
        identity: Identity,
        api: IAgentAPI,
        fraction: float = DEFAULT_FRACTION,
        on_expired: Callable[[str], None] | None = None,
    ):
        super().__init__(reactor, state_dir, identity, fraction, on_expired)
        self._api = api

    def expired_message(self, not_after: float) -> str:
        return expired_message(not_after)

    @inlineCallbacks
    def _issue(self, csr_pem: bytes):
        try:
            resp = yield self._api.call("POST", "/agent/v1/renew", {"csr": csr_pem.decode()})
        except Exception as e:
            raise RenewalFailed(str(e)) from None
        if resp.status != 200 or not isinstance(resp.body, dict):
            body = resp.body
            why = body.get("error", body) if isinstance(body, dict) else body
            raise RenewalFailed(f"refused ({resp.status}): {why}")
        return str(resp.body.get("certificate", "")).encode()

    # -- ISessionObserver: a way to the server opened, try then ---------------------------
    def session_opened(self, welcome: dict) -> None:
        if self.last_error is not None or self._due():
            self._check()

    def session_lost(self, reason: str, switched_off: bool) -> None:
        pass

    def polling_started(self) -> None:
        if self.last_error is not None or self._due():
            self._check()
