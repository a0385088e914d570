"""Who may come in: enrollment tokens (agents), API tokens (admins) and relay nodes.

Secrets are stored as hashes only; a full token `<id>.<secret>` is shown once, when made.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred

from tcm.store import schema as t
from tcm.store.errors import Conflict, TokenRefused

if TYPE_CHECKING:
    from tcm.store.database import Database


def hash_secret(secret: str) -> str:
    """The stored form of a token's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


class AccessStore:
    """Enrollment tokens, API tokens and relay nodes (task servers, gateways)."""

    def __init__(self, db: Database):
        self._db = db

    # -- enrollment tokens -----------------------------------------------------------
    def create_token(
        self,
        ttl: float | None,
        uses: int | None,
        description: str = "",
        profile: str | None = None,
        *,
        now: float,
    ) -> Deferred[str]:
        """A new enrollment token: returns the full token `<id>.<secret>` (shown once).
        An agent enrolling with a token that names a `profile` gets that profile."""
        token_id = os.urandom(6).hex()
        secret = os.urandom(24).hex()
        row = dict(
            id=token_id,
            secret_hash=hash_secret(secret),
            created_at=now,
            expires_at=(now + ttl) if ttl else None,
            uses_left=uses,
            description=description,
            profile=profile,
        )

        def op(c: Connection) -> str:
            c.execute(t.enrollment_tokens.insert().values(**row))
            return f"{token_id}.{secret}"

        return self._db.transaction(op)

    def list_tokens(self) -> Deferred[list[dict[str, Any]]]:
        """Every enrollment token, without its secret's hash."""
        cols = [c for c in t.enrollment_tokens.c if c.name != "secret_hash"]
        return self._db.read(lambda c: [dict(r._mapping) for r in c.execute(sa.select(*cols))])

    def consume_token(self, token: str, now: float) -> Deferred[str]:
        """Use an enrollment token once; returns its id. Fails with TokenRefused saying why."""
        return self.consume_token_row(token, now).addCallback(lambda row: row["id"])

    def consume_token_row(self, token: str, now: float) -> Deferred[dict[str, Any]]:
        """Use an enrollment token once; returns its row (id, profile, ...) without the
        secret. Fails with TokenRefused saying why."""

        def op(c: Connection) -> dict[str, Any]:
            token_id, _, secret = token.partition(".")
            row = c.execute(
                sa.select(t.enrollment_tokens).where(t.enrollment_tokens.c.id == token_id)
            ).first()
            if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
                raise TokenRefused("unknown enrollment token")
            if row.revoked_at is not None:
                raise TokenRefused("enrollment token revoked")
            if row.expires_at is not None and now >= row.expires_at:
                raise TokenRefused("enrollment token expired")
            if row.uses_left is not None and row.uses_left <= 0:
                raise TokenRefused("enrollment token used up")
            values: dict[str, Any] = {"used": row.used + 1}
            if row.uses_left is not None:
                values["uses_left"] = row.uses_left - 1
            c.execute(
                t.enrollment_tokens.update()
                .where(t.enrollment_tokens.c.id == token_id)
                .values(**values)
            )
            out = dict(row._mapping)
            out.pop("secret_hash", None)
            return out

        return self._db.transaction(op)

    def revoke_token(self, token_id: str, now: float) -> Deferred[bool | None]:
        """Withdraw an enrollment token: refused from now on. True if it changed, False if
        it was revoked already, None if there is no such token."""
        et = t.enrollment_tokens

        def op(c: Connection) -> bool | None:
            row = c.execute(sa.select(et.c.revoked_at).where(et.c.id == token_id)).first()
            if row is None:
                return None
            if row.revoked_at is not None:
                return False
            c.execute(et.update().where(et.c.id == token_id).values(revoked_at=now))
            return True

        return self._db.transaction(op)

    # -- relay nodes (task servers, gateways) ---------------------------------------
    def remove_node(self, name: str, role: str) -> Deferred[bool | None]:
        """Revoke a node of that role: its certificate refused from now on, its pending
        enrollment withdrawn. True if it changed, False if revoked already, None if no
        such node."""
        n = t.nodes

        def op(c: Connection) -> bool | None:
            row = c.execute(
                sa.select(n.c.revoked).where(n.c.name == name).where(n.c.role == role)
            ).first()
            if row is None:
                return None
            if row.revoked:
                return False
            c.execute(n.update().where(n.c.name == name).values(revoked=True, token_hash=None))
            return True

        return self._db.transaction(op)

    def register_node(
        self, name: str, role: str, max_clients: int | None, ttl: float, now: float
    ) -> Deferred[str]:
        """Register a node (or issue a new enrollment secret for it); returns the secret."""
        secret = os.urandom(24).hex()
        n = t.nodes

        def op(c: Connection) -> str:
            row = c.execute(sa.select(n).where(n.c.name == name)).first()
            values = dict(
                role=role,
                max_clients=max_clients,
                token_hash=hash_secret(secret),
                token_expires=now + ttl,
                revoked=False,
            )
            if row is None:
                c.execute(n.insert().values(name=name, registered_at=now, **values))
            elif row.role != role:
                raise TokenRefused(f"{name!r} is already registered as a {row.role}")
            else:
                c.execute(n.update().where(n.c.name == name).values(**values))
            return secret

        return self._db.transaction(op)

    def enroll_node(self, name: str, secret: str, fingerprint: str, now: float) -> Deferred[str]:
        """Use a node's one-time enrollment secret; records its certificate. Its role."""
        n = t.nodes

        def op(c: Connection) -> str:
            row = c.execute(sa.select(n).where(n.c.name == name)).first()
            if (
                row is None
                or row.token_hash is None
                or not hmac.compare_digest(row.token_hash, hash_secret(secret))
            ):
                raise TokenRefused(f"no enrollment pending for node {name!r} with this token")
            if row.token_expires is not None and now >= row.token_expires:
                raise TokenRefused(f"the enrollment token of node {name!r} expired")
            c.execute(
                n.update()
                .where(n.c.name == name)
                .values(
                    fingerprint=fingerprint,
                    previous_fingerprint=None,
                    enrolled_at=now,
                    token_hash=None,
                )
            )
            return str(row.role)

        return self._db.transaction(op)

    def renew_node(self, name: str, old: str, new: str) -> Deferred[bool]:
        """A node renewed its certificate: `new` is its fingerprint from now on, `old` (the
        one it renewed with) still accepted until it expires. Compare-and-set: False if the
        node is gone, revoked or enrolled again meanwhile."""
        n = t.nodes

        def op(c: Connection) -> bool:
            done = c.execute(
                n.update()
                .where(n.c.name == name)
                .where(n.c.revoked == sa.false())
                .where(sa.or_(n.c.fingerprint == old, n.c.previous_fingerprint == old))
                .values(fingerprint=new, previous_fingerprint=n.c.fingerprint)
            )
            return bool(done.rowcount)

        return self._db.transaction(op)

    def node_reported(self, name: str, url: str) -> Deferred[None]:
        """Record where agents reach a node (as the node reported it)."""
        n = t.nodes

        def op(c: Connection) -> None:
            c.execute(n.update().where(n.c.name == name).values(url=url))

        return self._db.transaction(op)

    def list_nodes(self) -> Deferred[list[dict[str, Any]]]:
        """Every registered node by name, without its enrollment secret's hash."""
        cols = [c for c in t.nodes.c if c.name != "token_hash"]
        return self._db.read(
            lambda c: [
                dict(r._mapping) for r in c.execute(sa.select(*cols).order_by(t.nodes.c.name))
            ]
        )

    # -- API tokens --------------------------------------------------------------------
    def create_api_token(
        self,
        name: str,
        role: str,
        target: str | None,
        expires_at: float | None,
        created_by: str,
        now: float,
    ) -> Deferred[tuple[str, dict[str, Any]]]:
        """A new API token: (the full token `<id>.<secret>`, shown once; its row).
        Conflict while an active token of that name exists."""
        at = t.api_tokens
        token_id = os.urandom(6).hex()
        secret = os.urandom(24).hex()
        row: dict[str, Any] = dict(
            id=token_id,
            name=name,
            secret_hash=hash_secret(secret),
            role=role,
            target=target,
            created_at=now,
            created_by=created_by,
            expires_at=expires_at,
            revoked_at=None,
        )

        def op(c: Connection) -> tuple[str, dict[str, Any]]:
            taken = c.execute(
                sa.select(at.c.id).where(at.c.name == name).where(at.c.revoked_at.is_(None))
            ).first()
            if taken is not None:
                raise Conflict(f"an API token named {name!r} exists; revoke it first")
            c.execute(at.insert().values(**row))
            return f"{token_id}.{secret}", row

        return self._db.transaction(op)

    def list_api_tokens(self, include_hashes: bool = False) -> Deferred[list[dict[str, Any]]]:
        """Every API token (revoked ones too), oldest first."""
        at = t.api_tokens
        cols = [c for c in at.c if include_hashes or c.name != "secret_hash"]
        return self._db.read(
            lambda c: [
                dict(r._mapping) for r in c.execute(sa.select(*cols).order_by(at.c.created_at))
            ]
        )

    def revoke_api_token(self, name: str, now: float) -> Deferred[list[str]]:
        """Revoke the active token(s) of that name; the ids revoked."""
        at = t.api_tokens

        def op(c: Connection) -> list[str]:
            ids = [
                r.id
                for r in c.execute(
                    sa.select(at.c.id).where(at.c.name == name).where(at.c.revoked_at.is_(None))
                )
            ]
            if ids:
                c.execute(at.update().where(at.c.id.in_(ids)).values(revoked_at=now))
            return ids

        return self._db.transaction(op)
