"""Roles and API tokens (tcm/server/roles.py), without a server."""

from __future__ import annotations

import pytest

from tcm.server.roles import ROLES, Principal, Refused, TokenBook, Unauthenticated
from tcm.store import hash_secret


def row(token_id, secret, role="viewer", expires_at=None, target=None, revoked_at=None):
    return {
        "id": token_id,
        "name": f"n-{token_id}",
        "secret_hash": hash_secret(secret),
        "role": role,
        "target": target,
        "expires_at": expires_at,
        "revoked_at": revoked_at,
    }


def test_roles_table():
    assert ROLES["viewer"] == {"read"}
    assert ROLES["operator"] == {"read", "run", "policy"}
    assert ROLES["admin"] == {"read", "run", "policy", "admin"}


def test_token_book_authenticates_by_hash_and_honours_expiry_and_revocation():
    book = TokenBook("boot")
    book.load([row("aa", "s1", "operator", expires_at=100.0), row("bb", "s2", revoked_at=5.0)])
    assert book.authenticate("boot", 0) == Principal("admin", "admin")
    assert book.authenticate("aa.s1", 99.0) == Principal("n-aa", "operator")
    with pytest.raises(Unauthenticated, match="expired"):
        book.authenticate("aa.s1", 100.0)
    for bad in ("aa.wrong", "bb.s2", "aa", "", ".s1", "boot2"):
        with pytest.raises(Unauthenticated):
            book.authenticate(bad, 0)
    book.remove(["aa"])
    with pytest.raises(Unauthenticated):
        book.authenticate("aa.s1", 0)


def test_refusals_name_the_role_and_what_it_lacks():
    viewer = Principal("v", "viewer")
    viewer.require("read", "read")
    with pytest.raises(Refused) as info:
        viewer.require("run", "create jobs")
    assert info.value.role == "viewer" and info.value.lacks == "run"
    assert "may not create jobs" in info.value.reason
    scoped = Principal("o", "operator", target="t")
    scoped.require_recipients({"a"}, {"a", "b"})
    with pytest.raises(Refused) as info:
        scoped.require_recipients({"a", "c"}, {"a", "b"})
    assert info.value.lacks == "scope" and "c" in info.value.reason
    Principal("o", "operator").require_recipients({"z"}, set())  # unscoped: anything
