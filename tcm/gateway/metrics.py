"""The gateway's /metrics and /status (loopback, --metrics-port)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from twisted.web.server import Site

from tcm.metrics import SnapshotCollector, metrics_site
from tcm.relay.metrics import fanout_histogram, relay_families, relay_status

PREFIX = "tcm_gateway"


class GatewayMetrics:
    """The gateway's metric families, from the relay's own counters at scrape time."""

    def __init__(self, gateway: Any):
        self.gateway = gateway
        self.registry = CollectorRegistry()
        self.registry.register(SnapshotCollector(self.families))  # type: ignore[arg-type]
        histogram = fanout_histogram(PREFIX, self.registry)
        gateway.relay.counters.fanout = histogram.observe

    def https(self) -> dict[str, int]:
        root = self.gateway.root
        if root is None:
            return {}
        out: dict[str, int] = {"relayed": 0}
        for fwd in [root.forward, *root.named.values()]:
            out["relayed"] += fwd.requests
            for k, v in fwd.failures.items():
                out[k] = out.get(k, 0) + v
        return out

    def families(self):
        gw = self.gateway
        return relay_families(PREFIX, gw.relay, gw.handshakes, self.https())

    def status(self) -> dict[str, Any]:
        gw = self.gateway
        relay = gw.relay
        per = relay.sessions_per_upstream()
        upstreams = []
        for name, url in gw.config.upstreams:
            factories = gw.links.get(name, {})
            servers = sorted({f.server_name for f in factories.values() if f.server_name})
            links = relay.node_links(name)
            upstreams.append(
                {
                    "upstream": name,
                    "url": url,
                    "server": ", ".join(servers) or "-",
                    "link": "up" if relay.links.is_up(name) else "down",
                    "nodes up": f"{len(relay.links.all(name))} / {max(len(links), 1)}",
                    "sessions": per.get(name, 0),
                    "revoked agents": relay.access.revoked_count(name),
                }
            )
        base = relay_status(relay)  # the relay's own figures, as a task server shows them
        return {
            "summary": {
                "worker": gw.config.worker or 0,
                **base["summary"],
                "uptime (s)": int(gw.reactor.seconds() - gw.started_at),
            },
            "tables": {**base["tables"], "Upstreams": upstreams},
        }


def metrics_site_for(metrics: GatewayMetrics) -> Site:
    return metrics_site(metrics.registry, "tcm gateway", metrics.status)
