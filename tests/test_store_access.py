"""AccessStore (db.access) on SQLite and PostgreSQL: enrollment tokens, relay nodes, API
tokens; what each consumes and refuses."""

from __future__ import annotations

import pytest
import pytest_twisted

from tcm.store import Conflict, TokenRefused, hash_secret
from tcm.store import schema as t
from tests.storedb import StoreTest

NOW = 1_700_000_000.0


class TestEnrollmentTokens(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_a_token_is_shown_once_and_stored_as_a_hash(self, db):
        token = await db.access.create_token(60.0, 2, "lab", "edge", now=NOW)
        token_id, _, secret = token.partition(".")
        assert token_id and secret
        (row,) = self.rows(db, t.enrollment_tokens)
        assert row["secret_hash"] == hash_secret(secret) != secret
        assert (row["created_at"], row["expires_at"]) == (NOW, NOW + 60.0)
        (listed,) = await db.access.list_tokens()
        assert "secret_hash" not in listed
        assert listed == {
            "id": token_id,
            "created_at": NOW,
            "expires_at": NOW + 60.0,
            "uses_left": 2,
            "used": 0,
            "description": "lab",
            "profile": "edge",
            "revoked_at": None,
        }

    @pytest_twisted.ensureDeferred
    async def test_no_ttl_never_expires_and_no_uses_is_unlimited(self, db):
        token = await db.access.create_token(None, None, now=NOW)
        for _ in range(3):
            assert await db.access.consume_token(token, NOW + 10**9) == token.split(".")[0]
        (listed,) = await db.access.list_tokens()
        assert (listed["expires_at"], listed["uses_left"], listed["used"]) == (None, None, 3)

    @pytest_twisted.ensureDeferred
    async def test_each_use_is_counted_until_used_up(self, db):
        token = await db.access.create_token(None, 2, now=NOW)
        row = await db.access.consume_token_row(token, NOW)
        assert row["id"] == token.split(".")[0] and "secret_hash" not in row
        assert (row["uses_left"], row["used"]) == (2, 0)  # as it was when consumed
        await db.access.consume_token(token, NOW)
        with pytest.raises(TokenRefused, match="used up"):
            await db.access.consume_token(token, NOW)
        (listed,) = await db.access.list_tokens()
        assert (listed["uses_left"], listed["used"]) == (0, 2)

    @pytest_twisted.ensureDeferred
    async def test_a_token_expires_at_its_end(self, db):
        token = await db.access.create_token(60.0, None, now=NOW)
        await db.access.consume_token(token, NOW + 59.9)
        with pytest.raises(TokenRefused, match="expired"):
            await db.access.consume_token(token, NOW + 60.0)

    @pytest_twisted.ensureDeferred
    async def test_a_wrong_secret_or_unknown_id_is_refused_and_uses_nothing(self, db):
        token = await db.access.create_token(None, 1, now=NOW)
        token_id = token.split(".")[0]
        for wrong in (f"{token_id}.{'0' * 48}", f"{token_id}", "nope.secret", ""):
            with pytest.raises(TokenRefused, match="unknown enrollment token"):
                await db.access.consume_token_row(wrong, NOW)
        (listed,) = await db.access.list_tokens()
        assert (listed["uses_left"], listed["used"]) == (1, 0)

    @pytest_twisted.ensureDeferred
    async def test_the_profile_comes_with_the_consumed_row(self, db):
        token = await db.access.create_token(None, None, "", "branch", now=NOW)
        assert (await db.access.consume_token_row(token, NOW))["profile"] == "branch"

    @pytest_twisted.ensureDeferred
    async def test_a_revoked_token_is_refused_at_once_and_listed_as_revoked(self, db):
        token = await db.access.create_token(None, 100, now=NOW)
        token_id = token.split(".")[0]
        await db.access.consume_token(token, NOW)
        assert await db.access.revoke_token(token_id, NOW + 5) is True
        assert await db.access.revoke_token(token_id, NOW + 6) is False  # once
        assert await db.access.revoke_token("nosuch", NOW) is None
        with pytest.raises(TokenRefused, match="revoked"):
            await db.access.consume_token(token, NOW + 7)
        (listed,) = await db.access.list_tokens()
        assert (listed["revoked_at"], listed["used"], listed["uses_left"]) == (NOW + 5, 1, 99)


class TestNodes(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_a_removed_node_is_revoked_and_its_pending_secret_withdrawn(self, db):
        secret = await db.access.register_node("ts1", "taskserver", None, 60, NOW)
        assert await db.access.remove_node("ts1", "gateway") is None  # not of that role
        assert await db.access.remove_node("nosuch", "taskserver") is None
        assert await db.access.remove_node("ts1", "taskserver") is True
        assert await db.access.remove_node("ts1", "taskserver") is False
        (row,) = await db.access.list_nodes()
        assert row["revoked"] is True
        with pytest.raises(TokenRefused):
            await db.access.enroll_node("ts1", secret, "ab" * 32, NOW + 1)

    @pytest_twisted.ensureDeferred
    async def test_a_node_enrolls_once_with_its_secret(self, db):
        secret = await db.access.register_node("ts-1", "taskserver", 500, 60.0, NOW)
        assert await db.access.enroll_node("ts-1", secret, "ab" * 32, NOW + 1) == "taskserver"
        (node,) = await db.access.list_nodes()
        assert "token_hash" not in node
        assert node["fingerprint"] == "ab" * 32
        assert (node["registered_at"], node["enrolled_at"]) == (NOW, NOW + 1)
        assert (node["max_clients"], node["revoked"]) == (500, False)
        with pytest.raises(TokenRefused, match="no enrollment pending"):
            await db.access.enroll_node("ts-1", secret, "cd" * 32, NOW + 2)

    @pytest_twisted.ensureDeferred
    async def test_a_wrong_secret_unknown_node_or_expired_secret_is_refused(self, db):
        secret = await db.access.register_node("gw-1", "gateway", None, 60.0, NOW)
        with pytest.raises(TokenRefused, match="no enrollment pending"):
            await db.access.enroll_node("gw-1", "0" * 48, "ab" * 32, NOW)
        with pytest.raises(TokenRefused, match="no enrollment pending"):
            await db.access.enroll_node("gw-2", secret, "ab" * 32, NOW)
        with pytest.raises(TokenRefused, match="expired"):
            await db.access.enroll_node("gw-1", secret, "ab" * 32, NOW + 60.0)
        (node,) = await db.access.list_nodes()
        assert node["fingerprint"] is None and node["enrolled_at"] is None

    @pytest_twisted.ensureDeferred
    async def test_registering_again_issues_a_new_secret_for_the_same_role_only(self, db):
        first = await db.access.register_node("n", "gateway", None, 60.0, NOW)
        second = await db.access.register_node("n", "gateway", 10, 60.0, NOW + 5)
        assert first != second
        with pytest.raises(TokenRefused, match="no enrollment pending"):
            await db.access.enroll_node("n", first, "ab" * 32, NOW + 6)
        with pytest.raises(TokenRefused, match="already registered as a gateway"):
            await db.access.register_node("n", "taskserver", None, 60.0, NOW + 6)
        assert await db.access.enroll_node("n", second, "ab" * 32, NOW + 6) == "gateway"
        (node,) = await db.access.list_nodes()
        assert (node["registered_at"], node["max_clients"]) == (NOW, 10)

    @pytest_twisted.ensureDeferred
    async def test_a_renewal_keeps_the_certificate_renewed_with_until_the_next(self, db):
        secret = await db.access.register_node("gw", "gateway", None, 60.0, NOW)
        await db.access.enroll_node("gw", secret, "a1" * 32, NOW)
        assert await db.access.renew_node("gw", "a1" * 32, "b2" * 32) is True
        (node,) = await db.access.list_nodes()
        assert (node["fingerprint"], node["previous_fingerprint"]) == ("b2" * 32, "a1" * 32)
        # a worker still on the old certificate asks too: from the one it has
        assert await db.access.renew_node("gw", "a1" * 32, "c3" * 32) is True
        (node,) = await db.access.list_nodes()
        assert (node["fingerprint"], node["previous_fingerprint"]) == ("c3" * 32, "b2" * 32)
        assert await db.access.renew_node("gw", "a1" * 32, "d4" * 32) is False  # done with
        assert await db.access.renew_node("nosuch", "c3" * 32, "d4" * 32) is False
        await db.access.remove_node("gw", "gateway")
        assert await db.access.renew_node("gw", "c3" * 32, "d4" * 32) is False  # removed
        secret = await db.access.register_node("gw", "gateway", None, 60.0, NOW)
        await db.access.enroll_node("gw", secret, "e5" * 32, NOW)  # enrolled afresh
        (node,) = await db.access.list_nodes()
        assert (node["fingerprint"], node["previous_fingerprint"]) == ("e5" * 32, None)

    @pytest_twisted.ensureDeferred
    async def test_nodes_report_their_url_and_are_listed_by_name(self, db):
        for name in ("b", "a", "c"):
            await db.access.register_node(name, "gateway", None, 60.0, NOW)
        await db.access.node_reported("a", "wss://a.example:8443")
        nodes = await db.access.list_nodes()
        assert [n["name"] for n in nodes] == ["a", "b", "c"]
        assert [n["url"] for n in nodes] == ["wss://a.example:8443", None, None]


class TestApiTokens(StoreTest):
    @pytest_twisted.ensureDeferred
    async def test_a_token_is_shown_once_and_listed_without_its_hash(self, db):
        token, row = await db.access.create_api_token("ci", "operator", "web", None, "admin", NOW)
        token_id, _, secret = token.partition(".")
        assert row["id"] == token_id and row["secret_hash"] == hash_secret(secret)
        (listed,) = await db.access.list_api_tokens()
        assert listed == {k: v for k, v in row.items() if k != "secret_hash"}
        (with_hash,) = await db.access.list_api_tokens(include_hashes=True)
        assert with_hash == row

    @pytest_twisted.ensureDeferred
    async def test_one_active_token_per_name(self, db):
        await db.access.create_api_token("ci", "viewer", None, NOW + 10, "admin", NOW)
        with pytest.raises(Conflict, match="revoke it first"):
            await db.access.create_api_token("ci", "admin", None, None, "admin", NOW + 1)
        assert len(await db.access.list_api_tokens()) == 1

    @pytest_twisted.ensureDeferred
    async def test_revoking_frees_the_name(self, db):
        _, old = await db.access.create_api_token("ci", "viewer", None, None, "admin", NOW)
        assert await db.access.revoke_api_token("ci", NOW + 5) == [old["id"]]
        assert await db.access.revoke_api_token("ci", NOW + 6) == []  # none active
        assert await db.access.revoke_api_token("other", NOW + 6) == []
        _, new = await db.access.create_api_token("ci", "admin", None, None, "admin", NOW + 7)
        listed = await db.access.list_api_tokens()
        assert [(r["id"], r["revoked_at"]) for r in listed] == [
            (old["id"], NOW + 5),
            (new["id"], None),
        ]
