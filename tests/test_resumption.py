"""Resumption tokens (tcm.tls.resumption): what a token seals, when it opens, and the
welcome's `resume` field as the agent reads it. The handshakes themselves, over real TLS on
loopback: tests/test_tls.py ("resumption tokens")."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from tcm.tls.resumption import (
    EPOCH,
    TOKEN_LIFETIME,
    Resumed,
    ResumptionKeys,
    read_token_message,
    token_message,
)

NOW = 1_800_000_000.0
PEER = Resumed("a-0123456789abcdef0123", "alpha", "ab" * 32, NOW + 365 * 86400)


def test_a_token_opens_with_what_it_sealed_and_the_same_psk():
    keys = ResumptionKeys(b"s" * 32)
    identity, psk, lifetime = keys.issue(PEER, NOW)
    assert lifetime == TOKEN_LIFETIME and len(psk) == 48
    assert PEER.agent_id.encode() not in identity  # sealed: the identity goes in the clear
    # a server restarted with the same secret opens it, days later
    assert ResumptionKeys(b"s" * 32).open(identity, NOW + 3 * 86400) == (PEER, psk)
    # two tokens for the same agent differ (nonce), and so do their PSKs
    again, psk2, _ = keys.issue(PEER, NOW)
    assert again != identity and psk2 != psk


def test_a_token_does_not_open_elsewhere_late_or_altered():
    keys = ResumptionKeys(b"s" * 32)
    identity, _, lifetime = keys.issue(PEER, NOW)
    assert ResumptionKeys(b"t" * 32).open(identity, NOW) is None  # another server's
    assert keys.open(identity, NOW + lifetime) is None  # expired
    assert keys.open(identity, NOW - 2 * EPOCH) is None  # from an epoch to come
    for at in (0, 5, 20, len(identity) - 1):  # header, nonce, sealed text, tag
        flipped = bytearray(identity)
        flipped[at] ^= 1
        assert keys.open(bytes(flipped), NOW) is None, at
    assert keys.open(identity[:20], NOW) is None
    assert keys.open(b"\x01" + os.urandom(2000), NOW) is None  # too long to be one


def test_a_token_never_outlives_its_certificate():
    keys = ResumptionKeys(b"s" * 32)
    soon = Resumed("a-1", None, "cd" * 32, NOW + 3600)
    identity, psk, lifetime = keys.issue(soon, NOW)
    assert lifetime == 3600
    assert keys.open(identity, NOW + 3599) == (soon, psk)
    assert keys.open(identity, NOW + 3600) is None
    with pytest.raises(ValueError, match="expired"):
        keys.issue(Resumed("a-1", None, "cd" * 32, NOW - 1), NOW)


def test_the_secret_is_made_once_private_and_a_cluster_derives_one():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "resumption.key")
        first = ResumptionKeys.load_or_create(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        identity, psk, _ = first.issue(PEER, NOW)
        assert ResumptionKeys.load_or_create(path).open(identity, NOW) == (PEER, psk)
    node_a = ResumptionKeys.from_shared_secret(b"the cluster key")
    node_b = ResumptionKeys.from_shared_secret(b"the cluster key")
    identity, psk, _ = node_a.issue(PEER, NOW)
    assert node_b.open(identity, NOW) == (PEER, psk)
    with pytest.raises(ValueError, match="16 bytes"):
        ResumptionKeys(b"short")


def test_the_welcome_field_round_trips_and_bad_ones_are_ignored():
    keys = ResumptionKeys(b"s" * 32)
    identity, psk, lifetime = keys.issue(PEER, NOW)
    message = token_message(identity, psk, lifetime)
    assert read_token_message(message) == (identity, psk, round(lifetime, 1))
    b64 = base64.b64encode
    for bad in (
        None,
        "token",
        {},
        {**message, "identity": "not base64!"},
        {**message, "key": b64(b"short").decode()},
        {**message, "lifetime": 0},
        {**message, "lifetime": "soon"},
        {**message, "identity": ""},
        {**message, "identity": b64(b"x" * 2000).decode()},
    ):
        assert read_token_message(bad) is None, bad


def test_examine_says_why_a_token_does_not_open():
    keys = ResumptionKeys(b"s" * 32)
    identity, psk, lifetime = keys.issue(PEER, NOW)
    assert keys.examine(identity, NOW) == (PEER, psk)
    # another server's, another cluster's or gateway's, or a forged one: not sealed here
    assert ResumptionKeys(b"t" * 32).examine(identity, NOW) == "sealed with other keys"
    assert keys.examine(b"\x01" + os.urandom(60), NOW) == "sealed with other keys"
    assert keys.examine(identity, NOW - 2 * EPOCH) == "sealed with other keys"  # epoch to come
    assert keys.examine(identity, NOW + lifetime) == "expired"
    assert keys.examine(identity, NOW + lifetime + 3 * EPOCH) == "expired"  # keys long gone
    soon = Resumed("a-1", None, "cd" * 32, NOW + 3600)
    short, _, _ = ResumptionKeys(b"s" * 32, lifetime=86400).issue(soon, NOW)
    assert keys.examine(short, NOW + 3600) == "its certificate has expired"
    assert keys.examine(b"\x02" + identity[1:], NOW) == "not a token"  # another version
    assert keys.examine(identity[:20], NOW) == "not a token"
    assert keys.examine(b"\x01" + os.urandom(2000), NOW) == "not a token"


def test_the_agent_keeps_a_token_per_place_and_drops_it_for_a_welcome_without_one():
    from tcm.tls.identity import RESUME_KEY, Identity

    class Handle:
        def __init__(self, where: str) -> None:
            setattr(self, RESUME_KEY, where)

        def get_session(self):
            return None  # no ticket: only the token is at stake here

    class Transport:
        def __init__(self, where: str) -> None:
            self.handle = Handle(where)

        def getHandle(self):
            return self.handle

    identity = Identity(b"ca", clock=lambda: NOW)
    keys = ResumptionKeys(b"s" * 32)
    message = token_message(*keys.issue(PEER, NOW))
    gateway, server = Transport("gw.example:8445"), Transport("gw.example:8443")
    assert identity.remember_tls_session(gateway, message)
    assert identity.token_for("gw.example:8445") is not None
    assert identity.token_for("gw.example:8443") is None  # another port, another process
    assert identity.remember_tls_session(server, message)
    # a welcome from there without a token (a gateway of an older version): dropped
    assert not identity.remember_tls_session(gateway, None)
    assert identity.token_for("gw.example:8445") is None
    assert identity.token_for("gw.example:8443") is not None
