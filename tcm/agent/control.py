"""The agent's local control socket: status, disconnect, reconnect (the seed's Network Status).

A UNIX socket `control.sock` in the agent's state directory, mode 0600 in a 0700 directory, so
only the agent's own user (or root) can open it. One JSON object per line each way:
    {"command": "status"}      -> {"ok": true, "status": {...}}
    {"command": "disconnect"}  -> terminate the persistent connection; stay on HTTPS
    {"command": "reconnect"}   -> allow the persistent connection again
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from tcm.agent import CONTROL_SOCKET
from tcm.interfaces import IAgentControl


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024
    _log = Logger()

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
            command = request["command"]
        except (ValueError, KeyError, TypeError):
            self._reply(
                {"ok": False, "error": 'send {"command": "status"|"disconnect"|"reconnect"}'}
            )
            return
        handler = self.factory.commands.get(command)
        if handler is None:
            self._reply(
                {
                    "ok": False,
                    "error": f"unknown command {command!r}",
                    "commands": sorted(self.factory.commands),
                }
            )
            return
        self._reply({"ok": True, **handler()})

    def _reply(self, obj: dict[str, Any]) -> None:
        self.sendLine(json.dumps(obj, default=str).encode())


class ControlFactory(Factory):
    """Commands of the control socket, answered by `agent`."""

    protocol = ControlProtocol

    def __init__(self, agent: IAgentControl):
        self.commands = {
            "status": lambda: {"status": agent.status()},
            "disconnect": agent.user_disconnect,
            "reconnect": agent.user_reconnect,
        }


def control_service(
    reactor: Any, agent: IAgentControl, state_dir: str
) -> StreamServerEndpointService:
    path = os.path.join(state_dir, CONTROL_SOCKET)
    if os.path.exists(path):
        os.unlink(path)  # left by an agent that did not stop cleanly
    endpoint = UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=False)
    return StreamServerEndpointService(endpoint, ControlFactory(agent))
