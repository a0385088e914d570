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


class IPolicyHandler(Interface):
    """A type of policy document an agent can apply: getPlugins(IPolicyHandler, tcm.plugins)."""

    type = Attribute("Policy type name, e.g. 'inventory.schedule'.")
    schema = Attribute("JSON Schema (dict) of the policy document.")

    def apply(context: IActionContext, document: dict):  # type: ignore[misc]
        """Apply a policy document (or its new version). Returns a dict or Deferred of one."""

    def remove(context: IActionContext):  # type: ignore[misc]
        """The policy no longer applies to this agent: undo schedules it set up."""
