"""The cluster's shared CA and admin token (tcm/server/cluster/secrets.py): the first node
puts them in the store (the CA key sealed with the cluster key), later nodes take them; a
wrong key or another CA in a node's state directory is refused, saying why."""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tcm.server.ca import CertificateAuthority
from tcm.server.cluster.secrets import ClusterKeyError, join, load_or_create_key
from tcm.store import make_engine, upgrade
from tcm.store.cluster import read_secret


@pytest.fixture
def engine(tmp_path: Any):
    engine = make_engine(f"sqlite:///{tmp_path / 'shared.sqlite'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_later_nodes_take_the_first_nodes_ca_and_token(tmp_path: Any, engine: Any) -> None:
    key = load_or_create_key(str(tmp_path / "cluster.key"))
    assert stat.S_IMODE(os.stat(tmp_path / "cluster.key").st_mode) == 0o600
    first = join(engine, key, str(tmp_path / "n1"), "n1")
    second = join(engine, key, str(tmp_path / "n2"), "n2")
    assert first.created_ca and not second.created_ca
    assert first.cluster_id == second.cluster_id
    for name in ("ca.pem", "ca.key", "admin.token"):
        assert read(str(tmp_path / "n1" / name)) == read(str(tmp_path / "n2" / name))
    for name in ("ca.key", "admin.token"):
        assert stat.S_IMODE(os.stat(tmp_path / "n2" / name).st_mode) == 0o600
    # the CA key is sealed in the store: not its PEM
    stored = read_secret(engine, "ca") or ""
    assert b"PRIVATE KEY" not in stored.encode()
    assert b"PRIVATE KEY" in read(str(tmp_path / "n2" / "ca.key"))
    CertificateAuthority.load_or_create(str(tmp_path / "n2"))  # a working CA
    # a node started again takes the same, changes nothing
    before = read(str(tmp_path / "n1" / "ca.pem"))
    again = join(engine, key, str(tmp_path / "n1"), "n1")
    assert again.cluster_id == first.cluster_id and not again.created_ca
    assert read(str(tmp_path / "n1" / "ca.pem")) == before


def test_a_single_servers_ca_becomes_the_clusters(tmp_path: Any, engine: Any) -> None:
    """The first node's state directory already has a CA (a single server joining): that
    CA, its agents' trust, is the cluster's."""
    ca = CertificateAuthority.load_or_create(str(tmp_path / "n1"))
    key = load_or_create_key(str(tmp_path / "cluster.key"))
    join(engine, key, str(tmp_path / "n1"), "n1")
    join(engine, key, str(tmp_path / "n2"), "n2")
    assert read(str(tmp_path / "n2" / "ca.pem")) == ca.cert_pem


def test_another_key_is_refused(tmp_path: Any, engine: Any) -> None:
    join(engine, load_or_create_key(str(tmp_path / "k1")), str(tmp_path / "n1"), "n1")
    other = Fernet(Fernet.generate_key())
    with pytest.raises(ClusterKeyError, match="same --cluster-key file"):
        join(engine, other, str(tmp_path / "n2"), "n2")
    assert not os.path.exists(tmp_path / "n2" / "ca.key")


def test_another_ca_in_the_state_directory_is_refused(tmp_path: Any, engine: Any) -> None:
    key = load_or_create_key(str(tmp_path / "k"))
    join(engine, key, str(tmp_path / "n1"), "n1")
    CertificateAuthority.load_or_create(str(tmp_path / "n2"))  # another installation's
    with pytest.raises(ClusterKeyError, match="another CA than the cluster's"):
        join(engine, key, str(tmp_path / "n2"), "n2")


def test_a_file_that_is_no_key_is_refused(tmp_path: Any) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    with pytest.raises(ClusterKeyError, match="is not a cluster key"):
        load_or_create_key(str(bad))
