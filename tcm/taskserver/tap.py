"""twistd tcm-taskserver: options and makeService."""

from __future__ import annotations

from twisted.python import usage

from tcm.taskserver.service import TaskServerConfig, make_taskserver_service
from tcm.tls.endpoints import listen_addresses
from tcm.tls.server import TLS_GROUPS_OPTION


class Options(usage.Options):
    synopsis = (
        "--server URL --state-dir DIR [--port P] [--listen ENDPOINT ...] "
        "[--ca-cert ca.pem --token NAME.SECRET]"
    )
    longdesc = (
        "A tcm task server: holds agents' task-client sessions (WSS, mutual TLS) and relays "
        "tasks and their results over one link to the management server. Register it first "
        "with `tcm taskservers enroll NAME`; the first start enrolls with that token."
    )
    optParameters = [
        ["state-dir", "d", None, "Directory for the node's key, certificate and CA."],
        ["port", "p", None, "TCP port for the agents' task sessions (WSS; default 8444).", int],
        ["interface", "i", None, "Address to listen on (default 127.0.0.1)."],
        ["ca-cert", None, None, "The tcm CA certificate (the server's ca.pem), to enroll."],
        ["token", None, None, "One-time enrollment token NAME.SECRET (tcm taskservers enroll)."],
        ["max-clients", None, 5000, "Most agent sessions this task server holds.", int],
        ["metrics-port", None, None, "Loopback port for /metrics and /status.", int],
        ["keepalive", None, 50.0, "Seconds between the agents' pings (as the server's).", float],
        [
            "renew-at",
            None,
            2 / 3,
            "Renew the node certificate when this part of its life has passed (0 to 1).",
            float,
        ],
        TLS_GROUPS_OPTION,
    ]

    def __init__(self):
        super().__init__()
        self["hostnames"] = []
        self["listen"] = []
        self["server"] = None
        self["servers"] = []

    def opt_server(self, url):
        """The management server's URL, https://HOST:PORT. Repeatable: the nodes of its
        cluster; the task server links to every one (and to nodes the cluster names later),
        and enrolls through the first that answers."""
        if not url.startswith("https://"):
            raise usage.UsageError(f"--server wants https://HOST:PORT, not {url!r}")
        url = url.rstrip("/")
        if self["server"] is None:
            self["server"] = url
        elif url not in (self["server"], *self["servers"]):
            self["servers"].append(url)

    opt_s = opt_server

    def opt_listen(self, description):
        """An endpoint string to listen on as well (repeatable; alone, instead of --port),
        with tcm's TLS: tcm:PORT:interface=ADDR, tcm:unix:PATH, tcm:systemd:domain=INET:index=0
        (docs/operating.md, "Listen addresses")."""
        self["listen"].append(description)

    def opt_hostname(self, name):
        """A DNS name or address agents use to reach this task server (repeatable)."""
        self["hostnames"].append(name)

    def postOptions(self):
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required")
        if self["max-clients"] < 1:
            raise usage.UsageError("--max-clients must be at least 1")
        if not 0 < self["renew-at"] < 1:
            raise usage.UsageError("--renew-at must be between 0 and 1, e.g. 0.66")
        from twisted.internet import reactor

        try:
            self["addresses"] = listen_addresses(
                reactor, self["listen"], self["port"], self["interface"], 8444, plain=False
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options):
    return make_taskserver_service(
        TaskServerConfig(
            state_dir=options["state-dir"],
            server=options["server"],
            servers=options["servers"],
            port=options["addresses"].port,
            interface=options["addresses"].interface,
            listen=options["addresses"].endpoints,
            hostnames=options["hostnames"],
            ca_cert=options["ca-cert"],
            token=options["token"],
            max_clients=options["max-clients"],
            keepalive=options["keepalive"],
            renew_fraction=options["renew-at"],
            metrics_port=options["metrics-port"],
            tls_groups=options["tls-groups"],
        )
    )
