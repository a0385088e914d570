"""The relay's traffic counters, read by the metrics collector and the status page at scrape
time (plain integers: nothing is done per message for metrics)."""

from __future__ import annotations

from collections.abc import Callable


class RelayCounters:
    """Agent connections accepted and refused, messages and bytes each way, pushes."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: dict[str, int] = {}  # by a short reason label
        self.frames_in = 0  # agent -> server
        self.frames_out = 0  # server -> agents, each fanned-out copy counted
        self.bytes_in = 0
        self.bytes_out = 0
        self.pushes = 0
        self.fanout: Callable[[int], object] | None = None  # each push's number of connections

    def refused_for(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def to_server(self, payload: bytes) -> None:
        self.frames_in += 1
        self.bytes_in += len(payload)

    def to_agents(self, payload: bytes, copies: int = 1) -> None:
        self.frames_out += copies
        self.bytes_out += copies * len(payload)

    def pushed(self, payload: bytes, copies: int) -> None:
        """One push from a server reached `copies` connections."""
        self.pushes += 1
        self.to_agents(payload, copies)
        if self.fanout is not None:
            self.fanout(copies)


def refusal_label(refusal: tuple[int, str]) -> str:
    """A short, bounded label of a refusal for counters (metrics by reason)."""
    status, why = refusal
    for word in ("revoked", "draining", "full", "no link", "not reachable", "names no server"):
        if word in why:
            return word.replace(" ", "_")
    return f"http_{status}"
