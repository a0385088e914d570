"""twistd tcm-agent: options and makeService."""

from __future__ import annotations

from twisted.python import usage

from tcm.agent.config import AgentConfig
from tcm.agent.service import make_agent_service


class Options(usage.Options):
    synopsis = "--state-dir DIR [--server URL --ca-cert FILE --token TOKEN]"
    longdesc = (
        "The tcm endpoint agent. The first start enrolls with --server using --token and "
        "--ca-cert; later starts need only --state-dir."
    )
    optParameters = [
        ["state-dir", "d", None, "Directory for the agent's key, certificate and spool."],
        ["ca-cert", None, None, "CA certificate (PEM) of the server, for enrollment."],
        ["token", "t", None, "Enrollment token (needed once)."],
        [
            "proxy",
            None,
            None,
            "HTTP proxy for WSS and HTTPS: http://[user:pass@]host:port "
            "(CONNECT; TLS stays end to end).",
        ],
        [
            "keepalive",
            None,
            None,
            "Seconds between WebSocket pings (default: as the server "
            "says in its welcome; 50 until then).",
            float,
        ],
        ["keepalive-timeout", None, 20.0, "Seconds to wait for a pong.", float],
        ["backoff-max", None, 60.0, "Longest wait between reconnect attempts.", float],
        ["backoff-initial", None, 1.0, "First wait between reconnect attempts.", float],
        [
            "renew-at",
            None,
            2 / 3,
            "Renew the certificate when this part of its life has passed (0 to 1).",
            float,
        ],
    ]
    optFlags = [
        ["no-long-poll", None, "In HTTP mode, poll at the interval only (no long-polls)."],
        [
            "no-fsync",
            None,
            "Do not fsync the spool (survives a crash of the agent, not of the machine).",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["gateways"] = []
        self["server"] = None
        self["servers"] = []

    def opt_server(self, url):
        """Server URL, https://HOST:PORT (kept after enrollment). Repeatable: the nodes of a
        cluster, the first preferred, the others tried in turn when it fails (and to enroll)."""
        if not url.startswith("https://"):
            raise usage.UsageError(f"--server wants https://HOST:PORT, not {url!r}")
        if self["server"] is None:
            self["server"] = url
        elif url not in (self["server"], *self["servers"]):
            self["servers"].append(url)

    opt_s = opt_server

    def opt_gateway(self, url):
        """A gateway URL (https://HOST:PORT), tried in turn when the server is not reachable
        (repeatable; the server itself is preferred)."""
        if not url.startswith("https://"):
            raise usage.UsageError(f"--gateway wants https://HOST:PORT, not {url!r}")
        self["gateways"].append(url)

    def postOptions(self):
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required")
        if self["ca-cert"]:
            try:
                with open(self["ca-cert"], "rb"):
                    pass
            except OSError as e:
                raise usage.UsageError(
                    f"--ca-cert {self['ca-cert']}: cannot read it: {e.strerror or e}"
                ) from None
        if not 0 < self["renew-at"] < 1:
            raise usage.UsageError("--renew-at must be between 0 and 1, e.g. 0.66")
        if self["proxy"]:
            from tcm.agent.proxy import HTTPProxy

            try:
                HTTPProxy.parse(self["proxy"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None


def makeService(options: Options):
    return make_agent_service(
        AgentConfig(
            state_dir=options["state-dir"],
            server=options["server"],
            servers=options["servers"],
            ca_cert=options["ca-cert"],
            token=options["token"],
            keepalive=options["keepalive"],
            keepalive_timeout=options["keepalive-timeout"],
            backoff_initial=options["backoff-initial"],
            backoff_max=options["backoff-max"],
            spool_fsync=not options["no-fsync"],
            proxy=options["proxy"],
            long_poll=not options["no-long-poll"],
            gateways=options["gateways"],
            renew_fraction=options["renew-at"],
        )
    )
