"""The one dispatcher every push goes through.

It knows where each agent's session lives, and which agents in HTTP mode hold a long-poll.
Sessions are grouped by their *route*: direct WebSocket connections share one route; a gateway
link or another server node is one route for many agents, so a push to many agents behind it
crosses that link once and fans out at the other end. Callers never care which.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.logger import Logger

from tcm.server.sessions import AgentSession, SessionRegistry


class DirectRoute:
    """Sessions on WebSocket connections of this process: one prepared frame for all."""

    def __init__(self, prepare: Any):
        self._prepare = prepare

    def deliver(self, frame: bytes, sessions: list[AgentSession]) -> None:
        if len(sessions) == 1:
            sessions[0].transport.send_frame(frame)
            return
        prepared = self._prepare(frame)  # framed once, sent to every connection
        for s in sessions:
            s.transport.send_prepared(prepared)


class Dispatcher:
    """Push frames to agents wherever their sessions live."""

    _log = Logger()

    def __init__(
        self, registry: SessionRegistry, polls: Any = None, task_registry: Any = None
    ) -> None:
        self.registry = registry
        self.polls = polls
        self.task_registry = task_registry
        self.pushed = 0

    def push(
        self, frame: bytes, agent_ids: Iterable[str], task: bool = False
    ) -> tuple[list[str], list[str]]:
        """Send one frame to each agent that has a live session.

        A task goes over the agent's task-client session (through its task server) when it
        has one, else over its own session, else to its waiting long-poll.
        Returns (sent, offline) agent ids.
        """
        by_route: dict[Any, list[Any]] = {}
        sent: list[str] = []
        offline: list[str] = []
        polls = self.polls
        tasks = self.task_registry if task else None
        for agent_id in agent_ids:
            session: Any = tasks.get(agent_id) if tasks is not None else None
            if session is None:
                session = self.registry.get(agent_id)
            if session is None and polls is not None:
                session = polls.get(agent_id)  # an agent in HTTP mode, waiting on a long-poll
            if session is None:
                offline.append(agent_id)
                continue
            by_route.setdefault(session.route, []).append(session)
            sent.append(agent_id)
        for route, sessions in by_route.items():
            route.deliver(frame, sessions)
        self.pushed += len(sent)
        return sent, offline

    def is_online(self, agent_id: str) -> bool:
        return agent_id in self.registry

    def is_reachable(self, agent_id: str) -> bool:
        """The agent has a session (its own or a task session) or a waiting long-poll: a
        push reaches it now."""
        if agent_id in self.registry:
            return True
        if self.task_registry is not None and self.task_registry.get(agent_id) is not None:
            return True
        return self.polls is not None and self.polls.get(agent_id) is not None
