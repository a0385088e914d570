"""/link/v1: node enrollment (a task server or gateway gets its certificate) and the link.

Registering a node is an admin's step (`tcm taskservers enroll NAME`, POST
/api/v1/taskservers) that returns a one-time token; the node sends it with a CSR here on its
first start and gets a certificate whose subject is `node:NAME`, valid for its own TLS
server names too (agents connect to it and check its name like the server's).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from twisted.internet.defer import inlineCallbacks

from tcm.protocol import link
from tcm.protocol.names import NODE_NAME
from tcm.server.web import ApiError, JsonRouter, Reply, json_object
from tcm.store import TokenRefused
from tcm.tls import pki

if TYPE_CHECKING:
    from tcm.server.service import ServerCore

HOSTNAME = re.compile(r"^[A-Za-z0-9_.:-]{1,253}$")


class NodeAPI(JsonRouter):
    """POST /link/v1/enroll."""

    def __init__(self, core: ServerCore):
        super().__init__("/link/v1")
        self.core = core
        self.route("POST", "/enroll", self.enroll)

    def authorize(self, request, handler) -> None:
        return  # the one-time token in the body is the credential

    @inlineCallbacks
    def enroll(self, request):
        body = json_object(request)
        name, token, csr = body.get("name"), body.get("token"), body.get("csr")
        if not all(isinstance(v, str) for v in (name, token, csr)):
            raise ApiError(400, "node enrollment needs 'name', 'token' and 'csr' (PEM) strings")
        if not NODE_NAME.match(name):
            raise ApiError(400, f"bad node name {name!r}")
        hostnames = body.get("hostnames", [])
        if not isinstance(hostnames, list) or not all(
            isinstance(h, str) and HOSTNAME.match(h) for h in hostnames
        ):
            raise ApiError(400, "'hostnames' must be a list of DNS names or addresses")
        try:
            cert_pem = self.core.ca.sign_csr(
                csr.encode(),
                common_name=link.NODE_PREFIX + name,
                days=self.core.config.cert_days,
                client=True,
                server_names=[*hostnames, "localhost", "127.0.0.1", "::1"],
            )
        except ValueError as e:
            raise ApiError(400, f"bad certificate request: {e}") from None
        fingerprint = pki.fingerprint(pki.load_certificate(cert_pem))
        try:
            role = yield self.core.db.access.enroll_node(
                name, token, fingerprint, self.core.clock.seconds()
            )
        except TokenRefused as e:
            self._log.warn("node enrollment refused for {name}: {why}", name=name, why=str(e))
            raise ApiError(403, str(e)) from None
        yield self.core.reload_nodes()
        self._log.info("node {name} ({role}) enrolled", name=name, role=role)
        return Reply(
            {
                "name": name,
                "role": role,
                "certificate": cert_pem.decode(),
                "ca": self.core.ca.cert_pem.decode(),
            },
            status=201,
        )
