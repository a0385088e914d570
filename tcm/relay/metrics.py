"""Metric families of a relay node (gateway or task server), built at scrape time."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from twisted.web.server import Site

from tcm.metrics import SnapshotCollector, counter, gauge, metrics_site
from tcm.relay.relays import Relay
from tcm.tls.handshake import HandshakeLogger

FANOUT_BUCKETS = (1, 2, 5, 10, 50, 100, 500, 1000, 5000, 10000, 20000)


def fanout_histogram(prefix: str, registry: Any) -> Histogram:
    """Connections reached by each push (observed once per push, not per connection)."""
    return Histogram(
        f"{prefix}_push_fanout",
        "Agent connections one push from a server was fanned out to",
        buckets=FANOUT_BUCKETS,
        registry=registry,
    )


def relay_families(
    prefix: str,
    relay: Relay,
    handshakes: HandshakeLogger | None,
    https: dict[str, int] | None = None,
) -> Iterable[Any]:
    """The relay's families; `handshakes`: the agents' listener's TLS record (None: not
    listening yet)."""
    n = relay.counters
    tls_failures = handshakes.failures if handshakes is not None else {}
    yield gauge(f"{prefix}_sessions", "Agent sessions held now", len(relay.conns))
    yield gauge(
        f"{prefix}_upstream_sessions",
        "Agent sessions held now, by upstream",
        labels={k: float(v) for k, v in relay.sessions_per_upstream().items()},
        label="upstream",
    )
    yield gauge(
        f"{prefix}_upstream_up",
        "1 when the link to that upstream is up (welcomed), else 0",
        labels={u: 1.0 if relay.links.is_up(u) else 0.0 for u in relay.links.names},
        label="upstream",
    )
    yield gauge(
        f"{prefix}_upstream_nodes_up",
        "Node links up to each upstream (a cluster's nodes; 1 for a single server)",
        labels={u: float(len(relay.links.all(u))) for u in relay.links.names},
        label="upstream",
    )
    yield counter(f"{prefix}_handshakes", "Agent WebSocket upgrades accepted", n.accepted)
    yield counter(
        f"{prefix}_handshake_failures",
        "Agent connections refused, by reason (TLS failures as tls:REASON)",
        labels={
            **{k: float(v) for k, v in n.refused.items()},
            **{f"tls:{k}": float(v) for k, v in tls_failures.items()},
        },
        label="reason",
    )
    yield counter(
        f"{prefix}_tls_handshakes",
        "Completed TLS handshakes on the agents' port, by kind: full, ticket (a session "
        "of this process resumed), token (a resumption token, across restarts)",
        labels={k: float(v) for k, v in (handshakes.completed if handshakes else {}).items()},
        label="kind",
    )
    yield counter(
        f"{prefix}_tls_tokens_refused",
        "Resumption tokens agents offered that this node could not take, by reason (each "
        "such handshake went on with certificates)",
        labels={k: float(v) for k, v in (handshakes.tokens_refused if handshakes else {}).items()},
        label="reason",
    )
    yield counter(f"{prefix}_messages_in", "Messages from agents to servers", n.frames_in)
    yield counter(
        f"{prefix}_messages_out", "Messages to agents (each fanned-out copy)", n.frames_out
    )
    yield counter(f"{prefix}_bytes_in", "Payload bytes from agents to servers", n.bytes_in)
    yield counter(f"{prefix}_bytes_out", "Payload bytes to agents", n.bytes_out)
    yield counter(f"{prefix}_pushes", "Pushes from servers fanned out here", n.pushes)
    yield gauge(f"{prefix}_draining", "1 while draining", 1.0 if relay.draining else 0.0)
    downlinks = relay.gateway_links()
    if downlinks is not None:  # a task server: gateways carrying agents' task sessions
        yield gauge(
            f"{prefix}_gateway_sessions",
            "Agent task sessions carried by each linked gateway",
            labels={k: float(len(d.agents)) for k, d in downlinks.items()},
            label="gateway",
        )
    if https is not None:
        yield counter(
            f"{prefix}_https_requests",
            "Agent HTTPS calls relayed, and refused by status",
            labels={k: float(v) for k, v in https.items()},
            label="outcome",
        )


def relay_status(relay: Relay) -> dict[str, Any]:
    per = relay.sessions_per_upstream()
    n = relay.counters
    downlinks = relay.gateway_links()
    return {
        "summary": {
            "sessions": len(relay.conns),
            "accepted": n.accepted,
            "refused": sum(n.refused.values()),
            "pushes": n.pushes,
            "messages in / out": f"{n.frames_in} / {n.frames_out}",
            "bytes in / out": f"{n.bytes_in} / {n.bytes_out}",
            "draining": relay.draining,
        },
        "tables": {
            "Upstreams": [
                {
                    "upstream": u,
                    "link": "up" if relay.links.is_up(u) else "down",
                    "sessions": per.get(u, 0),
                }
                for u in relay.links.names
            ],
            # each node link of each upstream (a cluster's nodes, up or down)
            "Nodes": [
                {"upstream": u, **node} for u in relay.links.names for node in relay.node_links(u)
            ],
            **(
                {
                    "Gateways": [
                        {"gateway": k, "sessions": len(d.agents), "pushes": d.pushes}
                        for k, d in sorted(downlinks.items())
                    ]
                }
                if downlinks
                else {}
            ),
        },
    }


def relay_metrics_site(
    prefix: str, title: str, relay: Relay, handshakes: HandshakeLogger | None = None
) -> Site:
    """/metrics and /status of a relay node without more to tell (the task server)."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: relay_families(prefix, relay, handshakes)))  # type: ignore[arg-type]
    relay.counters.fanout = fanout_histogram(prefix, registry).observe
    return metrics_site(registry, title, lambda: relay_status(relay))
