"""The agent's identity: its state directory's files, and enrollment with its server.

State directory layout:
    agent.json   agent id, server URL (written at enrollment)
    key.pem      private key (0600), made here, never leaves the machine
    cert.pem     certificate signed by the server's CA; its subject is the agent id
    key.next.pem, cert.next.pem  a renewal on its way into place (renewal.py)
    ca.pem       the CA this agent trusts for its server
    jobs/        the ledger and result spool (ledger.py)
    policies.json  the policies in force (policies.py)
    profile.json   the connection profile in force (profile.py)
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import Logger

from tcm.agent.backoff import backoff_policy
from tcm.agent.config import AgentConfig
from tcm.agent.link import Identity
from tcm.agent.renewal import promote_renewed
from tcm.statedir import StateDir
from tcm.tls import pki


class EnrollmentError(Exception):
    """Enrollment was refused or could not be done; the message says why."""


class EnrollmentUnavailable(EnrollmentError):
    """The server could not be reached, or was busy (5xx): worth trying again."""


class AgentState(StateDir):
    """The agent's files in its state directory."""

    META = "agent.json"

    def enrolled(self) -> bool:
        return self.read("cert.pem") is not None and "agent_id" in self.meta()

    def identity(self) -> Identity:
        promote_renewed(self.dir)
        ca = self.read("ca.pem")
        if ca is None:
            raise EnrollmentError(f"no CA certificate in {self.dir}: give --ca-cert")
        return Identity(ca_pem=ca, cert_pem=self.read("cert.pem"), key_pem=self.read("key.pem"))

    def forget_certificate(self) -> None:
        """Drop an expired certificate (and its key) before enrolling again."""
        for name in ("cert.pem", "key.pem"):
            try:
                os.unlink(self.path(name))
            except FileNotFoundError:
                pass


def _expired(state: AgentState, now: float) -> bool:
    promote_renewed(state.dir)
    cert_pem = state.read("cert.pem")
    return cert_pem is not None and now >= pki.not_after(pki.load_certificate(cert_pem))


def _untrusted(error: BaseException) -> bool:
    """Did the TLS handshake fail on the server's certificate (not on the network)?"""
    from OpenSSL import SSL
    from service_identity import VerificationError

    causes = [error]
    for reason in getattr(error, "reasons", None) or []:  # twisted.web's ResponseNeverReceived
        causes.append(getattr(reason, "value", reason))
    return any(
        isinstance(c, VerificationError)
        or (isinstance(c, SSL.Error) and "certificate verify failed" in pki.describe_tls_error(c))
        for c in causes
    )


@inlineCallbacks
def enroll(
    reactor: Any,
    state: AgentState,
    server: str,
    ca_pem: bytes,
    token: str,
    bind: str | None = None,
    proxy: Any = None,
    servers: list[str] | None = None,
):
    """Make a key, send a CSR with the token, keep the signed certificate (and the list of
    the cluster's `servers` to connect to, the first preferred)."""
    servers = servers or [server]
    log = Logger(namespace="tcm.agent.enroll")
    key_pem = state.read("key.pem")
    if key_pem is None:
        key_pem = pki.key_to_pem(pki.generate_key())
        pki.write_private(state.path("key.pem"), key_pem)
    csr = pki.make_csr(pki.load_key(key_pem))
    identity = Identity(ca_pem=ca_pem)
    from tcm.agent import webclient  # only here, at enrollment (webclient.py says why)

    http = webclient.http_client(reactor, webclient.EndpointFactory(reactor, identity, proxy, bind))
    url = server.rstrip("/") + "/agent/v1/enroll"
    body = {"token": token, "csr": csr.decode(), "hostname": socket.gethostname()}
    try:
        resp = yield http.post(url, json=body, timeout=30)
        payload = yield resp.json()
    except Exception as e:
        if _untrusted(e):  # a wrong --ca-cert (or not our server): trying again cannot help
            raise EnrollmentError(
                f"cannot enroll with {server}: its certificate is not trusted with the given "
                f"--ca-cert ({pki.describe_tls_error(e)})"
            ) from None
        raise EnrollmentUnavailable(
            f"cannot reach {server} to enroll: {pki.describe_tls_error(e)}"
        ) from None
    if resp.code >= 500:
        raise EnrollmentUnavailable(
            f"{server} could not enroll this agent now: {payload.get('error', payload)} "
            f"({resp.code})"
        )
    if resp.code != 201:
        raise EnrollmentError(
            f"enrollment refused by {server}: {payload.get('error', payload)} ({resp.code})"
        )
    pki.write_public(state.path("ca.pem"), ca_pem)
    pki.write_public(state.path("cert.pem"), payload["certificate"].encode())
    pki.write_public(
        state.path("agent.json"),
        json.dumps(
            {"agent_id": payload["agent_id"], "server": servers[0], "servers": list(servers)},
            indent=1,
        ).encode(),
    )
    log.info("enrolled with {server} as {agent}", server=server, agent=payload["agent_id"])
    return payload["agent_id"]


@inlineCallbacks
def enroll_if_needed(reactor: Any, config: AgentConfig, state: AgentState, proxy: Any):
    """Enroll with the token unless enrolled already; fires with the agent's Identity."""
    log = Logger(namespace="tcm.agent.enroll")
    cfg = config
    if state.enrolled() and cfg.token and _expired(state, reactor.seconds()):
        log.warn("the agent's certificate expired: enrolling again with the token given")
        state.forget_certificate()
    if not state.enrolled():
        if not (cfg.server and cfg.token and cfg.ca_cert):
            raise EnrollmentError("not enrolled yet: give --server, --ca-cert and --token")
        with open(cfg.ca_cert, "rb") as f:
            ca_pem = f.read()
        # Unreachable or busy (a thousand agents enrolling at once): try again with the
        # session's backoff; refused (a bad or used token): give up at once, with why.
        delay = backoff_policy(cfg.backoff_initial, 2.0, cfg.backoff_max)
        attempt = 0
        # any node of a cluster enrolls: the first, else the next one in turn
        servers = [cfg.server, *(u for u in cfg.servers if u != cfg.server)]
        while True:
            try:
                yield enroll(
                    reactor,
                    state,
                    servers[attempt % len(servers)],
                    ca_pem,
                    cfg.token,
                    cfg.bind_address,
                    proxy,
                    servers,
                )
                break
            except EnrollmentUnavailable as e:
                attempt += 1
                if attempt % len(servers):  # another node first, at once
                    log.warn("{why}; trying the next server", why=str(e))
                    continue
                wait = delay(attempt // len(servers) - 1)
                log.warn("{why}; trying again in {wait:.1f} s", why=str(e), wait=wait)
                yield deferLater(reactor, wait, lambda: None)
    return state.identity()
