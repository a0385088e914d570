"""Every zope.interface of tcm, in one place."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ActionFailed(Exception):
    """Raised by an action or policy handler to report a failure with a reason."""

    def __init__(self, reason: str, result: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.result = result or {}


class IActionContext(Interface):
    """What an action handler gets from the agent while it runs one job."""

    job_id = Attribute("The job id (str).")
    timeout = Attribute("Seconds the job may run (float), or None.")
    reactor = Attribute("The reactor to use for processes, timers and I/O.")
    state_dir = Attribute("A FilePath of a directory the handler may use for its own files.")

    def output(stream: str, text: str) -> None:  # type: ignore[misc]
        """Stream a chunk of output ("stdout" / "stderr" / "log") to the server as progress."""


class IActionHandler(Interface):
    """An action an agent can run: discovered with getPlugins(IActionHandler, tcm.plugins)."""

    name = Attribute("Action name on the wire, e.g. 'inventory.collect' ([a-z][a-z0-9_.-]*).")
    streams = Attribute("True when the handler sends output while it runs.")
    task = Attribute("True when the action runs as a task (through a task server when present).")
    schema = Attribute("JSON Schema (dict) of the action's arguments.")

    def run(context: IActionContext, args: dict):  # type: ignore[misc]
        """Run the action with validated args.

        Returns a JSON-serialisable dict (the result) or a Deferred firing with one. Raising
        (or failing the Deferred with) `ActionFailed` (above) reports a failure with that
        reason. Cancelling the Deferred (on timeout) must stop the work (kill a process).
        """


class IPolicyContext(Interface):
    """What a policy handler gets from the agent for one version of one policy."""

    policy = Attribute("The policy's name (str).")
    version = Attribute("The policy's version (int).")
    restored = Attribute(
        "True when the agent re-applies a stored policy at its start rather than a new version "
        "just received: a handler may skip what it does once per version (an immediate run)."
    )
    reactor = Attribute("The reactor: its clock for schedules, processes, threads.")
    state_dir = Attribute("A FilePath of a directory the handler may use for its own files.")

    def schedule(spec: dict, run, now: bool = False):  # type: ignore[misc]
        """Call `run()` on a schedule: spec {"every": seconds} or {"cron": "m h dom mon dow"}
        (validate it with SCHEDULE_SCHEMA below). `now`: also once at once. Returns an object
        with `stop()`. A Deferred returned by `run` is waited for before the next run is
        planned, so runs of one policy never overlap."""

    def run_action(name: str, args: dict):  # type: ignore[misc]
        """Run one of the agent's actions locally (its arguments checked against its schema);
        a Deferred firing with the action's result dict, or failing with ActionFailed."""

    def report(result: dict | None = None, error: str | None = None) -> None:  # type: ignore[misc]
        """Send the outcome of one run to the server (kept as the policy's `last_run`)."""

    def set_agent_settings(settings: dict) -> None:  # type: ignore[misc]
        """Change the agent's own settings (what `agent.settings` documents name); an empty
        dict restores the agent's defaults."""


class IAppliedPolicy(Interface):
    """A policy version in force on an agent, as `IPolicyHandler.apply` returns it."""

    def stop():  # type: ignore[misc]
        """The version is replaced or the policy no longer applies: undo what apply set up
        (cancel schedules). May return a Deferred."""


class IPolicyHandler(Interface):
    """A type of policy document an agent can apply: getPlugins(IPolicyHandler, tcm.plugins)."""

    type = Attribute("Policy type name, e.g. 'inventory.schedule' ([a-z][a-z0-9_.-]*).")
    schema = Attribute("JSON Schema (dict) of the policy document.")

    def apply(context: IPolicyContext, document: dict):  # type: ignore[misc]
        """Put a (validated) policy document in force: returns an IAppliedPolicy (None:
        nothing to undo) or a Deferred of one. Raising (or failing with) `ActionFailed`
        reports the policy failed here."""


# A schedule in a policy document, for handlers' schemas: every N seconds, or a cron line
# (minute hour day-of-month month day-of-week; `*`, `*/n`, `a-b`, `a,b`; local time).
SCHEDULE_SCHEMA: dict = {
    "every": {"type": "number", "minimum": 1},
    "cron": {"type": "string", "minLength": 9, "maxLength": 128},
}


# -- the agent's parts, as its composition root (tcm/agent/service.py) wires them ------------


class IAgentAPI(Interface):
    """How the agent's parts call the server's agent API: over the live session when there
    is one, else over HTTPS (tcm/agent/link.py `ServerLink`)."""

    session = Attribute("The open core session (an AgentConnection), or None.")
    task_session = Attribute("The open task-server session, or None.")

    def call(method: str, path: str, body=None, timeout=None, via=None):  # type: ignore[misc]
        """One agent API call; a Deferred firing with a Response. `via`: the session a job
        came on, tried first while it is open."""

    def call_over_https(method: str, path: str, body=None, timeout=None):  # type: ignore[misc]
        """The same call over HTTPS only (the poller's, which stands for the session)."""


class ISessionHost(Interface):
    """What the agent's sessions (core and task) and its HTTPS polls hand on to the agent:
    what it says in its hello, and what arrives from the server."""

    clock = Attribute("The reactor's clock (IReactorTime).")

    def hello() -> dict:  # type: ignore[misc]
        """The agent's own fields of a `hello`: capabilities, running jobs, policy types,
        the connection profile in force."""

    def action_requested(env, received=None, via=None) -> None:  # type: ignore[misc]
        """An `action.request` envelope arrived (pushed on session `via`, or polled)."""

    def notified(data: dict) -> None:  # type: ignore[misc]
        """A `notify` arrived: something changed on the server (a topic in `data`)."""

    def learn_server_time(server_time) -> None:  # type: ignore[misc]
        """The server's clock, as a welcome or a poll's answer states it."""

    def deliver_results() -> None:  # type: ignore[misc]
        """Send the spooled results now (a poll was answered, a session opened)."""


class ISessionObserver(Interface):
    """Told by the agent's connection (tcm/agent/connection.py) when its persistent session
    opens or is lost, and when HTTPS polling reached the server."""

    def session_opened(welcome: dict) -> None:  # type: ignore[misc]
        """A persistent session is open and the server welcomed it with `welcome`."""

    def session_lost(reason: str, switched_off: bool) -> None:  # type: ignore[misc]
        """The agent works without a persistent session from now on (it closed, or was
        switched off before one opened). `switched_off`: by the endpoint's user or a
        connection profile, and it stays off until switched on again; a switch-off of an
        open session is followed by the close itself (switched_off False)."""

    def polling_started() -> None:  # type: ignore[misc]
        """The first HTTPS poll of a period without a session was answered."""


class IProfileFollower(Interface):
    """Puts a connection profile's settings in force (the agent's connection does)."""

    def follow_profile(settings: dict, live: bool) -> None:  # type: ignore[misc]
        """The profile in force now has `settings` ({}: none; the command line's values).
        `live`: the agent runs (reconnect, close or open the session as they say); else it
        is starting and only takes the values before its first connection."""


class IServerConnection(Interface):
    """The agent's connection to its server, as its task client sees it."""

    proxy = Attribute("The HTTP proxy connections go through now (HTTPProxy), or None.")
    user_disconnected = Attribute("True after `tcm-agent disconnect`, until `reconnect`.")

    def session_keepalive() -> float:  # type: ignore[misc]
        """The keepalive the core session runs with now (the server's, once welcomed)."""

    def adopt_keepalive(protocol, keepalive) -> None:  # type: ignore[misc]
        """Ping on `protocol` as often as a welcome asks."""


class IAgentControl(Interface):
    """What the agent's local control socket offers (tcm-agent status/disconnect/reconnect)."""

    def status() -> dict:  # type: ignore[misc]
        """The Network Status: where the agent connects, how, and what is waiting."""

    def user_disconnect() -> dict:  # type: ignore[misc]
        """Terminate the persistent connection; stay on HTTPS."""

    def user_reconnect() -> dict:  # type: ignore[misc]
        """Allow the persistent connection again."""


class IPolicyAgent(Interface):
    """What the agent's policy engine may ask of the agent itself."""

    def run_action(name: str, args: dict):  # type: ignore[misc]
        """Run one of the agent's actions locally (no job); a Deferred of its result."""

    def set_agent_settings(settings: dict) -> None:  # type: ignore[misc]
        """Apply an `agent.settings` document; {} restores the defaults."""
