"""Built-in policy types: `inventory.schedule`, `command.schedule`, `agent.settings`."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from tcm.interfaces import SCHEDULE_SCHEMA, IAppliedPolicy, IPolicyContext, IPolicyHandler


@implementer(IAppliedPolicy)
class StopSchedule:
    """A policy in force that is just a schedule: stopping it cancels the schedule."""

    def __init__(self, scheduled: Any):
        self.scheduled = scheduled

    def stop(self) -> None:
        self.scheduled.stop()


def _run_and_report(context: IPolicyContext, action: str, args: dict[str, Any]) -> Deferred:
    """Run the action and report its outcome; fires with the server's answer to the report
    (None when there was none)."""
    d = context.run_action(action, args)
    d.addCallbacks(
        lambda result: context.report(result, None),
        lambda f: context.report(getattr(f.value, "result", None) or None, _reason(f)),
    )
    return d


def _reason(f: Any) -> str:
    return getattr(f.value, "reason", None) or f.getErrorMessage()


_ONE_SCHEDULE = [{"required": ["every"]}, {"required": ["cron"]}]


@implementer(IPlugin, IPolicyHandler)
class InventorySchedulePolicy:
    """Collect inventory (all classes, or `classes`) on a schedule; each run's result is
    reported to the server as the policy's last run. A new version runs once at once."""

    type = "inventory.schedule"
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            **SCHEDULE_SCHEMA,
            "classes": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        },
        "oneOf": _ONE_SCHEDULE,
        "additionalProperties": False,
    }

    def apply(self, context: IPolicyContext, document: dict[str, Any]) -> StopSchedule:
        args = {"classes": document["classes"]} if "classes" in document else {}
        # What the server holds of this agent's inventory, as it said after the last run:
        # the next run sends only the classes that changed since (issue 18). Empty at first
        # (and after a restart): that run sends everything once.
        known: dict[str, str] = {}

        def run() -> Deferred:
            run_args = {**args, "known": dict(known)} if known else dict(args)
            d = _run_and_report(context, "inventory.collect", run_args)
            d.addCallback(learn)
            return d

        def learn(answer: Any) -> None:
            told = answer.get("inventory_known") if isinstance(answer, dict) else None
            if isinstance(told, dict):
                known.clear()
                known.update(
                    {k: v for k, v in told.items() if isinstance(k, str) and isinstance(v, str)}
                )

        return StopSchedule(context.schedule(document, run, now=not context.restored))


@implementer(IPlugin, IPolicyHandler)
class CommandSchedulePolicy:
    """Run a command (the `command.run` action's arguments in `command`) on a schedule;
    each run's exit and output are reported as the policy's last run. Runs first at the
    first scheduled time (`run_now: true` runs a new version once at once too)."""

    type = "command.schedule"
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["command"],
        "properties": {
            **SCHEDULE_SCHEMA,
            "command": {"type": "object", "required": ["argv"]},
            "run_now": {"type": "boolean"},
        },
        "oneOf": _ONE_SCHEDULE,
        "additionalProperties": False,
    }

    def apply(self, context: IPolicyContext, document: dict[str, Any]) -> StopSchedule:
        command = dict(document["command"])
        now = bool(document.get("run_now")) and not context.restored
        return StopSchedule(
            context.schedule(
                document, lambda: _run_and_report(context, "command.run", command), now=now
            )
        )


@implementer(IAppliedPolicy)
class RestoreSettings:
    """Stopping an `agent.settings` policy puts the agent's defaults back."""

    def __init__(self, context: IPolicyContext):
        self.context = context

    def stop(self) -> None:
        self.context.set_agent_settings({})


@implementer(IPlugin, IPolicyHandler)
class AgentSettingsPolicy:
    """The agent's own settings: how often it resends spooled results (`flush_interval`) and
    whether it fsyncs its spool (`spool_fsync`)."""

    type = "agent.settings"
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "flush_interval": {"type": "number", "minimum": 1, "maximum": 86400},
            "spool_fsync": {"type": "boolean"},
        },
        "additionalProperties": False,
    }

    def apply(self, context: IPolicyContext, document: dict[str, Any]) -> RestoreSettings:
        context.set_agent_settings(dict(document))
        return RestoreSettings(context)


inventory_schedule = InventorySchedulePolicy()
command_schedule = CommandSchedulePolicy()
agent_settings = AgentSettingsPolicy()
