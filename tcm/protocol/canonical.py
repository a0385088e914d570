"""Canonical JSON: what inventory digests are of, on the agent and on the server alike, and
the text the server stores a class's data as (parsed once, kept as text until written)."""

from __future__ import annotations

import json
from typing import Any


def canonical(data: Any) -> str:
    """Keys sorted, no spaces, UTF-8 as is: equal data, equal text on every machine."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class JSONText(str):
    """A value's canonical JSON text, written to the store as it is (not encoded again)."""
