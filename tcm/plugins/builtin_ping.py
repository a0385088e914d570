"""Built-in action `ping`: the cheapest round trip through the whole job pipeline."""

from __future__ import annotations

from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from tcm.interfaces import IActionContext, IActionHandler


@implementer(IPlugin, IActionHandler)
class PingAction:
    """Answer `pong` with the agent's clock, echoing back an optional string."""

    name = "ping"
    streams = False
    task = False
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"echo": {"type": "string", "maxLength": 4096}},
        "additionalProperties": False,
    }

    def run(self, context: IActionContext, args: dict[str, Any]) -> dict[str, Any]:
        """Return {"pong": True, "time": <agent epoch seconds>, "echo": <echo or None>}."""
        # The reactor's clock rather than time.time(): a test's Clock controls it.
        return {"pong": True, "time": float(context.reactor.seconds()), "echo": args.get("echo")}


ping = PingAction()
