"""twistd tcm-server: options and makeService."""

from __future__ import annotations

from twisted.python import usage

from tcm.server.service import ServerConfig, make_server_service
from tcm.tls.endpoints import listen_addresses, parse
from tcm.tls.server import TLS_GROUPS_OPTION


class Options(usage.Options):
    synopsis = (
        "--state-dir DIR [--port P] [--interface ADDR] [--listen ENDPOINT ...] "
        "[--admin-listen ENDPOINT ...] [--hostname NAME ...]"
    )
    longdesc = (
        "The tcm management server: admin REST API and agent endpoint (HTTPS and WSS) on one "
        "TLS port. On first start it creates a CA, a server certificate and an admin API "
        "token (admin.token) in the state directory."
    )
    optFlags = [
        [
            "no-persistent",
            None,
            "Start with persistent connections switched off (agents use "
            "HTTPS polling); `tcm settings set` changes it at run time.",
        ],
        [
            "require-approval",
            None,
            "New agents wait for `tcm agents approve ID` before they are served "
            "(setting require_approval, changeable at run time).",
        ],
    ]
    optParameters = [
        ["state-dir", "d", None, "Directory for the CA, certificates, token and database."],
        ["port", "p", None, "TCP port for HTTPS and WSS (default 8443).", int],
        ["interface", "i", None, "Address to listen on (default 127.0.0.1)."],
        ["metrics-port", None, None, "Loopback port for /metrics and /status.", int],
        [
            "name",
            None,
            None,
            "This server's name, written in its agents' certificates so gateways route them "
            "here (default: made once and kept in the state directory).",
        ],
        [
            "database",
            None,
            None,
            "Database URL (default: SQLite in the state directory; PostgreSQL with "
            "postgresql+psycopg2://USER@HOST/DB and the [postgres] extra).",
        ],
        [
            "redis",
            None,
            None,
            "Redis URL (redis://HOST:PORT/DB) of a cluster: nodes on one PostgreSQL "
            "--database and one Redis are one management service (docs/operating.md, "
            '"A cluster of nodes").',
        ],
        [
            "node-name",
            None,
            None,
            "This node's name in its cluster (the same as --name; default: made once and kept "
            "in the state directory).",
        ],
        [
            "cluster-key",
            None,
            None,
            "Key file sealing the cluster's CA key in the database; every node is given the "
            "same file (made by the first node when missing; default: cluster.key in the "
            "state directory).",
        ],
        [
            "package-wheels",
            None,
            None,
            "Directory of the wheels of agent install packages (the console's download): built "
            "there per tcm version from this tcm's source tree, or put there prebuilt (the tcm "
            "wheel and the agent's dependencies; default: package-wheels in the state "
            "directory).",
        ],
        [
            "cert",
            None,
            None,
            "Server certificate (PEM, may include the chain) instead of a self-made one.",
        ],
        ["key", None, None, "Private key of --cert (PEM)."],
        [
            "keepalive",
            None,
            50.0,
            "Seconds between the agents' WebSocket pings (sent to "
            "agents in welcome); silent sessions are closed after "
            "2 x keepalive + 20 s.",
            float,
        ],
        ["poll-interval", None, 60.0, "Seconds between polls of agents in HTTP mode.", float],
        [
            "long-poll",
            None,
            30.0,
            "Most seconds a poll is held open waiting for work (0: plain polling).",
            float,
        ],
        ["handshake-timeout", None, 30.0, "Seconds an agent has to send hello.", float],
        [
            "job-retention",
            None,
            "30d",
            "How long jobs, their results and output are kept before the server purges them: "
            "seconds, or with s/m/h/d (default 30d; setting job_retention).",
        ],
        [
            "max-handshakes",
            None,
            100,
            "Most TLS handshakes in progress at once; later ones wait their turn (0: no limit).",
            int,
        ],
        ["max-message-size", None, 1024 * 1024, "Largest accepted message, bytes.", int],
        [
            "intake-budget",
            None,
            64 * 1024 * 1024,
            "Bytes of agents' large messages (16 KiB and more: results, inventories) received "
            "and not yet stored, at once; connections beyond it wait before they are read.",
            int,
        ],
        TLS_GROUPS_OPTION,
        ["max-in-flight", None, 64, "Most requests one session may have unanswered.", int],
        [
            "agent-cert-lifetime",
            None,
            "365d",
            "How long agents' certificates live: seconds, or a number with s, m, h or d "
            "(e.g. 2h, 90d). Agents renew theirs over their session when 2/3 of it passed.",
        ],
        [
            "node-cert-lifetime",
            None,
            "365d",
            "How long task servers' and gateways' certificates live (as --agent-cert-lifetime). "
            "They renew theirs over HTTPS when 2/3 of it passed (their --renew-at).",
        ],
        [
            "max-output",
            None,
            8 * 1024 * 1024,
            "Bytes of output kept per job and agent; more is dropped after a marker line.",
            int,
        ],
        [
            "inventory-history",
            None,
            5,
            "Earlier versions of each agent's inventory class kept besides the current one "
            "(0: none).",
            int,
        ],
        [
            "inventory-class-bytes",
            None,
            "8M",
            "Largest inventory class accepted (canonical JSON), bytes or with K/M/G; a larger "
            "one is refused, the rest of the collection kept.",
        ],
        [
            "result-bytes-per-job",
            None,
            "256M",
            "Bytes of results and output kept per job (bytes or with K/M/G; 0: no cap); past "
            "it the job's oldest output, then its oldest results, are purged.",
        ],
        [
            "result-bytes-total",
            None,
            "8G",
            "Bytes of results and output kept in all (bytes or with K/M/G; 0: no cap); past "
            "it the oldest finished jobs are purged first.",
        ],
        [
            "taskserver-policy",
            None,
            "fewest",
            "How agents are spread over task servers: fewest (agents) or capacity (free places).",
        ],
        [
            "taskserver-max-clients",
            None,
            5000,
            "Most agents assigned to one task server (unless registered with its own maximum).",
            int,
        ],
        [
            "taskserver-rebalance-rate",
            None,
            50,
            "Most agents moved per second toward a task server that returns or joins (0: none).",
            int,
        ],
    ]

    def __init__(self):
        super().__init__()
        self["hostnames"] = []
        self["listen"] = []
        self["admin-listen"] = []

    def opt_listen(self, description):
        """An endpoint string to listen on as well (repeatable; alone, instead of --port):
        tcm:8443:interface=ADDR, tcm:unix:PATH or tcm:systemd:domain=INET:index=0 for tcm's
        TLS; tcp:, unix: or systemd: without TLS, e.g. behind a TLS-terminating proxy
        (docs/operating.md, "Listen addresses")."""
        self["listen"].append(description)

    def opt_admin_listen(self, description):
        """An endpoint string for admins only (repeatable), e.g. tcm:9443:interface=127.0.0.1:
        the same API and TLS, outside the agents' handshake admission, so a handshake flood
        on the agents' port does not hold admin requests back; server.json names it for the
        CLI (docs/operating.md, "Admin listener")."""
        self["admin-listen"].append(description)

    def opt_hostname(self, name):
        """A DNS name or address agents use to reach this server (repeatable)."""
        self["hostnames"].append(name)

    def postOptions(self):
        if self["node-name"] is not None:
            if self["name"] is not None and self["name"] != self["node-name"]:
                raise usage.UsageError("--name and --node-name name the same: give one")
            self["name"] = self["node-name"]
        if self["redis"] is not None:
            database = self["database"] or ""
            if not database.startswith("postgresql"):
                raise usage.UsageError(
                    "--redis makes this server a node of a cluster, whose nodes share one "
                    "PostgreSQL database: give --database postgresql+psycopg2://USER@HOST/DB "
                    "too (SQLite serves one node only)"
                )
            if not self["redis"].startswith(("redis://", "rediss://", "unix://")):
                raise usage.UsageError(f"--redis wants redis://HOST:PORT/DB, not {self['redis']!r}")
        elif self["cluster-key"] is not None:
            raise usage.UsageError("--cluster-key is for a node of a cluster: give --redis too")
        if self["name"] is not None:
            from tcm.protocol.names import NODE_NAME

            if not NODE_NAME.match(self["name"]):
                raise usage.UsageError("--name: a-z, 0-9, '_', '.', '-' (at most 63)")
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required")
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key go together")
        try:
            self["agent-cert-lifetime"] = parse_duration(self["agent-cert-lifetime"])
        except ValueError as e:
            raise usage.UsageError(f"--agent-cert-lifetime: {e}") from None
        if self["agent-cert-lifetime"] < 120:
            raise usage.UsageError("--agent-cert-lifetime: at least 2 minutes")
        try:
            self["node-cert-lifetime"] = parse_duration(self["node-cert-lifetime"])
        except ValueError as e:
            raise usage.UsageError(f"--node-cert-lifetime: {e}") from None
        if self["node-cert-lifetime"] < 120:
            raise usage.UsageError("--node-cert-lifetime: at least 2 minutes")
        if self["taskserver-policy"] not in ("fewest", "capacity"):
            raise usage.UsageError("--taskserver-policy must be fewest or capacity")
        if self["taskserver-rebalance-rate"] < 0:
            raise usage.UsageError("--taskserver-rebalance-rate must be 0 or more")
        if self["max-output"] < 1:
            raise usage.UsageError("--max-output must be at least 1 byte")
        if self["taskserver-max-clients"] < 1:
            raise usage.UsageError("--taskserver-max-clients must be at least 1")
        self["job-retention"] = retention_seconds(self["job-retention"])
        if self["inventory-history"] < 0:
            raise usage.UsageError("--inventory-history must be 0 or more")
        for name, least in (
            ("inventory-class-bytes", 1),
            ("result-bytes-per-job", 0),
            ("result-bytes-total", 0),
        ):
            try:
                self[name] = parse_size(self[name])
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}") from None
            if self[name] < least:
                raise usage.UsageError(f"--{name} must be at least {least}")
        from twisted.internet import reactor

        try:
            self["addresses"] = listen_addresses(
                reactor, self["listen"], self["port"], self["interface"], 8443
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        for description in self["admin-listen"]:
            try:
                parse(reactor, description, "--admin-listen")
            except ValueError as e:
                raise usage.UsageError(str(e)) from None


def retention_seconds(text: str | float) -> float:
    """Seconds of `--job-retention` ('30d', '12h', '86400'); UsageError out of 1h..10 years."""
    from tcm.server.settings import JOB_RETENTION_RANGE, MAX_RETENTION, MIN_RETENTION

    try:
        seconds = parse_duration(text)
    except ValueError:
        raise usage.UsageError(
            f"--job-retention: not a duration: {str(text).strip()!r} (e.g. 30d, 12h, 86400)"
        ) from None
    if not MIN_RETENTION <= seconds <= MAX_RETENTION:
        raise usage.UsageError(f"--job-retention: {JOB_RETENTION_RANGE}")
    return seconds


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float) -> float:
    """Seconds from `90`, `90s`, `30m`, `2h` or `365d`; ValueError otherwise."""
    raw = str(text).strip().lower()
    unit = _UNITS.get(raw[-1:]) if raw else None
    number = raw[:-1] if unit is not None else raw
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 3600, 2h, 90d)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"not a positive duration: {text!r}")
    return value


_SIZES = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str | int) -> int:
    """Bytes from `1048576`, `512K`, `256M`, `8G` (binary units); ValueError otherwise."""
    raw = str(text).strip().lower().removesuffix("b")
    unit = _SIZES.get(raw[-1:]) if raw else None
    number = raw[:-1] if unit is not None else raw
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 1048576, 512K, 256M, 8G)") from None
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"not a size: {text!r}")
    return int(value)


def config_from(options: Options) -> ServerConfig:
    return ServerConfig(
        state_dir=options["state-dir"],
        port=options["addresses"].port,
        interface=options["addresses"].interface,
        listen=options["addresses"].endpoints,
        admin_listen=list(options["admin-listen"]),
        hostnames=options["hostnames"],
        database=options["database"],
        cert=options["cert"],
        key=options["key"],
        keepalive=options["keepalive"],
        poll_interval=options["poll-interval"],
        long_poll=options["long-poll"],
        persistent_connections=not options["no-persistent"],
        require_approval=bool(options["require-approval"]),  # a flag counts: 0 or 1
        handshake_timeout=options["handshake-timeout"],
        max_handshakes=options["max-handshakes"],
        max_message_size=options["max-message-size"],
        intake_budget=options["intake-budget"],
        max_in_flight=options["max-in-flight"],
        max_output=options["max-output"],
        inventory_history=options["inventory-history"],
        inventory_class_bytes=options["inventory-class-bytes"],
        result_bytes_per_job=options["result-bytes-per-job"],
        result_bytes_total=options["result-bytes-total"],
        taskserver_policy=options["taskserver-policy"],
        taskserver_max_clients=options["taskserver-max-clients"],
        taskserver_rebalance_rate=options["taskserver-rebalance-rate"],
        name=options["name"],
        metrics_port=options["metrics-port"],
        job_retention=options["job-retention"],
        agent_cert_lifetime=options["agent-cert-lifetime"],
        node_cert_lifetime=options["node-cert-lifetime"],
        tls_groups=options["tls-groups"],
        redis=options["redis"],
        cluster_key=options["cluster-key"],
        package_wheels=options["package-wheels"],
    )


def makeService(options: Options):
    return make_server_service(config_from(options))
