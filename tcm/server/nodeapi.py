"""/link/v1: node enrollment (a task server or gateway gets its certificate), renewal, and
the link.

Registering a node is an admin's step (`tcm taskservers enroll NAME`, POST
/api/v1/taskservers) that returns a one-time token; the node sends it with a CSR here on its
first start and gets a certificate whose subject is `node:NAME`, valid for its own TLS
server names too (agents connect to it and check its name like the server's). Before that
certificate expires the node sends a CSR for a new key to /link/v1/renew over TLS with the
certificate in force: the same name and server names, no token.
"""

from __future__ import annotations

import re

from twisted.internet.defer import inlineCallbacks

from tcm.interfaces import INodeRegistry
from tcm.protocol.link import NODE_PREFIX
from tcm.protocol.names import NODE_NAME
from tcm.server.errors import Forbidden, Invalid
from tcm.server.web import JsonRouter, Reply, json_object
from tcm.tls import pki

HOSTNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")


class NodeAPI(JsonRouter):
    """POST /link/v1/enroll, POST /link/v1/renew."""

    def __init__(self, nodes: INodeRegistry):
        super().__init__("/link/v1")
        self.nodes = nodes
        self.route("POST", "/enroll", self.enroll)
        self.route("POST", "/renew", self.renew)

    def authorize(self, request, handler) -> None:
        """Enrollment: the one-time token in the body is the credential. Renewal: the
        node's client certificate (verified against the CA by TLS)."""
        if handler != self.renew:
            return
        cert = pki.peer_certificate(request.channel.transport)
        try:
            subject = pki.common_name(cert) if cert is not None else ""
        except ValueError:  # no common name: no node's
            subject = ""
        if not subject.startswith(NODE_PREFIX):
            raise Forbidden("a node's client certificate is required to renew it")
        request.node_certificate = cert
        request.node_name = subject[len(NODE_PREFIX) :]

    @inlineCallbacks
    def enroll(self, request):
        body = json_object(request)
        name, token, csr = body.get("name"), body.get("token"), body.get("csr")
        if not (isinstance(name, str) and isinstance(token, str) and isinstance(csr, str)):
            raise Invalid(None, "node enrollment needs 'name', 'token' and 'csr' (PEM) strings")
        if not NODE_NAME.match(name):
            raise Invalid("name", f"bad node name {name!r}")
        hostnames = body.get("hostnames", [])
        if not isinstance(hostnames, list) or not all(
            isinstance(h, str) and HOSTNAME.match(h) for h in hostnames
        ):
            raise Invalid("hostnames", "'hostnames' must be a list of DNS names or addresses")
        reply = yield self.nodes.enroll(name, token, csr, hostnames)
        return Reply(reply, status=201)

    @inlineCallbacks
    def renew(self, request):
        """A new certificate for the calling node's new key: same name, no token."""
        csr = json_object(request).get("csr")
        if not isinstance(csr, str):
            raise Invalid("csr", "renew needs 'csr' (PEM) string")
        reply = yield self.nodes.renew(request.node_name, request.node_certificate, csr)
        return Reply(reply)
