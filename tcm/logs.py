"""Structured logs: one JSON object per line, for `twistd --logger tcm.logs.json_observer`.

Each line holds the time (ISO 8601, UTC), the level, the namespace (the logging class or
module), the formatted message, the event's own fields where they are plain values (for
example `agent`, `upstream`, `why`), and the traceback of a failure. Lines go to standard
output (run twistd with -n under a supervisor that collects it, e.g. systemd's journal).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from twisted.logger import ILogObserver, formatEvent
from zope.interface import implementer

PLAIN = (str, int, float, bool, type(None))


def event_as_dict(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready form of one Twisted log event."""
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", 0)))
        + f".{int((event.get('log_time', 0) % 1) * 1000):03d}Z",
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in out or key in ("format", "message", "isError"):
            continue
        if isinstance(value, PLAIN):
            out[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        out["traceback"] = failure.getTraceback()
    return out


@implementer(ILogObserver)
class JsonLineObserver:
    """Writes each event as one line of JSON to a text stream."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            line = json.dumps(event_as_dict(event), default=str)
        except Exception as e:  # a log line must never take the process down
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        self.stream.write(line + "\n")
        self.stream.flush()


def json_observer() -> JsonLineObserver:
    """The observer factory for `twistd --logger tcm.logs.json_observer`."""
    return JsonLineObserver(sys.stdout)
