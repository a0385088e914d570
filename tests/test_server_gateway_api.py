"""The server's side of gateways, in process over real TLS: registering a gateway, revoking
agents, the certificate a reverse proxy forwards, the server's name in agent certificates."""

from __future__ import annotations

from urllib.parse import quote

import pytest_twisted
from cryptography import x509
from cryptography.x509.oid import NameOID

from tcm.server.ca import CertificateAuthority
from tcm.tls import pki
from tests.inproc import inproc_server  # noqa: F401  (fixture)

HEADER = b"x-tcm-client-cert"


async def _node(server, name: str = "gw1"):
    """A gateway registered and enrolled: its certificate `node:NAME` and key."""
    reply = await server.admin("POST", "/api/v1/gateways", {"name": name})
    assert reply.status == 201, reply
    key = pki.generate_key()
    csr = pki.make_csr(key, common_name=f"node:{name}").decode()
    secret = reply.body["token"].split(".", 1)[1]
    enrolled = await server.https(
        "POST", "/link/v1/enroll", {"name": name, "token": secret, "csr": csr}
    )
    assert enrolled.status == 201 and enrolled.body["role"] == "gateway", enrolled
    return enrolled.body["certificate"].encode(), pki.key_to_pem(key)


@pytest_twisted.ensureDeferred
async def test_agent_certificates_name_their_server(inproc_server):  # noqa: F811
    agent = await inproc_server.enroll_identity()
    status = await inproc_server.admin("GET", "/api/v1/status")
    cert = x509.load_pem_x509_certificate(agent.cert_pem)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert ou and ou[0].value == status.body["name"]
    assert status.body["name"].startswith("s-")


@pytest_twisted.ensureDeferred
async def test_gateways_listing_and_bad_registrations(inproc_server):  # noqa: F811
    await _node(inproc_server)
    listing = await inproc_server.admin("GET", "/api/v1/gateways")
    (gw,) = listing.body["gateways"]
    assert gw["name"] == "gw1" and gw["state"] == "down" and gw["links"] == []
    bad = await inproc_server.admin("POST", "/api/v1/gateways", {"name": "Bad Name"})
    assert bad.status == 400 and "node name" in bad.body["error"]
    bad = await inproc_server.admin("POST", "/api/v1/gateways", {"name": "gw2", "max_clients": 5})
    assert bad.status == 400 and "task servers" in bad.body["error"]
    again = await inproc_server.admin("POST", "/api/v1/gateways", {"name": "gw1"})
    assert again.status == 201  # a new one-time token: the gateway may enroll again
    await inproc_server.admin("POST", "/api/v1/taskservers", {"name": "ts1"})
    clash = await inproc_server.admin("POST", "/api/v1/gateways", {"name": "ts1"})
    assert clash.status == 409 and "already registered as a taskserver" in clash.body["error"]


@pytest_twisted.ensureDeferred
async def test_revoke_refuses_the_agent_from_then_on(inproc_server):  # noqa: F811
    agent = await inproc_server.enroll_identity()
    ok = await inproc_server.agent_https("GET", "/agent/v1/whoami", identity=agent)
    assert ok.status == 200
    path = f"/api/v1/agents/{agent.agent_id}/revoke"
    first = await inproc_server.admin("POST", path, {})
    assert first.status == 200 and first.body["changed"] is True
    second = await inproc_server.admin("POST", path, {})
    assert second.body["changed"] is False
    refused = await inproc_server.agent_https("GET", "/agent/v1/whoami", identity=agent)
    assert refused.status == 403 and "revoked" in refused.body["error"]
    unknown = await inproc_server.admin("POST", "/api/v1/agents/a-0000/revoke", {})
    assert unknown.status == 404


@pytest_twisted.ensureDeferred
async def test_forwarded_certificate_is_taken_only_from_an_enrolled_node(
    inproc_server,  # noqa: F811
    tmp_path,
):
    agent = await inproc_server.enroll_identity()
    other = await inproc_server.enroll_identity()
    forwarded = {HEADER: [quote(other.cert_pem.decode()).encode()]}
    # an agent cannot pose as another one with the header
    posing = await inproc_server.https(
        "GET", "/agent/v1/whoami", headers=forwarded, cert_pem=agent.cert_pem, key_pem=agent.key_pem
    )
    assert posing.status == 403 and "only taken from an enrolled node" in posing.body["error"]
    # a node (nginx with a gateway's certificate) forwards an agent's certificate
    node_cert, node_key = await _node(inproc_server)
    via = await inproc_server.https(
        "GET", "/agent/v1/whoami", headers=forwarded, cert_pem=node_cert, key_pem=node_key
    )
    assert via.status == 200 and via.body["agent_id"] == other.agent_id
    # a certificate from another CA is refused even from a node
    foreign_ca = CertificateAuthority.load_or_create(str(tmp_path / "foreign"))
    forged = foreign_ca.sign_csr(pki.make_csr(pki.generate_key()), other.agent_id)
    refused = await inproc_server.https(
        "GET",
        "/agent/v1/whoami",
        headers={HEADER: [quote(forged.decode()).encode()]},
        cert_pem=node_cert,
        key_pem=node_key,
    )
    assert refused.status == 403 and "not issued by this tcm CA" in refused.body["error"]
    garbage = await inproc_server.https(
        "GET", "/agent/v1/whoami", headers={HEADER: [b"nope"]}, cert_pem=node_cert, key_pem=node_key
    )
    assert garbage.status == 403 and "forwarded client certificate refused" in garbage.body["error"]
