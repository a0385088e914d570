"""Domain errors of the server's services, and the one place they become close codes.

Services raise these; they know nothing of HTTP or WebSocket. The JSON router
(`tcm.server.web.http_status`) maps them to HTTP statuses, `close_code` below to WebSocket
close codes. `message` is what the client reads; `details` are extra fields of the JSON error
body (e.g. `unknown=[...]`, `position=3`).
"""

from __future__ import annotations

from typing import Any

from tcm.protocol import codes


class DomainError(Exception):
    """A request a service refuses, with a message for the client."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(DomainError):
    """The thing named does not exist."""


class Conflict(DomainError):
    """The change conflicts with what exists (a name taken, a job already running)."""


class Invalid(DomainError):
    """A value the caller gave is not acceptable; `field` names it (None: the whole body)."""

    def __init__(self, field: str | None, message: str, **details: Any):
        super().__init__(message, **details)
        self.field = field


class Unauthenticated(DomainError):
    """No valid credential."""


class Forbidden(DomainError):
    """A known caller that may not do this."""


class TooLarge(DomainError):
    """More than the server accepts."""


class Unavailable(DomainError):
    """Switched off or not possible now (e.g. persistent connections off)."""


def close_code(error: DomainError) -> int:
    """The WebSocket close code (docs/protocol.md) for a session refused with `error`."""
    if isinstance(error, (Forbidden, Unauthenticated)):
        return codes.CLOSE_UNAUTHORIZED
    if isinstance(error, Unavailable):
        return codes.CLOSE_PERSISTENT_OFF
    if isinstance(error, TooLarge):
        return codes.CLOSE_TOO_BIG
    return codes.CLOSE_PROTOCOL_ERROR
