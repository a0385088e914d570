"""Roles of admin API tokens and what each may do. Pure: no I/O.

Every admin API route needs one permission; a role is a set of permissions:

| role     | read | run | policy | admin |
|----------|------|-----|--------|-------|
| viewer   | yes  |     |        |       |
| operator | yes  | yes | yes    |       |
| admin    | yes  | yes | yes    | yes   |

`read`: every GET. `run`: create jobs (and inventory refreshes, which are jobs). `policy`:
push policies. `admin`: everything else that changes something (API and enrollment tokens,
targets, groups, settings). A token may be *scoped* to a target: then the jobs it creates
must go to members of that target only.
"""

from __future__ import annotations

import hmac
from typing import Any

import attrs

from tcm.server import errors
from tcm.store import hash_secret

PERMISSIONS = ("read", "run", "policy", "admin")

ROLES: dict[str, frozenset[str]] = {
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "run", "policy"}),
    "admin": frozenset(PERMISSIONS),
}

WHAT = {
    "read": "read",
    "run": "run jobs",
    "policy": "push policies",
    "admin": "administer (tokens, targets, groups, settings)",
}

BOOTSTRAP = "admin"  # the principal name of the bootstrap token (admin.token)


class Refused(errors.Forbidden):
    """A request its principal may not make; `reason` names the role and what it lacks."""

    def __init__(self, reason: str, role: str, lacks: str):
        super().__init__(reason, role=role, lacks=lacks)
        self.reason = reason
        self.role = role
        self.lacks = lacks


class Unauthenticated(errors.Unauthenticated):
    """No valid token."""


@attrs.frozen
class Principal:
    """Who makes a request: a token's name, its role, the target it is scoped to."""

    name: str
    role: str
    target: str | None = None

    def may(self, permission: str) -> bool:
        return permission in ROLES.get(self.role, frozenset())

    def require(self, permission: str, doing: str) -> None:
        """Refused unless the role holds `permission`; `doing` says what was attempted."""
        if not self.may(permission):
            raise Refused(
                f"token {self.name!r} has role {self.role!r}, which may not {doing}: "
                f"it lacks the {permission!r} permission ({WHAT[permission]})",
                self.role,
                permission,
            )

    def require_recipients(self, agents: set[str], scope_members: set[str]) -> None:
        """Refused when a scoped principal addresses agents outside its target."""
        outside = sorted(agents - scope_members)
        if self.target is not None and outside:
            shown = ", ".join(outside[:10]) + (" ..." if len(outside) > 10 else "")
            raise Refused(
                f"token {self.name!r} ({self.role}) is scoped to target {self.target!r}; "
                f"{len(outside)} recipient(s) are not its members: {shown}",
                self.role,
                "scope",
            )


@attrs.define
class TokenBook:
    """The active API tokens in memory (id -> row with secret_hash), checked per request."""

    bootstrap: str
    tokens: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def load(self, rows: list[dict[str, Any]]) -> None:
        self.tokens = {r["id"]: r for r in rows if r["revoked_at"] is None}

    def add(self, row: dict[str, Any]) -> None:
        self.tokens[row["id"]] = row

    def remove(self, token_ids: list[str]) -> None:
        for token_id in token_ids:
            self.tokens.pop(token_id, None)

    def authenticate(self, token: str, now: float) -> Principal:
        """The principal of a bearer token; Unauthenticated when it is none (or expired)."""
        if hmac.compare_digest(token.encode(), self.bootstrap.encode()):
            return Principal(BOOTSTRAP, "admin")
        token_id, _, secret = token.partition(".")
        row = self.tokens.get(token_id)
        if row is None or not hmac.compare_digest(row["secret_hash"], hash_secret(secret)):
            raise Unauthenticated("invalid API token")
        if row["expires_at"] is not None and now >= row["expires_at"]:
            raise Unauthenticated(f"API token {row['name']!r} expired")
        return Principal(row["name"], row["role"], row["target"])
