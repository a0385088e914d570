"""What an agent process loads (issue 17: one idle agent's memory).

A fresh interpreter finds the `tcm-agent` plugin as twistd does (getPlugins(IServiceMaker)),
parses its options, makes the service and starts it on an enrolled state directory, with a
memory reactor as the global reactor (no network: the session's connection is only asked
for). Then nothing of FORBIDDEN may be in sys.modules. These come later or never: treq and
`twisted.web` with the first HTTPS call (enrollment, polling, a call while the session is
down: tcm/agent/webclient.py), proxy.py with a proxy, psutil with an inventory; the server's
side (SQLAlchemy, Alembic, prometheus_client, the JSON Schema libraries) never.

What stays is the floor of Twisted, pyOpenSSL and Autobahn (docs/performance.md, "Lean
agent"): the stdlib `ssl`, for one, which `twisted.python.compat` loads (through
http.cookiejar) before twistd imports any tcm code.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python.reflect import qual

from tcm.agent.connection import PROXY_ERROR
from tcm.agent.proxy import ProxyError

FORBIDDEN = (
    "sqlalchemy",
    "alembic",
    "prometheus_client",
    "psycopg2",
    "redis",
    "jsonschema",
    "jsonschema_rs",
    "tcm.server",
    "tcm.store",
    "tcm.metrics",
    "tcm.cli",
    "tcm.gateway",
    "tcm.taskserver",
    "tcm.relay",
    "treq",
    "twisted.web",
    "tcm.agent.webclient",
    "tcm.agent.proxy",
    "psutil",
)

# Run in a fresh interpreter: argv[1] is the state directory, argv[2] "https" to make one
# HTTPS call after the start (the probe's own check that it sees a module loaded late).
PROBE = """
import json, sys
from twisted.internet.main import installReactor
from twisted.internet.testing import MemoryReactorClock

reactor = MemoryReactorClock()
installReactor(reactor)
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

maker = {p.tapname: p for p in getPlugins(IServiceMaker)}["tcm-agent"]
options = maker.options()
options.parseOptions(["--state-dir", sys.argv[1]])
service = maker.makeService(options)
service.startService()
assert service.agent is not None, "the agent did not start"
ports = [port for host, port, *_ in reactor.tcpClients]
if sys.argv[2] == "https":
    service.agent.connection.link.call_over_https("GET", "/agent/v1/profile")
    ports = [port for host, port, *_ in reactor.tcpClients]
settling = service.settler is not None and service.settler.pending
print(json.dumps({"modules": sorted(sys.modules), "ports": ports, "settling": settling}))
"""


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> bytes:
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def enrolled_state(path: str, port: int) -> None:
    """A state directory as enrollment leaves it: CA, certificate, key, agent.json."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "ca.pem": _certificate("test CA", ca_key, "test CA", ca_key, True),
        "cert.pem": _certificate("a-imports", key, "test CA", ca_key, False),
        "key.pem": key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "agent.json": json.dumps(
            {"agent_id": "a-imports", "server": f"https://127.0.0.1:{port}"}
        ).encode(),
    }
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


def started_agent(tmp_path, then: str = "idle") -> dict:
    state = str(tmp_path / "agent")
    os.makedirs(state)
    enrolled_state(state, 48443)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, state, then],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_started_agent_loads_nothing_it_does_not_run(tmp_path):
    out = started_agent(tmp_path)
    assert out["ports"] == [48443]  # it started and asked for its session's connection
    assert "tcm.agent.session" in out["modules"]
    assert loaded(out["modules"], FORBIDDEN) == []
    assert out["settling"]  # its heap is settled once quiet after the start (tcm.heap)


def test_the_first_https_call_loads_the_http_client(tmp_path):
    out = started_agent(tmp_path, then="https")
    assert out["ports"] == [48443, 48443]  # the session's connection, then the call's
    assert loaded(out["modules"], ("treq", "tcm.agent.webclient")) == [
        "tcm.agent.webclient",
        "treq",
    ] + [m for m in out["modules"] if m.startswith("treq.")]


def test_proxy_error_is_named_as_connection_checks_it():
    assert qual(ProxyError) == PROXY_ERROR
