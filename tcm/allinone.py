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

from cryptography import x509
from twisted.internet.defer import inlineCallbacks
from twisted.python import usage

from tcm import pki
from tcm.gateway.service import GatewayConfig, GatewayService
from tcm.protocol import link
from tcm.server.service import make_server_service
from tcm.server.tap import Options as ServerOptions
from tcm.server.tap import config_from
from tcm.taskserver.service import EmbeddedTaskServer
from tcm.tls.endpoints import ListenAddresses, TLSServerEndpoint, listen_addresses, parse

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

    def __init__(self, core: Any, addresses: ListenAddresses):
        cfg = core.config
        host = cfg.interface if cfg.interface not in ("0.0.0.0", "::", "") else "127.0.0.1"
        server = f"https://{f'[{host}]' if ':' in host else host}:{cfg.port}"
        super().__init__(
            GatewayConfig(
                state_dir=os.path.join(cfg.state_dir, "gateway"),
                upstreams=[(core.name, server)],
                port=addresses.port,
                interface=addresses.interface,
                listen=addresses.endpoints,
                hostnames=list(cfg.hostnames),
                keepalive=cfg.keepalive,
                drain_grace=2.0,  # the whole process is going: no other gateway to wait for
                max_message_size=cfg.max_message_size,
            ),
            core.reactor,
        )
        self.core = core

    @inlineCallbacks
    def _prepare(self):
        core, cfg = self.core, self.config
        upstream, server = cfg.upstreams[0]
        state = self.states[upstream]
        names = sorted({cfg.interface, *cfg.hostnames} - {"0.0.0.0", "::", ""})
        cert_pem = state.read("cert.pem")
        records = {r["name"]: r for r in (yield core.store.list_nodes())}
        record = records.get(self.NAME)
        fingerprint = pki.fingerprint(pki.load_certificate(cert_pem)) if cert_pem else None
        if (
            cert_pem is None
            or record is None
            or record.get("fingerprint") != fingerprint
            or not _names_in(cert_pem, names)
        ):
            csr = pki.make_csr(
                pki.load_key(state.key_pem()), common_name=link.NODE_PREFIX + self.NAME
            )
            cert_pem = core.ca.sign_csr(
                csr,
                link.NODE_PREFIX + self.NAME,
                days=core.config.cert_days,
                client=True,
                server_names=[*names, "localhost", "127.0.0.1", "::1"],
            )
            now = core.clock.seconds()
            secret = yield core.store.register_node(self.NAME, "gateway", None, 60.0, now)
            fingerprint = pki.fingerprint(pki.load_certificate(cert_pem))
            yield core.store.enroll_node(self.NAME, secret, fingerprint, now)
            state.store_identity(self.NAME, "gateway", server, core.ca.cert_pem, cert_pem)
            yield core.reload_nodes()
            self._log.info(
                "gateway identity {name} issued by the server's CA for {names}",
                name=self.NAME,
                names=", ".join(names) or "loopback",
            )
        self.build()


def _names_in(cert_pem: bytes, names: list[str]) -> bool:
    """Whether the certificate names every one of ``names`` (DNS or IP SANs)."""
    cert = pki.load_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    have |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return set(names) <= have


def makeService(options: Options):
    config = config_from(options)
    top = make_server_service(config)
    EmbeddedTaskServer(top.core, max_clients=config.taskserver_max_clients).setServiceParent(top)
    if options["gateway-addresses"] is not None:
        EmbeddedGateway(top.core, options["gateway-addresses"]).setServiceParent(top)
    return top
