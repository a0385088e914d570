"""The gateway's access lists: agents each upstream server revoked, or has not approved yet.

A server sends its lists over the link (`revoked`, `pending`: the whole list after welcome,
then each change); the gateway refuses those agents before they reach the server. The lists
are kept per upstream: the same agent id at another server is another agent.
"""

from __future__ import annotations


class AccessLists:
    """Revoked and pending agents, per upstream (by the name whose lists apply)."""

    def __init__(self) -> None:
        self.revoked: dict[str, set[str]] = {}
        self.pending: dict[str, set[str]] = {}

    def revoke(self, upstream: str, agent_ids: list[str], full: bool = False) -> set[str]:
        """Agents that server revoked (all of them with `full`); the ids now revoked."""
        ids = set(agent_ids)
        if full:
            self.revoked[upstream] = ids
        else:
            self.revoked.setdefault(upstream, set()).update(ids)
        return ids

    def set_pending(
        self, upstream: str, agent_ids: list[str], approved: list[str], full: bool = False
    ) -> None:
        """Agents that server has not approved yet (all of them with `full`), less `approved`."""
        if full:
            self.pending[upstream] = set(agent_ids)
        else:
            self.pending.setdefault(upstream, set()).update(agent_ids)
        self.pending[upstream].difference_update(approved)

    def refusal(self, agent_id: str | None, upstream: str) -> tuple[int, str] | None:
        """Why that server's lists refuse the agent (HTTP status, reason), or None."""
        if agent_id is None:
            return None
        if agent_id in self.revoked.get(upstream, ()):
            return 403, f"agent {agent_id} is revoked"
        if agent_id in self.pending.get(upstream, ()):
            return 403, f"agent {agent_id} is awaiting approval"
        return None

    def revoked_count(self, upstream: str) -> int:
        return len(self.revoked.get(upstream, ()))
