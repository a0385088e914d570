"""The node registry: task servers and gateways, registered, enrolled and linked.

Registration (an admin's step) returns a one-time token; enrollment signs the node's CSR
against it; a link is a live connection of an enrolled node (tcm/server/links.py). The
records are the store's, kept in memory (`NodeDirectory`); task servers' agents are assigned
by `TaskServerAssignments`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from tcm.interfaces import ICertificates, INodeRegistry
from tcm.protocol import codes
from tcm.server.errors import Conflict, Forbidden, Invalid, NotFound
from tcm.server.nodes import Change, NodeDirectory, TaskServerAssignments
from tcm.store import TokenRefused
from tcm.tls import pki


@implementer(INodeRegistry)
class NodeRegistry:
    """Registered nodes and their live links (NodeLink objects, by key)."""

    _log = Logger()

    def __init__(
        self,
        access_store: Any,
        certificates: ICertificates,
        assignments: TaskServerAssignments,
        clock: Any,
        cert_days: float,
    ):
        self._store = access_store
        self._certificates = certificates
        self.assignments = assignments
        self.clock = clock
        self.cert_days = cert_days
        self.directory = NodeDirectory()
        # told when the records change here (a node of a cluster: the others reload them)
        self.on_changed: Any = None

    @property
    def links(self) -> dict[str, Any]:
        """Live links by key (a node's name, or "name/worker" for gateway workers)."""
        return self.directory.links

    @inlineCallbacks
    def reload(self):
        """Read the records again; tell task servers which gateways they may accept now."""
        self.directory.load((yield self._store.list_nodes()))
        self.assignments.registered = len(self.directory.task_servers())
        gateways = self.directory.gateway_fingerprints()
        previous = self.directory.gateway_fingerprints(previous=True)
        for node in list(self.links.values()):
            node.nodes(gateways, previous)

    def _changed(self) -> None:
        if self.on_changed is not None:
            self.on_changed()

    def refusal(self, name: str, fingerprint: str | None) -> str | None:
        """Why a link (or a forwarded certificate) from this node is refused, or None."""
        return self.directory.refusal(name, fingerprint)

    def gateway_fingerprints(self, previous: bool = False) -> dict[str, str]:
        return self.directory.gateway_fingerprints(previous)

    # -- registration and enrollment -----------------------------------------------------
    @inlineCallbacks
    def register(self, name: str, role: str, max_clients: int | None, ttl: float):
        """Register a node: fires with its one-time enrollment secret. Conflict if it is
        registered and enrolled already."""
        try:
            secret = yield self._store.register_node(
                name, role, max_clients, ttl, self.clock.seconds()
            )
        except TokenRefused as e:
            raise Conflict(str(e)) from None
        yield self.reload()
        self._changed()
        return secret

    @inlineCallbacks
    def enroll(self, name: str, token: str, csr: str, hostnames: list[str]):
        """Sign a node's CSR against its one-time token: fires with {"name", "role",
        "certificate", "ca"}."""
        try:
            cert_pem = self._certificates.sign_node(csr.encode(), name, self.cert_days, hostnames)
        except ValueError as e:
            raise Invalid("csr", f"bad certificate request: {e}") from None
        fingerprint = pki.fingerprint(pki.load_certificate(cert_pem))
        try:
            role = yield self._store.enroll_node(name, token, fingerprint, self.clock.seconds())
        except TokenRefused as e:
            self._log.warn("node enrollment refused for {name}: {why}", name=name, why=str(e))
            raise Forbidden(str(e)) from None
        yield self.reload()
        self._changed()
        self._log.info("node {name} ({role}) enrolled", name=name, role=role)
        return {
            "name": name,
            "role": role,
            "certificate": cert_pem.decode(),
            "ca": self._certificates.ca_pem.decode(),
        }

    @inlineCallbacks
    def renew(self, name: str, current: Any, csr: str):
        """A new certificate for an enrolled node's new key (its CSR), same name and server
        names, no token: the node proves who it is with `current`, its verified client
        certificate, which stays accepted until it expires. Fires with {"certificate", "ca"}."""
        fingerprint = pki.fingerprint(current)
        refusal = self.refusal(name, fingerprint)
        if refusal is not None:
            raise Forbidden(refusal)
        try:
            cert_pem = self._certificates.sign_node(
                csr.encode(), name, self.cert_days, pki.server_names(current)
            )
        except ValueError as e:
            raise Invalid("csr", f"bad certificate request: {e}") from None
        renewed = pki.fingerprint(pki.load_certificate(cert_pem))
        if not (yield self._store.renew_node(name, fingerprint, renewed)):
            raise Conflict(f"node {name!r} was removed or enrolled again meanwhile")
        yield self.reload()
        self._changed()
        cert = pki.load_certificate(cert_pem)
        self._log.info(
            "node {name} renewed its certificate (serial {serial:x}, until {until})",
            name=name,
            serial=cert.serial_number,
            until=cert.not_valid_after_utc.isoformat(),
        )
        return {"certificate": cert_pem.decode(), "ca": self._certificates.ca_pem.decode()}

    @inlineCallbacks
    def remove(self, name: str, role: str):
        """Remove a task server or gateway: its certificate is refused from now on (and a
        pending enrollment withdrawn), its live links are closed (4007); a task server's
        agents are assigned again as when its link is lost. Fires with whether it changed."""
        changed = yield self._store.remove_node(name, role)
        if changed is None:
            raise NotFound(f"no {role} {name}")
        yield self.reload()
        self._changed()
        for node in [n for n in self.links.values() if n.name == name]:
            node._close(codes.CLOSE_REVOKED, f"{role} {name} was removed by an admin")
        if changed and role == "taskserver":
            self.assignments.changes[name] = Change(self.clock.seconds(), "was removed")
        if changed:
            self._log.info("{role} {name} removed", role=role, name=name)
        return changed

    # -- links ---------------------------------------------------------------------------
    def link_up(self, node: Any) -> None:
        """A node linked (its hello): it supersedes an older link of the same key; a task
        server is available for assignments."""
        old = self.links.get(node.key)
        self.links[node.key] = node
        if old is not None and old is not node:
            old._close(codes.CLOSE_SUPERSEDED, "a newer link of this node replaced this one")
        self._store.node_reported(node.name, node.url or "")
        if node.role != "taskserver":
            return
        record = self.directory.records.get(node.name, {})
        limits = [m for m in (record.get("max_clients"), node.max_clients) if m]
        self.assignments.up(
            node.name, node.url or "", min(limits) if limits else None, self.clock.seconds()
        )

    def link_down(self, node: Any) -> list[str] | None:
        """A link was lost: None if a newer link superseded it, else the agents that lose
        their task server with it."""
        current: Any = self.links.get(node.key)
        if current is not node:
            return None
        del self.links[node.key]
        self._log.warn("{role} {name} link lost", role=node.role, name=node.name)
        if node.role != "taskserver":
            return []
        removed = self.directory.records.get(node.name, {}).get("revoked")
        reason = "was removed" if removed else "went down"
        return self.assignments.down(node.name, self.clock.seconds(), reason)

    def tell_pending(self, agent_ids: list[str], approved: list[str] | None = None) -> None:
        """Tell every gateway which agents await approval (or were approved)."""
        for node in list(self.links.values()):
            node.pending(agent_ids, approved=approved)

    def tell_revoked(self, agent_ids: list[str]) -> None:
        """Tell every gateway that these agents are revoked."""
        for node in list(self.links.values()):
            node.revoked(agent_ids)

    # -- views ---------------------------------------------------------------------------
    def task_server_views(self) -> dict[str, Any]:
        """Registered task servers with their state and client counts."""
        assignments = self.assignments
        out = []
        for name in sorted(self.directory.task_servers()):
            record = self.directory.records[name]
            node: Any = self.links.get(name)
            connected = node is not None and node.ready
            if record.get("revoked"):
                state = "revoked"
            elif record.get("fingerprint") is None:
                state = "awaiting enrollment"
            elif not connected:
                state = "down"
            elif assignments.full(name):
                state = "full"
            else:
                state = "up"
            change = assignments.change_of(name)
            if change is not None:
                since, reason = change.at, change.reason
            elif record.get("revoked"):
                since, reason = None, "removed"
            elif record.get("enrolled_at") is not None:
                since, reason = (
                    record["enrolled_at"],
                    "enrolled, not linked since the server started",
                )
            else:
                since, reason = record["registered_at"], "registered"
            out.append(
                {
                    "name": name,
                    "url": node.url if connected else record.get("url"),
                    "state": state,
                    "since": since,  # the time and reason of its last change
                    "reason": reason,
                    "clients": node.open_sessions() if connected else 0,
                    # of those, task sessions a gateway carries here (agents outside)
                    "via_gateways": sum(
                        1 for s in node.sessions.values() if " via gateway:" in s.via
                    )
                    if connected
                    else 0,
                    "assigned": assignments.counts.get(name, 0),
                    "max_clients": assignments.capacity(name)
                    if connected
                    else record.get("max_clients") or assignments.default_max,
                    "registered_at": record["registered_at"],
                    "enrolled_at": record.get("enrolled_at"),
                    "link": {
                        "frames_in": node.frames_in,
                        "frames_out": node.frames_out,
                        "pushes": node.pushes,
                    }
                    if connected
                    else None,
                }
            )
        return {"policy": assignments.policy, "taskservers": out}

    def gateway_views(self) -> list[dict[str, Any]]:
        """Registered gateways, each with its live links (one per worker process)."""
        out = []
        for name in sorted(self.directory.gateways()):
            record = self.directory.records[name]
            links = [n for n in self.links.values() if n.name == name and n.ready]
            if record.get("revoked"):
                state = "revoked"
            elif record.get("fingerprint") is None:
                state = "awaiting enrollment"
            else:
                state = "up" if links else "down"
            out.append(
                {
                    "name": name,
                    "state": state,
                    "url": links[0].url if links else record.get("url"),
                    "sessions": sum(n.open_sessions("core") for n in links),
                    "task_sessions": sum(n.open_sessions("task") for n in links),
                    # task servers it links to: its agents' task sessions go there through it
                    "task_servers": sorted({t for n in links for t in n.reach}),
                    "registered_at": record["registered_at"],
                    "enrolled_at": record.get("enrolled_at"),
                    "links": [
                        {
                            "worker": n.worker,
                            "sessions": n.open_sessions("core"),
                            "task_sessions": n.open_sessions("task"),
                            "task_servers": list(n.reach),
                            "connections": len(n.sessions),
                            "frames_in": n.frames_in,
                            "frames_out": n.frames_out,
                            "pushes": n.pushes,
                            "requests": n.requests,
                        }
                        for n in sorted(links, key=lambda n: n.worker or 0)
                    ],
                }
            )
        return out
