"""/link/v1: node enrollment (a task server or gateway gets its certificate) and the link.

Registering a node is an admin's step (`tcm taskservers enroll NAME`, POST
/api/v1/taskservers) that returns a one-time token; the node sends it with a CSR here on its
first start and gets a certificate whose subject is `node:NAME`, valid for its own TLS
server names too (agents connect to it and check its name like the server's).
"""

from __future__ import annotations

import re

from twisted.internet.defer import inlineCallbacks

from tcm.interfaces import INodeRegistry
from tcm.protocol.names import NODE_NAME
from tcm.server.errors import Invalid
from tcm.server.web import JsonRouter, Reply, json_object

HOSTNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")


class NodeAPI(JsonRouter):
    """POST /link/v1/enroll."""

    def __init__(self, nodes: INodeRegistry):
        super().__init__("/link/v1")
        self.nodes = nodes
        self.route("POST", "/enroll", self.enroll)

    def authorize(self, request, handler) -> None:
        return  # the one-time token in the body is the credential

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
