"""The all-in-one with its gateway, real processes: `twistd tcm --port P --gateway-port G` runs
the management server, the embedded task server and an internet gateway in one reactor; an
agent enrolled through the gateway's port (`/upstream/NAME`) runs jobs over it, and the
server lists the gateway like any; its second endpoint (`--gateway-listen tcm:unix:...`)
presents the gateway's node certificate."""

from __future__ import annotations

import json
import os
import socket
import ssl

import pytest
from cryptography import x509

from tcm import httplimits
from tests.harness import AgentProc, Server, agent_status, free_port, tls_exchange, wait_until

pytestmark = pytest.mark.integration

NAME = "solo"
ISSUED = "gateway identity local-gateway issued"


def _gateway(server: Server) -> dict | None:
    return next((g for g in server.cli_json("gateways") if g["name"] == "local-gateway"), None)


def test_an_agent_through_the_all_in_one_gateway_runs_a_job(stack):
    base, add = stack
    gw_port = free_port()
    gw_sock = os.path.join(str(base), "gw.sock")
    server = add(
        Server(
            str(base),
            plugin="tcm",
            extra=[
                "--name",
                NAME,
                "--gateway-port",
                str(gw_port),
                "--gateway-listen",
                f"tcm:unix:{gw_sock}",
            ],
        )
    )
    server.start()
    wait_until(lambda: (_gateway(server) or {}).get("state") == "up", 30, 0.1, "the gateway's link")

    agent = AgentProc(str(base), "agent")
    agent.args += [
        "--server",
        f"https://127.0.0.1:{gw_port}/upstream/{NAME}",
        "--ca-cert",
        server.ca,
        "--token",
        server.token(),
    ]
    add(agent).start()
    assert server.count("enrolled") >= 1
    assert [a["id"] for a in server.agents()] == [agent.agent_id]
    listing = wait_until(
        lambda: (lambda g: g if g and g["sessions"] == 1 else None)(_gateway(server)),
        20,
        0.1,
        "the server sees the agent's session through the gateway",
    )
    assert listing["state"] == "up" and len(listing["links"]) == 1

    # a job over the gateway's link; a task (command.run) over a task session, which goes
    # through the gateway too
    job = json.loads(server.cli("run", "ping", "--targets", "all", "--wait", "--json"))
    assert job["counts"]["succeeded"] == 1, job
    task = json.loads(
        server.cli(
            "run",
            "command.run",
            "--arg",
            'argv=["echo","via-allinone-gw"]',
            "--targets",
            "all",
            "--wait",
            "--json",
        )
    )
    assert task["counts"]["succeeded"] == 1, task
    assert task["results"][0]["result"]["stdout"] == "via-allinone-gw\n"
    assert server.count(f"gateway: agents at wss://127.0.0.1:{gw_port}/agent/v1/ws") == 1

    # the gateway's second endpoint: its own node certificate, with tcm's TLS
    context = ssl.create_default_context(cafile=server.ca)
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(10)
        raw.connect(gw_sock)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "node:local-gateway"

    # the gateway's HTTP answers a header line or a body over its limit at once (431/413)
    long_header = b"GET /agent/v1/whoami HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000
    with open(server.ca, "rb") as f:
        ca_pem = f.read()
    received, closed = tls_exchange(gw_port, ca_pem, [long_header + b"\r\n\r\n"], 10)
    assert received.startswith(b"HTTP/1.1 431 ") and closed, received[:200]
    declared = b"POST /agent/v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (
        httplimits.MAX_BODY + 1
    )
    received, closed = tls_exchange(gw_port, ca_pem, [declared], 10)
    assert received.startswith(b"HTTP/1.1 413 ") and closed, received[:200]

    # a restart keeps the gateway's identity (no second enrollment), and the agent comes back
    server.stop()
    issued = server.count(ISSUED)
    server.start()
    wait_until(
        lambda: (lambda g: g if g and g["sessions"] == 1 else None)(_gateway(server)),
        30,
        0.1,
        "the agent back through the gateway",
    )
    assert server.count(ISSUED) == issued == 1
    # the embedded gateway seals tokens with the server's keys (one process, one secret):
    # the restarted process resumed the agent's handshake at the gateway's port with the
    # token its welcome gave
    wait_until(lambda: agent_status(agent)["persistent"]["connected"], 30, 0.1, "the session back")
    assert agent_status(agent)["persistent"]["tls"]["handshake"] == "token"
    assert not os.path.exists(os.path.join(server.state_dir, "gateway", "resumption.key"))


def test_without_gateway_port_the_all_in_one_has_no_gateway(stack):
    base, add = stack
    server = add(Server(str(base), plugin="tcm"))
    server.start()
    assert server.cli_json("gateways") == []
    assert "gateway: agents at" not in server.log()
    assert ISSUED not in server.log()
