"""A daemon's state directory (agent, task server, gateway): private, files read whole."""

from __future__ import annotations

import json
import os
from typing import Any


class StateDir:
    """Files in a directory only this user can open (0700)."""

    META = "meta.json"  # subclasses name their metadata file

    def __init__(self, directory: str):
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def read(self, name: str) -> bytes | None:
        try:
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def meta(self) -> dict[str, Any]:
        raw = self.read(self.META)
        return json.loads(raw) if raw else {}
