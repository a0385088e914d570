"""TLS 1.3 resumption that survives a server restart: external pre-shared keys.

OpenSSL's session tickets are sealed with keys it makes per process, and neither pyOpenSSL
nor cryptography's bindings let a program set them, so after a restart every agent makes a
full handshake: the server signs with its key and verifies the agent's chain, the agent
verifies the server's (issue 17: 10,000 agents back after a restart). The bindings do expose
TLS 1.3's external PSK callbacks (``SSL_CTX_set_psk_find_session_callback`` and
``..._use_session_callback``), and with them the server makes its own tickets:

- at each welcome the agent gets a *resumption token* from the process its TLS ends at:
  an opaque identity (the agent's id, the name of the server it enrolled with, its
  certificate's fingerprint and expiry, the token's expiry, sealed with AES-GCM under a key
  only that process can derive) and the PSK that goes with it (``HMAC(key, identity)``).
  On a direct session the server seals it; behind a relay node (a gateway, a task server)
  the node seals it with its own keys when it accepts the connection (``issue_token``) and
  sends it in the connection's `open` on the node link, and the server puts it in the
  welcome it writes (docs/protocol.md, section 5): one welcome, whichever way it went;
- the agent offers it at its next connection to the same host; a process holding the same
  master secret (the same state directory, every node of a cluster, gateways holding
  copies of one ``resumption.key``) opens the identity, derives the PSK again and resumes: no
  certificate on the wire, both sides prove they hold the PSK (the binder, the Finished
  messages), and the key exchange still runs (psk_dhe_ke), so the session keys stay
  forward secret;
- a token the process cannot open (another's, too old, a malformed one) is not an error:
  the handshake goes on with certificates, as without one, and the listener logs why
  (``refused_token``, ``tcm.tls.handshake``). A token that opens but whose PSK the client
  does not hold fails the handshake ("binder does not verify").

The subject a token names stands in for the certificate: ``tcm.tls.pki.peer_common_name``
and its kin read it on a resumed connection, so revocation, approval and clone detection (by
the certificate's fingerprint) hold as on a full handshake. A token lives at most
``TOKEN_LIFETIME`` and never past the certificate's expiry; every welcome gives a fresh one.
Keys are derived per day (``EPOCH``) from one master secret: 32 random bytes in the state
directory of the server, gateway or task server (``resumption.key``, 0600), or derived from
the cluster key on a server node.

The PSK's cipher suite is TLS_AES_256_GCM_SHA384, OpenSSL's first choice on both sides; a
server that picks a suite with another hash (or asks the client to retry its hello) makes a
full handshake instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import struct
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from OpenSSL import SSL

from tcm import compat

__all__ = [
    "EPOCH",
    "KEY_FILE",
    "TOKEN_LIFETIME",
    "connection_of",
    "Resumed",
    "ResumptionKeys",
    "offer",
    "offer_resumption",
    "issue_token",
    "offered_token",
    "read_token_message",
    "refused_token",
    "resumed_peer",
    "serve_resumption",
    "token_message",
]

#: How long a token may be offered: a session older than this resumes with certificates
#: after a restart (every session open gives a fresh token).
TOKEN_LIFETIME = 30 * 86400.0
#: Keys are derived per epoch of this many seconds; a token names its epoch.
EPOCH = 86400
#: The identity's format version (its first byte).
_VERSION = 1
_HEADER = struct.Struct(">BI")  # version, epoch
_NONCE = 12
#: TLS_AES_256_GCM_SHA384: the PSK's suite and hash (a 48-byte PSK)
_SUITE = b"\x13\x02"
#: The most bytes of an identity the server reads (one with a long agent id is ~250)
MAX_IDENTITY = 1024
#: The attribute of a server connection that resumed with a token: its Resumed
RESUMED_ATTRIBUTE = "tcm_resumed"
_OFFER_ATTRIBUTE = "tcm_offer"
#: The attribute of a server connection whose client offered a token it could not open: why
_REFUSED_ATTRIBUTE = "tcm_token_refused"


@attrs.frozen
class Resumed:
    """What a token says of the agent that offers it (what its certificate said)."""

    agent_id: str
    server: str | None  # the OU of the certificate: the server it enrolled with
    fingerprint: str  # the certificate's SHA-256 fingerprint, lower-case hex
    cert_expires: float  # the certificate's notAfter, epoch seconds


#: The file of a service's own master secret in its state directory.
KEY_FILE = "resumption.key"


class ResumptionKeys:
    """Seals and opens resumption tokens with keys derived from one master secret."""

    def __init__(self, master: bytes, lifetime: float = TOKEN_LIFETIME):
        if len(master) < 16:
            raise ValueError("a resumption master secret needs 16 bytes or more")
        self._master = master
        self.lifetime = lifetime
        self._derived: dict[int, tuple[AESGCM, bytes]] = {}

    @classmethod
    def load_or_create(cls, path: str) -> ResumptionKeys:
        """The master secret in `path` (32 random bytes, made 0600 when missing)."""
        if not os.path.exists(path):
            from tcm.tls.pki import write_private

            write_private(path, os.urandom(32))
        with open(path, "rb") as f:
            return cls(f.read())

    @classmethod
    def of_state_dir(cls, state_dir: str) -> ResumptionKeys:
        """A service's own keys: ``STATE_DIR/resumption.key`` (made at its first start)."""
        return cls.load_or_create(os.path.join(state_dir, KEY_FILE))

    @classmethod
    def from_shared_secret(cls, secret: bytes) -> ResumptionKeys:
        """Keys every holder of `secret` (a cluster's key) derives alike."""
        return cls(hmac.new(secret, b"tcm tls resumption", hashlib.sha256).digest())

    def _keys(self, epoch: int) -> tuple[AESGCM, bytes]:
        keys = self._derived.get(epoch)
        if keys is None:
            label = struct.pack(">I", epoch)
            seal = hmac.new(self._master, b"seal" + label, hashlib.sha256).digest()
            psk = hmac.new(self._master, b"psk" + label, hashlib.sha256).digest()
            if len(self._derived) > 64:
                self._derived.clear()
            keys = self._derived[epoch] = (AESGCM(seal), psk)
        return keys

    def issue(self, peer: Resumed, now: float) -> tuple[bytes, bytes, float]:
        """(identity, psk, seconds it may be offered) for `peer`, or ValueError when its
        certificate has expired."""
        expires = min(now + self.lifetime, peer.cert_expires)
        if expires <= now:
            raise ValueError("the certificate has expired")
        epoch = int(now // EPOCH)
        seal, psk_key = self._keys(epoch)
        header = _HEADER.pack(_VERSION, epoch)
        nonce = os.urandom(_NONCE)
        payload = json.dumps(
            [peer.agent_id, peer.server, peer.fingerprint, peer.cert_expires, expires],
            separators=(",", ":"),
        ).encode()
        identity = header + nonce + seal.encrypt(nonce, payload, header)
        return identity, _psk(psk_key, identity), expires - now

    def open(self, identity: bytes, now: float) -> tuple[Resumed, bytes] | None:
        """(what the token says, its PSK) for a token this master sealed that is still
        valid, else None."""
        opened = self.examine(identity, now)
        return None if isinstance(opened, str) else opened

    def examine(self, identity: bytes, now: float) -> tuple[Resumed, bytes] | str:
        """As `open`, but for a token that does not open, why not (for a log line): "not
        a token", "sealed with other keys" (another server's or gateway's, another
        cluster's, forged or altered), "expired", "its certificate has expired"."""
        if len(identity) > MAX_IDENTITY or len(identity) < _HEADER.size + _NONCE + 16:
            return "not a token"
        version, epoch = _HEADER.unpack_from(identity)
        if version != _VERSION:
            return "not a token"
        age = now // EPOCH - epoch
        if age < 0:
            return "sealed with other keys"  # an epoch to come: not one of ours
        if age * EPOCH > self.lifetime + EPOCH:
            return "expired"
        seal, psk_key = self._keys(epoch)
        header = identity[: _HEADER.size]
        nonce = identity[_HEADER.size : _HEADER.size + _NONCE]
        try:
            payload = seal.decrypt(nonce, identity[_HEADER.size + _NONCE :], header)
        except InvalidTag:
            return "sealed with other keys"
        try:
            agent_id, server, fingerprint, cert_expires, expires = json.loads(payload)
            if now >= cert_expires:
                return "its certificate has expired"  # (a token never outlives it)
            if now >= expires:
                return "expired"
        except (ValueError, TypeError):
            return "not a token"
        return Resumed(agent_id, server, fingerprint, cert_expires), _psk(psk_key, identity)


def _psk(key: bytes, identity: bytes) -> bytes:
    return hmac.new(key, identity, hashlib.sha384).digest()


def issue_token(
    keys: ResumptionKeys | None, peer: Resumed | None, agent_id: str, now: float
) -> dict[str, Any] | None:
    """The `resume` field of a welcome for `agent_id` (`token_message`), sealed with `keys`
    (those of the process its TLS ends at) for the agent `peer` describes
    (``tcm.tls.pki.resumption_peer`` of its connection); None without keys or a peer, for
    a peer that is another agent, or one whose certificate has expired."""
    if keys is None or peer is None or peer.agent_id != agent_id:
        return None
    try:
        return token_message(*keys.issue(peer, now))
    except ValueError:  # its certificate has expired
        return None


def token_message(identity: bytes, psk: bytes, lifetime: float) -> dict[str, Any]:
    """The `resume` field of a welcome (docs/protocol.md 3.2)."""
    return {
        "identity": base64.b64encode(identity).decode("ascii"),
        "key": base64.b64encode(psk).decode("ascii"),
        "lifetime": round(lifetime, 1),
    }


def read_token_message(resume: Any) -> tuple[bytes, bytes, float] | None:
    """(identity, psk, lifetime) of a welcome's `resume`, or None when it is not one."""
    if not isinstance(resume, dict):
        return None
    try:
        identity = base64.b64decode(resume["identity"], validate=True)
        psk = base64.b64decode(resume["key"], validate=True)
        lifetime = float(resume["lifetime"])
    except (KeyError, ValueError, TypeError):
        return None
    if not identity or len(identity) > MAX_IDENTITY or len(psk) != 48 or lifetime <= 0:
        return None
    return identity, psk, lifetime


# -- OpenSSL (through tcm.compat: the binding's callbacks are not pyOpenSSL API) --------------


def serve_resumption(context: SSL.Context, keys: ResumptionKeys, clock: Any) -> bool:
    """Let `context` (a server's) resume connections that offer a token `keys` opens;
    `clock()` is the time tokens are judged by. False when this pyOpenSSL cannot."""

    def find(connection: SSL.Connection, identity: bytes) -> bytes | None:
        opened = keys.examine(identity, clock())
        if isinstance(opened, str):
            # the handshake goes on with certificates; the listener's HandshakeLogger says
            # so once it completes, with the agent and its address (refused_token)
            setattr(connection, _REFUSED_ATTRIBUTE, opened)
            return None
        peer, psk = opened
        setattr(connection, RESUMED_ATTRIBUTE, peer)
        return psk

    return compat.psk_find_session(context, find, _SUITE)


def offer_resumption(context: SSL.Context) -> bool:
    """Let connections of `context` (a client's) offer a token (`offer`). False when this
    pyOpenSSL cannot."""
    return compat.psk_use_session(context, lambda c: getattr(c, _OFFER_ATTRIBUTE, None), _SUITE)


def offer(connection: SSL.Connection, identity: bytes, psk: bytes) -> None:
    """Offer the token (identity, psk) on this client connection's handshake."""
    setattr(connection, _OFFER_ATTRIBUTE, (identity, psk))


def offered_token(connection: SSL.Connection) -> bool:
    """Whether a token was offered on this client connection (then it offered no ticket)."""
    return getattr(connection, _OFFER_ATTRIBUTE, None) is not None


def connection_of(transport: object) -> SSL.Connection | None:
    """The TLS connection under `transport` (as for ``tcm.tls.pki.peer_certificate``), or
    None when it is not TLS or already gone."""
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
    except AttributeError:
        return None
    return handle if isinstance(handle, SSL.Connection) else None


def refused_token(transport: object) -> str | None:
    """Why the server connection under `transport` did not resume with the token its
    client offered (``ResumptionKeys.examine``), or None when it offered none or resumed."""
    return getattr(connection_of(transport), _REFUSED_ATTRIBUTE, None)


def resumed_peer(transport: object) -> Resumed | None:
    """What the token said on a connection that resumed with one, else None. `transport`
    as for ``tcm.tls.pki.peer_certificate``."""
    return getattr(connection_of(transport), RESUMED_ATTRIBUTE, None)
