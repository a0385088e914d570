"""The agent's settings: the command line's, changed at run time by a connection profile
(tcm/agent/connection.py) and by an `agent.settings` policy (tcm/agent/host.py)."""

from __future__ import annotations

import attrs

DEFAULT_KEEPALIVE = 50.0


@attrs.define
class AgentConfig:
    """One agent's settings (a profile or a policy changes some of them at run time)."""

    state_dir: str
    server: str | None = None
    ca_cert: str | None = None
    token: str | None = None
    keepalive: float | None = None  # None: as the server's welcome says (50 s until then)
    keepalive_timeout: float = 20.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_message_size: int = 1024 * 1024
    spool_fsync: bool = True
    flush_interval: float = 30.0
    proxy: str | None = None  # http://[user:pass@]host:port, for WSS and HTTPS alike
    long_poll: bool = True  # use long-polls in HTTP mode where the server allows them
    control_socket: bool = True
    bind_address: str | None = None  # source address of connections (swarm)
    fallback_delay: float = 60.0  # seconds (jittered) before polling after a session loss
    renew_fraction: float = 2 / 3  # renew the certificate when this part of its life passed
    # more nodes of the server's cluster (a second --server, ...): tried in turn after it
    servers: list[str] = attrs.field(factory=list)
    gateways: list[str] = attrs.field(factory=list)  # tried in turn when the server is not
