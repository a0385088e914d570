"""Authentication and tokens: admin API tokens (who calls /api/v1) and enrollment tokens."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from zope.interface import implementer

from tcm.interfaces import IAccessTokens
from tcm.server import errors
from tcm.server.roles import Principal, TokenBook
from tcm.store import Conflict


@implementer(IAccessTokens)
class AccessTokens:
    """Bearer tokens of the admin API (the bootstrap token and named API tokens, checked in
    memory per request) and the agents' enrollment tokens, kept in the store's access area."""

    def __init__(self, access_store: Any, admin_token: str, clock: Any):
        self._store = access_store
        self._clock = clock
        self.admin_token = admin_token
        self.book = TokenBook(admin_token)

    @inlineCallbacks
    def load(self):
        self.book.load((yield self._store.list_api_tokens(include_hashes=True)))

    def authenticate(self, token: str) -> Principal:
        """The principal of a bearer token; errors.Unauthenticated when it is none."""
        return self.book.authenticate(token, self._clock.seconds())

    # -- enrollment tokens ---------------------------------------------------------------
    def create_enrollment_token(
        self, ttl: float | None, uses: int | None, description: str, profile: str | None
    ) -> Deferred[str]:
        """A new enrollment token (`ID.SECRET`)."""
        return self._store.create_token(ttl, uses, description, profile, now=self._clock.seconds())

    def enrollment_tokens(self) -> Deferred[list[dict[str, Any]]]:
        return self._store.list_tokens()

    @inlineCallbacks
    def revoke_enrollment_token(self, token_id: str):
        """Withdraw an enrollment token: refused at once. Fires with whether it changed."""
        changed = yield self._store.revoke_token(token_id, self._clock.seconds())
        if changed is None:
            raise errors.NotFound(f"no enrollment token {token_id}")
        return changed

    # -- API tokens ----------------------------------------------------------------------
    @staticmethod
    def check_token_name(name: str) -> None:
        """Invalid for a name no API token may have."""
        if name == "admin":
            raise errors.Invalid("name", "'admin' is the bootstrap token's name; choose another")

    @inlineCallbacks
    def create_api_token(
        self, name: str, role: str, target: str | None, ttl: float | None, created_by: str
    ):
        """A new API token: fires with (token, row); Conflict when the name is taken."""
        self.check_token_name(name)
        now = self._clock.seconds()
        try:
            token, row = yield self._store.create_api_token(
                name, role, target, now + ttl if ttl else None, created_by, now
            )
        except Conflict as e:
            raise errors.Conflict(str(e)) from None
        self.book.add(row)
        return token, row

    def api_tokens(self) -> Deferred[list[dict[str, Any]]]:
        return self._store.list_api_tokens()

    @inlineCallbacks
    def revoke_api_token(self, name: str):
        """Revoke the active tokens of that name: fires with their ids; NotFound if none."""
        ids = yield self._store.revoke_api_token(name, self._clock.seconds())
        if not ids:
            raise errors.NotFound(f"no active API token named {name!r}")
        self.book.remove(ids)
        return ids
