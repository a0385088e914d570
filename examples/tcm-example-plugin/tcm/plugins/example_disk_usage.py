"""Example tcm action plugin: `example.disk_usage` reports the capacity of one path."""

from __future__ import annotations

import shutil
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from tcm.interfaces import ActionFailed, IActionContext, IActionHandler


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
