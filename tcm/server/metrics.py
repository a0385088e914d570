"""The management server's /metrics and /status (loopback, --metrics-port)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.web.server import Site

from tcm.interfaces import IAgentAdmission, IAgentPresence, IJobs, INodeRegistry
from tcm.metrics import SnapshotCollector, counter, gauge, metrics_site
from tcm.server.dispatcher import Dispatcher

PREFIX = "tcm_server"


class ServerMetrics:
    """The server's metric families, from its registry, dispatcher and node links."""

    def __init__(
        self,
        name: str,
        presence: IAgentPresence,  # sessions
        admission: IAgentAdmission,  # enrolled agents
        nodes: INodeRegistry,  # links
        jobs: IJobs,  # active jobs
        dispatcher: Dispatcher,  # pushes
        handshakes: Any,  # the TLS HandshakeLogger (failures, admission gate)
        cluster: Any = None,  # ICluster of a node of a cluster (bus state, messages)
        intake: Any = None,  # the IntakeBudget of agents' large messages in transit
        writes: Any = None,  # the store's WriteQueue (what waits for a commit)
    ):
        self.name = name
        self.presence = presence
        self.admission = admission
        self.nodes = nodes
        self.jobs = jobs
        self.dispatcher = dispatcher
        self.handshakes = handshakes
        self.cluster = cluster
        self.intake = intake
        self.writes = writes
        self.registry = CollectorRegistry()
        self.registry.register(SnapshotCollector(self.families))  # type: ignore[arg-type]

    def families(self):
        sessions = self.presence.registry
        by_via = Counter(s.via for s in sessions.all())
        links = [n for n in self.nodes.links.values() if n.ready]
        yield gauge(f"{PREFIX}_sessions", "Agents' own sessions open now", len(sessions))
        yield gauge(
            f"{PREFIX}_sessions_by_route",
            "Agents' own sessions by how they reach this server (direct, gateway:NAME, ...)",
            labels={k: float(v) for k, v in by_via.items()},
            label="via",
        )
        yield gauge(
            f"{PREFIX}_task_sessions",
            "Agents' task sessions (via task servers)",
            len(self.presence.task_registry),
        )
        yield gauge(f"{PREFIX}_agents", "Enrolled agents", self.admission.count())
        clones = self.presence.clones
        yield gauge(
            f"{PREFIX}_cloned_agents",
            "Agent identities found cloned (refused with 4013 until re-keyed)",
            len(clones.cloned),
        )
        yield counter(
            f"{PREFIX}_sessions_superseded",
            "Agents' sessions superseded by a newer session of the same identity",
            clones.superseded_total,
        )
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
        yield counter(f"{PREFIX}_pushed", "Frames pushed to agents", self.dispatcher.pushed)
        failures = self.handshakes.failures if self.handshakes is not None else {}
        yield counter(
            f"{PREFIX}_tls_handshake_failures",
            "Failed TLS handshakes, by reason",
            labels={k: float(v) for k, v in failures.items()},
            label="reason",
        )
        completed = self.handshakes.completed if self.handshakes is not None else {}
        yield counter(
            f"{PREFIX}_tls_handshakes",
            "Completed TLS handshakes on the agents' port, by kind: full, ticket (a session "
            "of this process resumed), token (a resumption token, across restarts)",
            labels={k: float(v) for k, v in completed.items()},
            label="kind",
        )
        refused = self.handshakes.tokens_refused if self.handshakes is not None else {}
        yield counter(
            f"{PREFIX}_tls_tokens_refused",
            "Resumption tokens agents offered that this server could not take, by reason "
            "(each such handshake went on with certificates)",
            labels={k: float(v) for k, v in refused.items()},
            label="reason",
        )
        gate = getattr(self.handshakes, "gate", None)
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
                f"{PREFIX}_handshakes_stale",
                "Connections closed unserved after waiting too long (their clients gave up)",
                gate.stale,
            )
            yield counter(
                f"{PREFIX}_handshakes_expired",
                "Handshakes that stopped counting after the hold time (stalled peers)",
                gate.expired,
            )
        yield gauge(
            f"{PREFIX}_active_jobs", "Jobs with unfinished targets", self.jobs.active_count()
        )
        if self.intake is not None:  # tcm/server/intake.py
            yield gauge(
                f"{PREFIX}_intake_bytes",
                "Bytes of agents' large messages received or being received, not yet stored",
                self.intake.used,
            )
            yield gauge(
                f"{PREFIX}_intake_waiting",
                "Sessions held unread until large messages before theirs are stored",
                self.intake.waiting,
            )
            yield counter(
                f"{PREFIX}_intake_waits", "Large messages that had to wait", self.intake.waits
            )
        if self.writes is not None:
            yield gauge(
                f"{PREFIX}_store_queued_bytes",
                "Bytes of results and inventories waiting for a commit, about",
                self.writes.queued_bytes,
            )
        if self.cluster is not None:
            yield gauge(
                f"{PREFIX}_cluster_bus_up",
                "1 while this node's bus (Redis) is connected, 0 while it is down",
                1 if self.cluster.status()["bus"] == "up" else 0,
            )
            up = [n for n in getattr(self.cluster, "last_nodes", []) if n["state"] == "up"]
            yield gauge(f"{PREFIX}_cluster_nodes_up", "Nodes of the cluster up", len(up))
            yield gauge(
                f"{PREFIX}_cluster_sessions",
                "Agents' own sessions on each node up (from the nodes' heartbeats)",
                labels={n["node"]: float(n["sessions"]["core"]) for n in up},
                label="node",
            )
            yield gauge(
                f"{PREFIX}_cluster_sessions_total",
                "Agents' own sessions on all nodes up (from the nodes' heartbeats)",
                sum(n["sessions"]["core"] for n in up),
            )
            for key, text in (
                ("jobs_sent", "Job messages sent to other nodes"),
                ("jobs_received", "Job messages received from other nodes"),
                ("changes_received", "Changes received from other nodes"),
            ):
                yield counter(f"{PREFIX}_cluster_{key}", text, self.cluster.counts[key])

    def status(self) -> dict[str, Any]:
        links = sorted(self.nodes.links.values(), key=lambda n: n.key)
        return {
            "summary": {
                "server": self.name,
                "sessions": len(self.presence.registry),
                "task sessions": len(self.presence.task_registry),
                "agents": self.admission.count(),
                "active jobs": self.jobs.active_count(),
                "pushed": self.dispatcher.pushed,
                **(
                    {
                        "node": self.name,
                        "bus": self.cluster.status()["bus"],
                        "cluster sessions": sum(
                            n["sessions"]["core"]
                            for n in getattr(self.cluster, "last_nodes", [])
                            if n["state"] == "up"
                        ),
                    }
                    if self.cluster is not None
                    else {}
                ),
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


def server_metrics_site(metrics: ServerMetrics) -> Site:
    return metrics_site(metrics.registry, f"tcm server {metrics.name}", metrics.status)
