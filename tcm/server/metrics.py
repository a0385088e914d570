"""The management server's /metrics and /status (loopback, --metrics-port)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from twisted.web.server import Site

from tcm.metrics import SnapshotCollector, counter, gauge, metrics_site

if TYPE_CHECKING:
    from tcm.server.service import ServerCore

PREFIX = "tcm_server"


class ServerMetrics:
    """The server's metric families, from its registry, dispatcher and node links."""

    def __init__(self, core: ServerCore):
        self.core = core
        self.registry = CollectorRegistry()
        self.registry.register(SnapshotCollector(self.families))  # type: ignore[arg-type]

    def families(self):
        core = self.core
        by_via = Counter(s.via for s in core.registry.all())
        links = [n for n in core.nodes.links.values() if n.ready]
        yield gauge(f"{PREFIX}_sessions", "Agents' own sessions open now", len(core.registry))
        yield gauge(
            f"{PREFIX}_sessions_by_route",
            "Agents' own sessions by how they reach this server (direct, gateway:NAME, ...)",
            labels={k: float(v) for k, v in by_via.items()},
            label="via",
        )
        yield gauge(
            f"{PREFIX}_task_sessions",
            "Agents' task sessions (via task servers)",
            len(core.task_registry),
        )
        yield gauge(f"{PREFIX}_agents", "Enrolled agents", len(core.directory))
        yield gauge(
            f"{PREFIX}_node_links",
            "Live links of relay nodes (task servers, gateway workers), by role",
            labels={k: float(v) for k, v in Counter(n.role or "node" for n in links).items()},
            label="role",
        )
        yield counter(
            f"{PREFIX}_link_messages_in",
            "Messages received on node links",
            sum(n.frames_in for n in links),
        )
        yield counter(
            f"{PREFIX}_link_messages_out",
            "Messages sent on node links",
            sum(n.frames_out for n in links),
        )
        yield counter(
            f"{PREFIX}_link_pushes",
            "Pushes sent once over a node link for several agents",
            sum(n.pushes for n in links),
        )
        yield counter(f"{PREFIX}_pushed", "Frames pushed to agents", core.dispatcher.pushed)
        failures = core.handshakes.failures if core.handshakes is not None else {}
        yield counter(
            f"{PREFIX}_tls_handshake_failures",
            "Failed TLS handshakes, by reason",
            labels={k: float(v) for k, v in failures.items()},
            label="reason",
        )
        gate = getattr(core.handshakes, "gate", None)
        if gate is not None:  # admission control (tcm/server/admission.py)
            yield gauge(
                f"{PREFIX}_handshakes_in_progress", "TLS handshakes running", gate.in_progress
            )
            yield gauge(
                f"{PREFIX}_handshakes_waiting", "Connections waiting their turn", gate.waiting
            )
            yield counter(
                f"{PREFIX}_handshakes_queued", "Connections that had to wait", gate.queued
            )
            yield counter(
                f"{PREFIX}_handshakes_expired",
                "Handshakes that stopped counting after the hold time (stalled peers)",
                gate.expired,
            )
        yield gauge(
            f"{PREFIX}_active_jobs", "Jobs with unfinished targets", len(core.jobs.book.jobs)
        )

    def status(self) -> dict[str, Any]:
        core = self.core
        links = sorted(core.nodes.links.values(), key=lambda n: n.key)
        return {
            "summary": {
                "server": core.name,
                "sessions": len(core.registry),
                "task sessions": len(core.task_registry),
                "agents": len(core.directory),
                "active jobs": len(core.jobs.book.jobs),
                "pushed": core.dispatcher.pushed,
            },
            "tables": {
                "Node links": [
                    {
                        "node": n.key,
                        "role": n.role,
                        "sessions": n.open_sessions(),
                        "messages in": n.frames_in,
                        "messages out": n.frames_out,
                        "pushes": n.pushes,
                    }
                    for n in links
                ]
            },
        }


def server_metrics_site(core: ServerCore) -> Site:
    metrics = ServerMetrics(core)
    return metrics_site(metrics.registry, f"tcm server {core.name}", metrics.status)
