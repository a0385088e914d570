"""The agent's own side of its sessions and policies.

`SessionHost` is what every session (core and task) and every HTTPS poll hands on to: the
hello's description of the agent, action requests (to the runner), `notify` topics (to whoever
subscribed to the topic), the server's clock. `LocalActions` is what policies may do on the
agent itself: run an action without a job, change the agent's own settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from tcm.agent.config import AgentConfig
from tcm.agent.ledger import Ledger
from tcm.agent.profile import ProfileKeeper
from tcm.agent.runner import ActionContext, ActionRunner, validator_for
from tcm.interfaces import ActionFailed, IPolicyAgent, ISessionHost
from tcm.protocol.envelope import Envelope


@implementer(ISessionHost)
class SessionHost:
    """Hands what arrives on sessions and polls to the parts of the agent it is for."""

    # one per agent, thousands in a swarm process: no __dict__
    __slots__ = ("clock", "_runner", "_handlers", "_policy_handlers", "_profile", "_topics")
    _log = Logger()

    def __init__(
        self,
        clock: Any,
        runner: ActionRunner,
        handlers: dict[str, Any],
        policy_handlers: dict[str, Any],
        profile: ProfileKeeper,
    ):
        self.clock = clock
        self._runner = runner
        self._handlers = handlers
        self._policy_handlers = policy_handlers
        self._profile = profile
        self._topics: dict[str, Callable[[dict[str, Any]], None]] = {}

    def on_notify(self, topic: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """A `notify` of `topic` goes to `handler` (one per topic)."""
        self._topics[topic] = handler

    def hello(self) -> dict[str, Any]:
        return {
            "capabilities": [
                {
                    "name": h.name,
                    "streams": bool(h.streams),
                    "task": bool(h.task),
                    # the server checks a job's arguments against it before sending it
                    "schema": h.schema or {},
                }
                for h in sorted(self._handlers.values(), key=lambda h: h.name)
            ],
            "running": self._runner.running_jobs(),
            "policy_types": sorted(self._policy_handlers),
            "profile": self._profile.in_force(),
        }

    def action_requested(self, env: Envelope, received: float | None = None, via=None) -> None:
        self._runner.receive(env, received, via)

    def cancel_requested(self, data: dict[str, Any]) -> None:
        """The server canceled a job: end its handler if it runs here."""
        job_id = data.get("job")
        if isinstance(job_id, str):
            self._runner.cancel(job_id, data.get("reason") or "canceled")

    def notified(self, data: dict[str, Any]) -> None:
        """The server says something changed: fetch it again."""
        topic = data.get("topic")
        self._log.info("server notifies {topic}", topic=topic)
        handler = self._topics.get(topic) if isinstance(topic, str) else None
        if handler is not None:
            handler(data)

    def learn_server_time(self, server_time: Any) -> None:
        self._runner.learn_server_time(server_time)

    def deliver_results(self) -> None:
        self._runner.flush()


@implementer(IPolicyAgent)
class LocalActions:
    """What the agent's policies may use: its actions, its spool settings and flush timer."""

    __slots__ = (
        "reactor",
        "config",
        "_default_flush_interval",
        "_default_spool_fsync",
        "_handlers",
        "_runner",
        "_ledger",
        "_state_dir",
        "flush_loop",
    )
    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: AgentConfig,
        handlers: dict[str, Any],
        runner: ActionRunner,
        ledger: Ledger,
        state_dir: str,
    ):
        self.reactor = reactor
        self.config = config
        self._default_flush_interval = config.flush_interval
        self._default_spool_fsync = config.spool_fsync
        self._handlers = handlers
        self._runner = runner
        self._ledger = ledger
        self._state_dir = state_dir
        self.flush_loop: LoopingCall | None = None

    def run_action(self, name: str, args: dict[str, Any]) -> Deferred:
        """Run one of this agent's actions for a policy (no job, no server round trip)."""
        handler = self._handlers.get(name)
        if handler is None:
            raise ActionFailed(f"no action {name!r} on this agent")
        try:
            validator_for(handler)(args)
        except Exception as e:
            raise ActionFailed(f"invalid arguments for {name}: {e}") from None
        context = ActionContext(
            f"policy-{name}",
            None,
            self.reactor,
            FilePath(self._state_dir),
            self._runner,
            local=True,
        )
        return maybeDeferred(handler.run, context, args)

    def set_agent_settings(self, settings: dict[str, Any]) -> None:
        """Apply an agent.settings document; {} restores the defaults."""
        interval = settings.get("flush_interval", self._default_flush_interval)
        fsync = settings.get("spool_fsync", self._default_spool_fsync)
        self._ledger.fsync = bool(fsync)
        if interval != self.config.flush_interval:
            self.config.flush_interval = float(interval)
            if self.flush_loop is not None and self.flush_loop.running:
                self.flush_loop.stop()
                self.flush_loop.start(self.config.flush_interval, now=False)
        self._log.info(
            "agent settings: flush every {interval} s, spool fsync {fsync}",
            interval=self.config.flush_interval,
            fsync=self._ledger.fsync,
        )

    def start_flush_loop(self) -> None:
        """Send waiting results every `flush_interval` seconds (and at once)."""
        self.flush_loop = LoopingCall(self._runner.flush)
        self.flush_loop.clock = self.reactor
        self.flush_loop.start(self.config.flush_interval, now=True)

    def stop_flush_loop(self) -> None:
        if self.flush_loop is not None and self.flush_loop.running:
            self.flush_loop.stop()
