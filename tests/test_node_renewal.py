"""Task servers and gateways renew their certificates (issue 16.4), real processes on loopback.

The server issues node certificates of two minutes (`--node-cert-lifetime 2m`); a task
server and a gateway renew at 30 % of the life (`--renew-at 0.3`) over HTTPS with the
certificate in force (POST /link/v1/renew): same name, same server names, no token. Their
links and an agent's sessions through both go on, a task still runs through
gateway -> task server, and both link again with the renewed certificate after a restart.
The renewal endpoint refuses what is not a node's certificate, and a bad CSR.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request

import pytest

from tcm.tls import pki
from tests.harness import AgentProc, GatewayProc, Server, TaskServerProc, wait_until

pytestmark = pytest.mark.integration


def _serial(path: str) -> int:
    with open(path, "rb") as f:
        return pki.load_certificate(f.read()).serial_number


def _post_renew(server: Server, cert: str | None, key: str | None, body: dict) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=server.ca)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    req = urllib.request.Request(
        f"{server.url}/link/v1/renew",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _listing(server: Server, what: str, name: str) -> dict:
    return next(x for x in server.cli_json(what) if x["name"] == name)


def test_task_server_and_gateway_renew_their_certificates_and_keep_working(stack):
    base, add = stack
    server = add(
        Server(str(base), name="alpha", extra=["--name", "alpha", "--node-cert-lifetime", "2m"])
    )
    server.start()
    ts1 = add(TaskServerProc(str(base), "ts1", server, extra=["--renew-at", "0.3"]))
    ts1.start()
    gw = add(
        GatewayProc(
            str(base),
            "gw1",
            {"srv": server},
            extra=["--upstream", f"ts1=https://127.0.0.1:{ts1.port}", "--renew-at", "0.3"],
        )
    )
    gw.start()
    wait_until(
        lambda: _listing(server, "gateways", "gw1")["task_servers"] == ["ts1"],
        30,
        0.1,
        "the gateway reaches ts1",
    )
    ts_cert = os.path.join(ts1.state_dir, "cert.pem")
    gw_cert = os.path.join(gw.state_dir, "upstreams", "srv", "cert.pem")
    with open(ts_cert, "rb") as f:
        first = pki.load_certificate(f.read())
    life = first.not_valid_after_utc - first.not_valid_before_utc
    assert 120 <= life.total_seconds() <= 135  # two minutes and a little backdating
    old_ts_serial, old_gw_serial = first.serial_number, _serial(gw_cert)

    # an agent through the gateway, its task session on ts1 through the gateway
    agent = add(AgentProc(str(base), "outside"))
    agent.args += [
        "--server",
        f"{gw.url}/upstream/srv",
        "--ca-cert",
        server.ca,
        "--token",
        server.token(),
    ]
    agent.start()
    wait_until(lambda: agent.count("task session open with ts1") >= 1, 30, 0.1, "agent on ts1")

    # both renew at 30 % of the life, over HTTPS with the certificate in force
    wait_until(
        lambda: _serial(ts_cert) != old_ts_serial and _serial(gw_cert) != old_gw_serial,
        90,
        0.5,
        "the task server and the gateway to renew",
    )
    assert ts1.count("certificate renewed") >= 1 and gw.count("certificate renewed") >= 1
    assert server.count("node ts1 renewed its certificate") >= 1
    assert server.count("node gw1 renewed its certificate") >= 1
    with open(ts_cert, "rb") as f:
        renewed = pki.load_certificate(f.read())
    assert pki.common_name(renewed) == "node:ts1"
    assert pki.server_names(renewed) == pki.server_names(first)  # same names
    assert renewed.not_valid_after_utc > first.not_valid_after_utc

    # the links went on: both up, and a task crosses gateway -> ts1 -> agent
    assert _listing(server, "taskservers", "ts1")["state"] == "up"
    assert _listing(server, "gateways", "gw1")["state"] == "up"
    job = json.loads(
        server.cli(
            "run",
            "command.run",
            "--arg",
            'argv=["echo","renewed"]',
            "--targets",
            "all",
            "--wait",
            "--json",
        )
    )
    assert job["counts"]["succeeded"] == 1, job
    assert job["results"][0]["result"]["stdout"] == "renewed\n"

    # restarted, each links with its renewed certificate
    ts1.stop()
    ts1.start()
    gw.stop()
    gw.start()
    wait_until(
        lambda: _listing(server, "gateways", "gw1")["task_servers"] == ["ts1"],
        30,
        0.1,
        "the restarted gateway reaches the restarted ts1",
    )
    assert "presented a certificate other than" not in server.log()
    assert "presented a certificate other than" not in ts1.log()

    # the renewal endpoint: a node's certificate only, and a CSR that is one
    status, body = _post_renew(server, None, None, {"csr": "x"})
    assert status == 403 and "node's client certificate is required" in body["error"]
    agent_cert = os.path.join(agent.state_dir, "cert.pem")
    agent_key = os.path.join(agent.state_dir, "key.pem")
    status, body = _post_renew(server, agent_cert, agent_key, {"csr": "x"})
    assert status == 403 and "node's client certificate is required" in body["error"]
    ts_key = os.path.join(ts1.state_dir, "key.pem")
    status, body = _post_renew(server, ts_cert, ts_key, {"csr": "not a CSR"})
    assert status == 400 and "bad certificate request" in body["error"], body
    status, body = _post_renew(server, ts_cert, ts_key, {})
    assert status == 400 and "csr" in body["error"], body
