"""twistd tcm: the management server, a task server and (optionally) an internet gateway in one
process, one reactor.

The same options as `twistd tcm-server`; the embedded defaults (SQLite in the state directory,
a self-made CA and certificates) make it one command to run. The task server's agent endpoint
is served on the same port (`/task/v1/ws`) and it links to the server over loopback like any
task server, so the path of a task is the same as with separate processes. With
`--gateway-port` (or `--gateway-listen`) an internet gateway listens on its own port and links
to the server over loopback too: agents reach it as they reach any gateway.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.python import usage

from tcm.gateway.service import GatewayConfig, GatewayService
from tcm.server.service import make_server_service
from tcm.server.tap import Options as ServerOptions
from tcm.server.tap import config_from
from tcm.taskserver.service import EmbeddedTaskServer
from tcm.tls.endpoints import ListenAddresses, TLSServerEndpoint, listen_addresses, parse
from tcm.tls.resumption import ResumptionKeys

GATEWAY_PORT = 8445  # the default of twistd tcm-gateway


class Options(ServerOptions):
    synopsis = (
        "--state-dir DIR [--port P] [--interface ADDR] [--listen ENDPOINT ...] "
        "[--hostname NAME ...] [--gateway-port G]"
    )
    longdesc = (
        "tcm all-in-one: management server (admin API, agents, jobs) and task server in one "
        "process, and with --gateway-port an internet gateway too. First start creates the CA, "
        "certificates, admin token and SQLite store."
    )
    optParameters = [
        [
            "gateway-port",
            None,
            None,
            "Also run an internet gateway for agents on this TCP port (its own TLS port; "
            "agents enroll at https://HOST:G/upstream/SERVER-NAME).",
            int,
        ],
        [
            "gateway-interface",
            None,
            None,
            "Address the gateway listens on (default: --interface's).",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["gateway-listen"] = []

    def opt_gateway_listen(self, description):
        """An endpoint string the gateway listens on as well (repeatable; alone, instead of
        --gateway-port), with tcm's TLS: tcm:PORT:interface=ADDR, tcm:unix:PATH, ..."""
        self["gateway-listen"].append(description)

    def postOptions(self):
        super().postOptions()
        from twisted.internet import reactor

        addresses: ListenAddresses = self["addresses"]
        if not any(_tcp_address(reactor, d) for d in addresses.endpoints):
            # the embedded task server (and gateway) reach the server over loopback TCP
            raise usage.UsageError(
                "the all-in-one's task server links to the server over loopback: give --port "
                "or a tcm:PORT endpoint to --listen"
            )
        self["gateway-addresses"] = None
        if (
            self["gateway-port"] is not None
            or self["gateway-interface"] is not None
            or self["gateway-listen"]
        ):
            try:
                self["gateway-addresses"] = listen_addresses(
                    reactor,
                    self["gateway-listen"],
                    self["gateway-port"],
                    self["gateway-interface"],
                    GATEWAY_PORT,
                    default_interface=addresses.interface,
                    plain=False,
                    option="--gateway-listen",
                )
            except ValueError as e:
                raise usage.UsageError(str(e)) from None


def _tcp_address(reactor: Any, description: str) -> bool:
    endpoint = parse(reactor, description)
    return isinstance(endpoint, TLSServerEndpoint) and endpoint.address is not None


class EmbeddedGateway(GatewayService):
    """The gateway of the all-in-one: a gateway like any (its own port, the server's agents
    routed over one link), but its identity, node `local-gateway`, is issued straight by the
    server's CA and registered in its store (no token), as the embedded task server's is. Its
    one upstream is the server over loopback, under the server's name."""

    NAME = "local-gateway"
    settles_heap = False  # in the server's process, whose HeapSettler settles it all

    def __init__(self, server: Any, addresses: ListenAddresses):
        cfg = server.config
        host = cfg.interface if cfg.interface not in ("0.0.0.0", "::", "") else "127.0.0.1"
        url = f"https://{f'[{host}]' if ':' in host else host}:{cfg.port}"
        super().__init__(
            GatewayConfig(
                state_dir=os.path.join(cfg.state_dir, "gateway"),
                upstreams=[(server.name, url)],
                port=addresses.port,
                interface=addresses.interface,
                listen=addresses.endpoints,
                hostnames=list(cfg.hostnames),
                keepalive=cfg.keepalive,
                drain_grace=2.0,  # the whole process is going: no other gateway to wait for
                max_message_size=cfg.max_message_size,
            ),
            server.reactor,
        )
        self.server = server  # the EmbeddingServer of tcm/server/service.py

    def resumption_keys(self) -> ResumptionKeys:
        """The server's own: one process, one secret (an agent that moves between the
        server's port and this one on the same host offers its token to both)."""
        return self.server.resumption or super().resumption_keys()

    def issuer(self, name: str, url: str, identity: Any) -> Any:
        """Renewed by the server's own CA, in process, like it was issued."""
        return lambda csr: self.server.renew_node_certificate(self.NAME, identity.cert_pem, csr)

    @inlineCallbacks
    def _prepare(self):
        server, cfg = self.server, self.config
        upstream, url = cfg.upstreams[0]
        state = self.states[upstream]
        names = sorted({cfg.interface, *cfg.hostnames} - {"0.0.0.0", "::", ""})
        old = state.read("cert.pem")
        cert_pem = yield server.node_certificate(
            self.NAME,
            "gateway",
            state.key_pem(),
            old,
            server_names=[*names, "localhost", "127.0.0.1", "::1"],
        )
        if cert_pem != old:
            state.store_identity(self.NAME, "gateway", url, server.ca_pem, cert_pem)
            self._log.info(
                "gateway identity {name} issued by the server's CA for {names}",
                name=self.NAME,
                names=", ".join(names) or "loopback",
            )
        self.build()


def makeService(options: Options):
    config = config_from(options)
    top = make_server_service(config)
    EmbeddedTaskServer(top.embedding, max_clients=config.taskserver_max_clients).setServiceParent(
        top
    )
    if options["gateway-addresses"] is not None:
        EmbeddedGateway(top.embedding, options["gateway-addresses"]).setServiceParent(top)
    return top
