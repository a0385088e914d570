"""A relay node's identity: its key, its certificate from the tcm CA, and enrollment.

State directory:
    node.json   name, role, server URL (written at enrollment)
    key.pem     private key (0600), made here
    cert.pem    certificate `node:NAME`, for the link (client) and for agents (server)
    ca.pem      the tcm CA: verifies the server and the agents

The certificate renews over HTTPS with itself (`NodeRenewal`, POST /link/v1/renew) when a
part of its life has passed; the files are replaced as the agent's are (tcm/tls/renewal.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import treq
from twisted.application import service
from twisted.internet.abstract import isIPAddress
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint
from twisted.logger import Logger
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tcm.compat import wrap_client_tls
from tcm.process import stop_with_failure
from tcm.protocol import link
from tcm.statedir import StateDir
from tcm.tls import pki
from tcm.tls.identity import Identity
from tcm.tls.renewal import (
    DEFAULT_FRACTION,
    CertificateRenewal,
    FollowRenewals,
    RenewalFailed,
    promote_renewed,
    utc,
)


class NodeEnrollmentError(Exception):
    """The node could not enroll; the message says why."""


class NodeState(StateDir):
    """The node's files in its state directory."""

    META = "node.json"

    def enrolled(self) -> bool:
        return self.read("cert.pem") is not None and "name" in self.meta()

    def tls(self) -> tuple[bytes, bytes, bytes]:
        """(ca_pem, cert_pem, key_pem)."""
        promote_renewed(self.dir)  # a renewal interrupted between its renames
        ca, cert, key = self.read("ca.pem"), self.read("cert.pem"), self.read("key.pem")
        if ca is None or cert is None or key is None:
            raise NodeEnrollmentError(f"{self.dir} holds no node identity: enroll first")
        return ca, cert, key

    def store_identity(self, name: str, role: str, server: str, ca: bytes, cert: bytes) -> None:
        pki.write_public(self.path("ca.pem"), ca)
        pki.write_public(self.path("cert.pem"), cert)
        pki.write_public(
            self.path("node.json"),
            json.dumps({"name": name, "role": role, "server": server}, indent=1).encode(),
        )

    def identity(self) -> Identity:
        """The TLS identity of these files, for the link (client) and the agents (server)."""
        ca_pem, cert_pem, key_pem = self.tls()
        return Identity(ca_pem, cert_pem, key_pem)

    def key_pem(self) -> bytes:
        key = self.read("key.pem")
        if key is None:
            key = pki.key_to_pem(pki.generate_key())
            pki.write_private(self.path("key.pem"), key)
        return key


def client_endpoint(reactor: Any, url: str, tls_options: Any):
    """A TLS client endpoint to the host and port of `url`."""
    host, port = pki.split_url(url)
    if isIPAddress(host):
        inner: Any = TCP4ClientEndpoint(reactor, host, port, timeout=30)
    else:
        inner = HostnameEndpoint(reactor, host, port, timeout=30)
    return wrap_client_tls(tls_options, inner)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """HTTPS to the server: trusting `ca_pem`, presenting `identity` when given."""

    def __init__(self, reactor: Any, ca_pem: bytes, identity: Identity | None = None):
        self._reactor = reactor
        self._ca = ca_pem
        self._identity = identity

    def endpointForURI(self, uri):
        host = uri.host.decode()
        url = f"https://{host}:{uri.port}"
        if self._identity is not None:
            return client_endpoint(self._reactor, url, self._identity.tls_options(host))
        return client_endpoint(self._reactor, url, pki.client_tls_options(host, self._ca))


@inlineCallbacks
def enroll_any(
    reactor: Any,
    state: NodeState,
    servers: list[str],
    ca_pem: bytes,
    token: str,
    hostnames: list[str],
):
    """Enroll through the first of `servers` that answers (the nodes of a cluster share one
    store: any of them takes the token). The name."""
    log = Logger(namespace="tcm.relay.enroll")
    for i, server in enumerate(servers):
        try:
            name = yield enroll_node(reactor, state, server, ca_pem, token, hostnames)
            return name
        except NodeEnrollmentError as e:
            if i == len(servers) - 1 or not str(e).startswith("cannot reach"):
                raise
            log.warn("{why}; trying {server}", why=str(e), server=servers[i + 1])


@inlineCallbacks
def enroll_node(
    reactor: Any,
    state: NodeState,
    server: str,
    ca_pem: bytes,
    token: str,
    hostnames: list[str],
):
    """Send a CSR with the one-time token `NAME.SECRET`; keep the certificate. The name."""
    log = Logger(namespace="tcm.relay.enroll")
    name, sep, secret = token.partition(".")
    if not sep or not name or not secret:
        raise NodeEnrollmentError("a node token looks like NAME.SECRET (tcm taskservers enroll)")
    csr = pki.make_csr(pki.load_key(state.key_pem()), common_name=link.NODE_PREFIX + name)
    http = treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, _Endpoints(reactor, ca_pem)))
    url = server.rstrip("/") + link.ENROLL_PATH
    body = {"name": name, "token": secret, "csr": csr.decode(), "hostnames": hostnames}
    try:
        resp = yield http.post(url, json=body, timeout=30)
        payload = yield resp.json()
    except Exception as e:
        raise NodeEnrollmentError(
            f"cannot reach {server} to enroll: {pki.describe_tls_error(e)}"
        ) from None
    if resp.code != 201:
        raise NodeEnrollmentError(
            f"node enrollment refused by {server}: {payload.get('error', payload)} ({resp.code})"
        )
    state.store_identity(name, payload["role"], server, ca_pem, payload["certificate"].encode())
    log.info("enrolled with {server} as node {name}", server=server, name=name)
    return name


def https_issuer(
    reactor: Any, server: str, identity: Identity
) -> Callable[[bytes], Deferred[bytes]]:
    """A node's renewal call: POST /link/v1/renew to `server` with the CSR, over TLS with the
    certificate in force. Fires with the new certificate (PEM); RenewalFailed says why not."""
    http = treq.client.HTTPClient(
        Agent.usingEndpointFactory(reactor, _Endpoints(reactor, identity.ca_pem, identity))
    )
    url = server.rstrip("/") + link.RENEW_PATH

    @inlineCallbacks
    def issue(csr_pem: bytes):
        try:
            resp = yield http.post(url, json={"csr": csr_pem.decode()}, timeout=30)
            payload = yield resp.json()
        except Exception as e:
            raise RenewalFailed(f"cannot reach {server}: {pki.describe_tls_error(e)}") from None
        if resp.code != 200 or not isinstance(payload, dict):
            why = payload.get("error", payload) if isinstance(payload, dict) else payload
            raise RenewalFailed(f"refused by {server} ({resp.code}): {why}")
        return str(payload.get("certificate", "")).encode()

    return issue


def any_issuer(
    servers: Callable[[], list[str]],
    issuer_for: Callable[[str], Callable[[bytes], Deferred[bytes]]],
) -> Callable[[bytes], Deferred[bytes]]:
    """A renewal call to the first of `servers` (asked at each renewal: the nodes of a
    cluster, configured and learned) that answers: a node down does not keep the relay
    node's certificate from being renewed by another."""
    issuers: dict[str, Callable[[bytes], Deferred[bytes]]] = {}

    @inlineCallbacks
    def issue(csr_pem: bytes):
        urls = servers()
        for i, url in enumerate(urls):
            if url not in issuers:
                issuers[url] = issuer_for(url)
            try:
                cert = yield issuers[url](csr_pem)
                return cert
            except RenewalFailed as e:
                if i == len(urls) - 1 or not str(e).startswith("cannot reach"):
                    raise
        raise RenewalFailed("no server to renew with")

    return issue


class NodeRenewal(CertificateRenewal):
    """A relay node's certificate renewal: a CSR for a new key with the node's subject to
    `issue` (its server's /link/v1/renew, or an embedded node's own server)."""

    def __init__(
        self,
        reactor: Any,
        state: NodeState,
        identity: Identity,
        issue: Callable[[bytes], Deferred[bytes]],
        fraction: float = DEFAULT_FRACTION,
    ):
        super().__init__(reactor, state.dir, identity, fraction)
        self.name = state.meta().get("name", "")
        self.role = state.meta().get("role", "node")
        self.common_name = link.NODE_PREFIX + self.name
        self._issue_with = issue

    def _issue(self, csr_pem: bytes) -> Deferred[bytes]:
        return self._issue_with(csr_pem)

    def expired_message(self, not_after: float) -> str:
        command = "gateways" if self.role == "gateway" else "taskservers"
        return (
            f"node {self.name}'s certificate expired at {utc(not_after)} and cannot be renewed: "
            f"register it again (tcm {command} enroll {self.name}) and start it with the token"
        )


class Running(service.Service):
    """A renewal (or a follower of one) started and stopped with its node."""

    def __init__(self, thing: CertificateRenewal | FollowRenewals):
        self.thing = thing

    def startService(self) -> None:
        super().startService()
        self.thing.start()

    def stopService(self) -> None:
        super().stopService()
        self.thing.stop()


class NodeService(service.MultiService):
    """What a relay node's service (task server, gateway) does at start: prepare (enroll,
    build its children), then start the children; a failed start says why and ends the
    process with status 1.

    Its links: one per node of each upstream (`links`, `link_services`: upstream -> node
    address -> factory, service). An upstream that is a cluster of server nodes names its
    nodes over the link (`cluster`): the node links to each one that is up (`cluster_told`)."""

    _log = Logger()
    what = "node"
    relay: Any

    def __init__(self, reactor: Any = None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.links: dict[str, dict[str, Any]] = {}
        self.link_services: dict[str, dict[str, Any]] = {}

    def addresses_of(self, name: str) -> list[str]:
        """Every configured address of upstream `name` (one, or a cluster's nodes)."""
        raise NotImplementedError

    def add_link_to(self, name: str, url: str) -> None:
        """Link to upstream `name` at `url` (one node of it)."""
        raise NotImplementedError

    def node_addresses(self, name: str) -> list[str]:
        """Upstream `name`'s addresses: configured first, then those its cluster named."""
        configured = self.addresses_of(name)
        return configured + [u for u in self.links.get(name, {}) if u not in configured]

    def welcomed(self, name: str, url: str | None, server: str | None) -> None:
        """A link of upstream `name` at `url` was welcomed by server node `server`. When
        another address of the upstream leads to the same node (one node, two spellings of
        its address), the one learned from the cluster stops: two links of one relay node
        to one server node would replace each other there, again and again."""
        if url is None or server is None:
            return
        configured = set(self.addresses_of(name))
        factories = self.links.get(name, {})
        twins = [u for u, f in factories.items() if u != url and f.server_name == server]
        for twin in twins:
            drop = url if url not in configured else twin if twin not in configured else None
            if drop is None:
                self._log.error(
                    "upstream {name}: {a} and {b} both lead to node {server}: give one",
                    name=name,
                    a=twin,
                    b=url,
                    server=server,
                )
                continue
            self._log.info(
                "upstream {name}: {drop} leads to node {server}, linked already; not linking",
                name=name,
                drop=drop,
                server=server,
            )
            service = self.link_services.get(name, {}).pop(drop, None)
            factories.pop(drop, None)
            if service is not None:
                service.disownServiceParent()
            if drop == url:
                return

    def cluster_told(self, name: str, nodes: dict[str, dict[str, Any]]) -> None:
        """Upstream `name` is a cluster with these nodes: link to each node that is up and
        not linked yet; stop trying a node learned of this way that is down (and not
        linked) until the cluster says it is up again. Configured addresses are kept."""
        configured = set(self.addresses_of(name))
        services = self.link_services.setdefault(name, {})
        factories = self.links.setdefault(name, {})
        # nodes linked (or once welcomed) under another spelling of their address: a second
        # link of this node to one server node would supersede the first, and so on
        known = {f.server_name for f in factories.values() if f.server_name}
        for node, info in sorted(nodes.items()):
            url = str(info["url"]).rstrip("/")
            if info.get("state") == "up":
                if url not in services and node not in known and self.running:
                    self._log.info(
                        "upstream {name}: linking to cluster node {node} at {url}",
                        name=name,
                        node=node,
                        url=url,
                    )
                    self.add_link_to(name, url)
            elif url in services and url not in configured:
                factory = factories[url]
                if not any(
                    getattr(up, "factory", None) is factory for up in self.relay.links.all(name)
                ):
                    self._log.info(
                        "upstream {name}: cluster node {node} is down; not linking to {url} "
                        "until it is up",
                        name=name,
                        node=node,
                        url=url,
                    )
                    del factories[url]
                    services.pop(url).disownServiceParent()

    def privilegedStartService(self):
        # No port is bound before the node is enrolled and built (startService below).
        service.Service.privilegedStartService(self)

    def startService(self):
        service.Service.startService(self)
        d = maybeDeferred(self._prepare)
        d.addCallback(self._start_children)
        d.addErrback(self._fatal)

    def _prepare(self) -> Any:
        raise NotImplementedError

    def started(self) -> None:
        """Log what now runs (subclasses)."""

    def _start_children(self, _: Any) -> None:
        if not self.running:
            return
        self.started()
        for child in self:
            if not child.running:  # added while this service runs: already started
                child.startService()

    def _fatal(self, f: Any) -> None:
        if f.check(NodeEnrollmentError):
            self._log.error("{why}", why=f.getErrorMessage())
        else:
            self._log.failure("{what} failed to start", f, what=self.what)
        stop_with_failure(self.reactor)
