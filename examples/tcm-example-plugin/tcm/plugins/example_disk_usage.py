"""Example tcm plugins: the action `example.disk_usage` reports the capacity of one path; the
policy type `example.disk_watch` checks it on a schedule and reports when free space is low."""

from __future__ import annotations

import shutil
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from tcm.interfaces import (
    SCHEDULE_SCHEMA,
    ActionFailed,
    IActionContext,
    IActionHandler,
    IAppliedPolicy,
    IPolicyContext,
    IPolicyHandler,
)


@implementer(IPlugin, IActionHandler)
class DiskUsageAction:
    """Total, used and free bytes of the filesystem holding `path`."""

    name = "example.disk_usage"
    streams = False
    task = False
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["path"],
        "properties": {"path": {"type": "string", "minLength": 1}},
        "additionalProperties": False,
    }

    def run(self, context: IActionContext, args: dict[str, Any]) -> dict[str, Any]:
        """Return {"path", "total", "used", "free"} in bytes."""
        path = args["path"]
        try:
            usage = shutil.disk_usage(path)
        except OSError as e:
            raise ActionFailed(f"cannot stat {path!r}: {e.strerror}") from e
        return {"path": path, "total": usage.total, "used": usage.used, "free": usage.free}


disk_usage = DiskUsageAction()


@implementer(IAppliedPolicy)
class _Watching:
    def __init__(self, scheduled: Any):
        self.scheduled = scheduled

    def stop(self) -> None:
        self.scheduled.stop()


@implementer(IPlugin, IPolicyHandler)
class DiskWatchPolicy:
    """Check the free space of `path` on a schedule; a run with less than `min_free` bytes
    free is reported as failed (with the usage as its result)."""

    type = "example.disk_watch"
    schema: dict[str, Any] = {
        "type": "object",
        "required": ["path", "min_free"],
        "properties": {
            **SCHEDULE_SCHEMA,
            "path": {"type": "string", "minLength": 1},
            "min_free": {"type": "integer", "minimum": 0},
        },
        "oneOf": [{"required": ["every"]}, {"required": ["cron"]}],
        "additionalProperties": False,
    }

    def apply(self, context: IPolicyContext, document: dict[str, Any]) -> _Watching:
        def check() -> None:
            try:
                usage = disk_usage.run(None, {"path": document["path"]})
            except ActionFailed as e:
                context.report(None, e.reason)
                return
            low = usage["free"] < document["min_free"]
            context.report(usage, f"only {usage['free']} bytes free" if low else None)

        return _Watching(context.schedule(document, check, now=not context.restored))


disk_watch = DiskWatchPolicy()
