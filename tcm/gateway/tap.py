"""twistd tcm-gateway: options and makeService."""

from __future__ import annotations

from twisted.python import usage

from tcm.gateway.service import GatewayConfig, make_gateway_service
from tcm.protocol.names import NODE_NAME
from tcm.tls.endpoints import listen_addresses
from tcm.tls.server import TLS_GROUPS_OPTION


class Options(usage.Options):
    synopsis = (
        "--state-dir DIR --upstream NAME=URL [--upstream NAME=URL ...] [--port P] "
        "[--listen ENDPOINT ...] [--ca-cert ca.pem --upstream-token NAME=TOKEN ...]"
    )
    longdesc = (
        "The tcm internet gateway: terminates agents' TLS (client certificates from the tcm "
        "CA), routes each agent to the server named in its certificate, and carries its "
        "sessions and HTTPS calls over one mutual-TLS link per upstream server. Register it "
        "on each server with `tcm gateways enroll NAME`; the first start enrolls with those "
        "tokens. Upstreams without a token are task servers of those servers: agents' task "
        "sessions go to them through this gateway. SIGTERM drains: agents are told to "
        "reconnect elsewhere (4006)."
    )
    optParameters = [
        ["state-dir", "d", None, "Directory for the gateway's keys and certificates."],
        ["port", "p", None, "TCP port for the agents (WSS and HTTPS; default 8445).", int],
        ["interface", "i", None, "Address to listen on (default 127.0.0.1)."],
        ["ca-cert", None, None, "The tcm CA certificate (a server's ca.pem), to enroll."],
        ["cert", None, None, "Certificate (PEM) for the agents' side (default: the node's)."],
        ["key", None, None, "Private key of --cert (PEM)."],
        ["max-clients", None, 19000, "Most agent sessions one worker process holds.", int],
        ["keepalive", None, 50.0, "Seconds between the agents' pings (as the servers').", float],
        [
            "renew-at",
            None,
            2 / 3,
            "Renew the node certificate when this part of its life has passed (0 to 1).",
            float,
        ],
        ["drain-grace", None, 5.0, "Seconds between telling agents to go and stopping.", float],
        ["metrics-port", None, None, "Loopback port for /metrics and /status (+ worker).", int],
        ["workers", None, 1, "Processes sharing the port (SO_REUSEPORT).", int],
        TLS_GROUPS_OPTION,
        ["worker-index", None, None, "(internal) this worker's number.", int],
    ]

    def __init__(self):
        super().__init__()
        self["upstreams"] = []
        self["tokens"] = {}
        self["upstream_servers"] = {}
        self["upstream_addresses"] = {}
        self["hostnames"] = []
        self["listen"] = []

    def opt_upstream(self, value):
        """NAME=https://HOST:PORT, a management server this gateway serves, or one of its
        task servers (an upstream without enrollment token or identity; repeatable). A
        cluster's nodes: NAME=https://N1:PORT,https://N2:PORT (the gateway links to each,
        and to every node the cluster names later)."""
        name, sep, urls = value.partition("=")
        addresses = [u.strip().rstrip("/") for u in urls.split(",")] if sep else []
        if (
            not sep
            or not NODE_NAME.match(name)
            or not addresses
            or not all(u.startswith("https://") and len(u) > 8 for u in addresses)
        ):
            raise usage.UsageError(
                f"--upstream wants NAME=https://HOST:PORT[,https://HOST2:PORT...], not {value!r}"
            )
        if any(n == name for n, _ in self["upstreams"]):
            raise usage.UsageError(f"--upstream {name} given twice")
        if len(set(addresses)) != len(addresses):
            raise usage.UsageError(f"--upstream {name}: an address given twice")
        self["upstreams"].append((name, addresses[0]))
        self["upstream_addresses"][name] = addresses

    def opt_upstream_server(self, value):
        """TS=NAME: task server upstream TS belongs to management server upstream NAME (its
        link uses the gateway's identity with NAME; default: the first management server)."""
        ts, sep, server = value.partition("=")
        if not sep or not ts or not server:
            raise usage.UsageError(f"--upstream-server wants TS=NAME, not {value!r}")
        self["upstream_servers"][ts] = server

    def opt_upstream_token(self, value):
        """NAME=TOKEN: the one-time token from `tcm gateways enroll` on that upstream."""
        name, sep, token = value.partition("=")
        if not sep or not token:
            raise usage.UsageError(f"--upstream-token wants NAME=TOKEN, not {value!r}")
        self["tokens"][name] = token

    def opt_hostname(self, name):
        """A DNS name or address agents use to reach this gateway (repeatable)."""
        self["hostnames"].append(name)

    def opt_listen(self, description):
        """An endpoint string to listen on as well (repeatable; alone, instead of --port),
        with tcm's TLS: tcm:PORT:interface=ADDR, tcm:unix:PATH, tcm:systemd:domain=INET:index=0
        (docs/operating.md, "Listen addresses")."""
        self["listen"].append(description)

    def postOptions(self):
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required")
        if not self["upstreams"]:
            raise usage.UsageError("at least one --upstream NAME=URL is required")
        names = {n for n, _ in self["upstreams"]}
        unknown = set(self["tokens"]) - names
        if unknown:
            raise usage.UsageError(f"--upstream-token for unknown upstream {sorted(unknown)}")
        unknown = (set(self["upstream_servers"]) | set(self["upstream_servers"].values())) - names
        if unknown:
            raise usage.UsageError(f"--upstream-server names unknown upstream {sorted(unknown)}")
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key go together")
        if self["max-clients"] < 1 or self["workers"] < 1:
            raise usage.UsageError("--max-clients and --workers must be at least 1")
        if not 0 < self["renew-at"] < 1:
            raise usage.UsageError("--renew-at must be between 0 and 1, e.g. 0.66")
        if self["listen"] and self["workers"] > 1:
            raise usage.UsageError("--workers share --port (SO_REUSEPORT): not with --listen")
        from twisted.internet import reactor

        try:
            self["addresses"] = listen_addresses(
                reactor, self["listen"], self["port"], self["interface"], 8445, plain=False
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options):
    return make_gateway_service(
        GatewayConfig(
            state_dir=options["state-dir"],
            upstreams=options["upstreams"],
            addresses=options["upstream_addresses"],
            tokens=options["tokens"],
            upstream_servers=options["upstream_servers"],
            port=options["addresses"].port,
            interface=options["addresses"].interface,
            listen=options["addresses"].endpoints,
            hostnames=options["hostnames"],
            ca_cert=options["ca-cert"],
            cert=options["cert"],
            key=options["key"],
            max_clients=options["max-clients"],
            keepalive=options["keepalive"],
            renew_fraction=options["renew-at"],
            drain_grace=options["drain-grace"],
            metrics_port=options["metrics-port"],
            workers=options["workers"],
            worker=options["worker-index"],
            tls_groups=options["tls-groups"],
        )
    )
