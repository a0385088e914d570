"""What the store refuses, as exceptions its callers map to their answers."""

from __future__ import annotations


class TokenRefused(Exception):
    """An enrollment token that is unknown, expired or used up."""


class Conflict(Exception):
    """A name already taken (a target, a group, an active API token)."""


class StoreUnavailable(Exception):
    """The database cannot be reached now (down, restarting, unreachable): nothing was
    written; the caller may try again later."""
