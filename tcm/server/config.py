"""The management server's settings from its command line (twistd options map onto these)."""

from __future__ import annotations

import os

import attrs

from tcm.server.nodes import DEFAULT_MAX_CLIENTS


@attrs.define
class ServerConfig:
    """Settings of one management server (twistd options map onto these)."""

    state_dir: str
    port: int = 8443
    interface: str = "127.0.0.1"
    # endpoint strings to listen on (tcm/tls/endpoints.py); empty: tcm's TLS on port/interface
    listen: list[str] = attrs.field(factory=list)
    # endpoint strings of the admin listener: the same site, outside the agents' handshake
    # admission gate, so that a flood on the agents' port does not hold admins back
    admin_listen: list[str] = attrs.field(factory=list)
    hostnames: list[str] = attrs.field(factory=list)
    database: str | None = None  # default: sqlite in state_dir
    cert: str | None = None  # admin-supplied server certificate (PEM) ...
    key: str | None = None  # ... and its key
    keepalive: float = 50.0  # agents ping this often; below common 60 s LB idle timeouts
    keepalive_timeout: float = 20.0
    poll_interval: float = 60.0
    long_poll: float = 30.0  # most seconds the server holds a poll; 0: plain polling only
    persistent_connections: bool = True
    require_approval: bool = False  # new agents wait for `tcm agents approve` (run-time setting)
    handshake_timeout: float = 30.0
    max_handshakes: int = 100  # TLS handshakes in progress at once (tcm/server/admission.py)
    max_message_size: int = 1024 * 1024
    # bytes of agents' large messages received and not yet handled, at once (intake.py)
    intake_budget: int = 64 * 1024 * 1024
    tls_groups: str | None = None  # key exchange groups (None: OpenSSL's default list)
    max_in_flight: int = 64
    max_output: int = 8 * 1024 * 1024  # bytes of output kept per job target (issue 16.1)
    inventory_history: int = 5  # earlier versions kept per agent and inventory class
    inventory_class_bytes: int = 8 * 1024 * 1024  # largest inventory class accepted
    result_bytes_per_job: int = 256 * 1024**2  # results + output kept per job (0: no cap)
    result_bytes_total: int = 8 * 1024**3  # results + output kept in all (0: no cap)
    # seconds the certificates of task servers and gateways live (--node-cert-lifetime)
    node_cert_lifetime: float = 365 * 86400.0
    agent_cert_lifetime: float = 365 * 86400.0  # seconds (--agent-cert-lifetime 2h, 90d)
    taskserver_policy: str = "fewest"  # or "capacity" (docs/operating.md)
    taskserver_max_clients: int = DEFAULT_MAX_CLIENTS
    taskserver_rebalance_rate: int = 50  # most agents moved per second when one returns
    name: str | None = None  # this server's name, in its agents' certificates (gateways)
    metrics_port: int | None = None  # /metrics and /status on loopback
    job_retention: float = 30 * 86400.0  # seconds jobs are kept (run-time setting job_retention)
    # a cluster of nodes (tcm/server/cluster): Redis URL, and the key file sealing the CA
    redis: str | None = None
    cluster_key: str | None = None
    # the wheels of agent install packages (tcm/installpackage.py WheelCache): built there per
    # tcm version, or put there prebuilt; default STATE_DIR/package-wheels
    package_wheels: str | None = None

    @property
    def clustered(self) -> bool:
        return self.redis is not None

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{os.path.join(self.state_dir, 'tcm.sqlite')}"
