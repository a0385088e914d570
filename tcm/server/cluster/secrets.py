"""The secrets every node of a cluster shares, taken from the database at startup.

The first node to start puts its CA (certificate, and key *sealed* with the cluster key)
and its admin token (sealed too) in `cluster_secrets`; every later node takes them from
there and writes them into its state directory as a single node keeps them, so
`tcm --state-dir DIR` works against any node. The cluster key is a file every node is given
(`--cluster-key FILE`, a Fernet key: AES-128-CBC with HMAC-SHA256, from `cryptography`);
without it the database holds nothing that signs a certificate or opens the admin API.
This runs once, blocking, before the reactor starts: the listeners need the CA.
"""

from __future__ import annotations

import json
import os
import secrets
import time

import attrs
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy.engine import Engine

from tcm.server.ca import CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority
from tcm.store.cluster import claim_secret
from tcm.tls import pki

ADMIN_TOKEN_FILE = "admin.token"


class ClusterKeyError(Exception):
    """The cluster key is missing, unreadable, or does not open the cluster's secrets."""


def load_or_create_key(path: str) -> Fernet:
    """The cluster key in `path`; made (mode 0600) when the file does not exist, so the first
    node of a cluster on one machine needs no extra step. Give every node the same file."""
    if not os.path.exists(path):
        pki.write_private(path, Fernet.generate_key() + b"\n")
    with open(path, "rb") as f:
        raw = f.read().strip()
    try:
        return Fernet(raw)
    except ValueError:
        raise ClusterKeyError(
            f"{path} is not a cluster key (32 url-safe base64 bytes, as made by "
            f"Fernet.generate_key())"
        ) from None


@attrs.frozen
class ClusterIdentity:
    """What the node took from the cluster: its id (the bus's key prefix) and whether this
    node made the CA."""

    cluster_id: str
    created_ca: bool


def join(engine: Engine, key: Fernet, state_dir: str, node: str) -> ClusterIdentity:
    """Take (or, as the first node, put) the cluster's CA and admin token; write them into
    `state_dir`. ClusterKeyError when the key does not open them, or when the state directory
    holds another CA (its agents would be cut off)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    now = time.time()
    cert_path = os.path.join(state_dir, CA_CERT_FILE)
    key_path = os.path.join(state_dir, CA_KEY_FILE)
    token_path = os.path.join(state_dir, ADMIN_TOKEN_FILE)
    local_ca = _read(cert_path), _read(key_path)
    if local_ca[0] and local_ca[1]:
        mine_key, mine_cert = local_ca[1], local_ca[0]
    else:
        mine_key, mine_cert = CertificateAuthority.new_pem()
    offered = json.dumps(
        {"cert": mine_cert.decode(), "key": key.encrypt(mine_key).decode()}, sort_keys=True
    )
    held = claim_secret(engine, "ca", offered, now, node)
    ca = json.loads(held)
    try:
        ca_key = key.decrypt(ca["key"].encode())
    except InvalidToken:
        raise ClusterKeyError(
            "the cluster key does not open the cluster's CA: give every node the same "
            "--cluster-key file as the first node"
        ) from None
    ca_cert = ca["cert"].encode()
    if local_ca[0] and local_ca[0].strip() != ca_cert.strip():
        raise ClusterKeyError(
            f"{cert_path} is another CA than the cluster's: this state directory belongs to "
            f"another installation (use a new --state-dir for this node)"
        )
    if not local_ca[1]:
        pki.write_private(key_path, ca_key)
    if not local_ca[0]:
        pki.write_public(cert_path, ca_cert)
    local_token = _read(token_path)
    token = local_token.strip().decode() if local_token else secrets.token_urlsafe(32)
    held_token = claim_secret(
        engine, "admin.token", key.encrypt(token.encode()).decode(), now, node
    )
    try:
        cluster_token = key.decrypt(held_token.encode()).decode()
    except InvalidToken:
        raise ClusterKeyError("the cluster key does not open the cluster's admin token") from None
    if local_token is None or local_token.strip().decode() != cluster_token:
        pki.write_private(token_path, cluster_token.encode() + b"\n")
    cluster_id = claim_secret(engine, "cluster.id", secrets.token_hex(6), now, node)
    return ClusterIdentity(cluster_id=cluster_id, created_ca=held == offered)


def _read(path: str) -> bytes | None:
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()
