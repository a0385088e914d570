"""Certificates renew (issue 16.4): real server and agent processes on loopback.

The server issues agent certificates of two minutes (`--agent-cert-lifetime 2m`); the agent
renews at 30 % of the life (`--renew-at 0.3`) over its session, keeps its identity, shows the
new serial in `tcm-agent status --json`, still runs jobs; the old certificate keeps working
until it expires. An agent whose certificate expired says to enroll again.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request

import pytest
from cryptography import x509

from tcm.server.ca import CertificateAuthority
from tcm.tls import pki
from tests.harness import PYTHON, AgentProc, Server, agent_status, wait_until


def _whoami(server: Server, cert_path: str, key_path: str) -> dict:
    ctx = ssl.create_default_context(cafile=server.ca)
    ctx.load_cert_chain(cert_path, key_path)
    with urllib.request.urlopen(f"{server.url}/agent/v1/whoami", context=ctx, timeout=10) as r:
        return json.loads(r.read())


def _agent_cli(agent: AgentProc, command: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "tcm.cli.agent", "--state-dir", agent.state_dir, command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def _ping(server: Server) -> dict:
    out = server.cli("run", "ping", "--targets", "all", "--json")
    job_id = json.loads(out)["job"]
    return wait_until(
        lambda: (r := server.job(job_id)["results"][0])["state"] in ("succeeded", "failed") and r,
        30,
        0.2,
        "the ping to finish",
    )


def test_agent_renews_its_certificate_over_its_session(tmp_path):
    server = Server(str(tmp_path), extra=["--agent-cert-lifetime", "2m"])
    server.start()
    agent = AgentProc(str(tmp_path), "agent", server, server.token(), extra=["--renew-at", "0.3"])
    try:
        agent.start()
        first = agent_status(agent)["certificate"]
        assert 100 < first["not_after"] - time.time() <= 125  # two minutes, as the server says
        old_cert = str(tmp_path / "old-cert.pem")
        old_key = str(tmp_path / "old-key.pem")
        shutil.copy(os.path.join(agent.state_dir, "cert.pem"), old_cert)
        shutil.copy(os.path.join(agent.state_dir, "key.pem"), old_key)

        renewed = wait_until(
            lambda: (c := agent_status(agent)["certificate"])["serial"] != first["serial"] and c,
            90,
            0.5,
            "the certificate to renew",
        )
        assert renewed["not_after"] > first["not_after"]
        assert renewed["last_error"] is None and renewed["expired"] is False
        assert "certificate renewed" in agent.log()
        with open(os.path.join(agent.state_dir, "cert.pem"), "rb") as f:
            on_disk = pki.load_certificate(f.read())
        assert f"{on_disk.serial_number:x}" == renewed["serial"]
        assert pki.common_name(on_disk) == agent.agent_id  # the same identity
        assert not os.path.exists(os.path.join(agent.state_dir, "key.next.pem"))

        # the old certificate keeps working until it expires; the new one works too
        assert _whoami(server, old_cert, old_key)["agent_id"] == agent.agent_id
        assert (
            _whoami(
                server,
                os.path.join(agent.state_dir, "cert.pem"),
                os.path.join(agent.state_dir, "key.pem"),
            )["agent_id"]
            == agent.agent_id
        )
        assert f"renewed its certificate (serial {renewed['serial']}" in server.log()

        # the old certificate ends when it expires; a new session of the running agent
        # presents the new one, and jobs still run
        wait_until(lambda: time.time() > first["not_after"] + 1, 150, 1.0, "the old one to end")
        with pytest.raises(OSError):
            _whoami(server, old_cert, old_key)
        opened = agent.count(AgentProc.SESSION_OPEN)
        _agent_cli(agent, "disconnect")
        _agent_cli(agent, "reconnect")
        agent.wait_session(opened + 1)
        assert _ping(server)["state"] == "succeeded"
    finally:
        agent.stop()
        server.stop()


def test_expired_certificate_says_enroll_again(tmp_path):
    server = Server(str(tmp_path))
    server.start()
    agent = AgentProc(str(tmp_path), "agent", server, server.token())
    try:
        agent.start()
        agent_id = agent.agent_id
        agent.stop()
        # the agent was offline through its certificate's whole life: one that ended an hour ago
        an_hour_ago = time.time() - 3600
        ca = CertificateAuthority.load_or_create(server.state_dir, clock=lambda: an_hour_ago - 600)
        with open(os.path.join(agent.state_dir, "key.pem"), "rb") as f:
            key = pki.load_key(f.read())
        expired = ca.sign_csr(pki.make_csr(key), agent_id, lifetime=datetime.timedelta(seconds=600))
        pki.write_public(os.path.join(agent.state_dir, "cert.pem"), expired)

        restarted = AgentProc(str(tmp_path), "agent")  # no token: it cannot enroll by itself
        restarted.start(wait=False)
        try:
            status = wait_until(
                lambda: (
                    os.path.exists(os.path.join(agent.state_dir, "control.sock"))
                    and agent_status(restarted)
                ),
                30,
                0.2,
                "the agent's control socket",
            )
            cert = status["certificate"]
            assert cert["expired"] is True
            assert "enroll again with a token" in cert["last_error"]
            assert "enroll again with a token" in restarted.log()
            time.sleep(3)  # no TLS failure loop: it does not try to connect at all
            again = agent_status(restarted)
            assert again["reconnect_attempts"] == 0
            assert again["mode"] != "persistent"
            assert "certificate verify failed" not in restarted.log()
        finally:
            restarted.stop()
    finally:
        agent.stop()
        server.stop()


def test_an_interrupted_renewal_is_put_in_place_or_dropped(tmp_path):
    from tcm.agent.renewal import promote_renewed

    d = str(tmp_path)

    def write(name: str, text: str) -> None:
        with open(os.path.join(d, name), "w") as f:
            f.write(text)

    def read(name: str) -> str:
        with open(os.path.join(d, name)) as f:
            return f.read()

    write("key.pem", "old key")
    write("cert.pem", "old cert")
    write("key.next.pem", "new key")  # the certificate never came
    promote_renewed(d)
    assert (read("key.pem"), read("cert.pem")) == ("old key", "old cert")
    assert not os.path.exists(os.path.join(d, "key.next.pem"))

    write("key.next.pem", "new key")
    write("cert.next.pem", "new cert")  # both written, none renamed yet
    promote_renewed(d)
    assert (read("key.pem"), read("cert.pem")) == ("new key", "new cert")

    write("key.pem", "newer key")  # the key renamed, then a crash before the certificate
    write("cert.next.pem", "newer cert")
    promote_renewed(d)
    assert (read("key.pem"), read("cert.pem")) == ("newer key", "newer cert")
    assert sorted(os.listdir(d)) == ["cert.pem", "key.pem"]


def test_the_self_made_server_certificate_renews_itself(tmp_path):
    from tcm.server.certificates import Certificates, ServerTLS
    from tcm.server.config import ServerConfig

    now = [time.time()]
    ca = CertificateAuthority.load_or_create(str(tmp_path), clock=lambda: now[0])
    config = ServerConfig(state_dir=str(tmp_path), hostnames=["tcm.example"])
    tls = ServerTLS(Certificates(ca, unit="s1", clock=lambda: now[0]), config)

    def served() -> x509.Certificate:
        return tls.serverConnectionForTLS(None).get_certificate().to_cryptography()

    first = served()
    assert first.not_valid_after_utc - first.not_valid_before_utc <= datetime.timedelta(days=398)
    now[0] += 200 * 86400  # half its life: kept
    assert tls.check() is False and served().serial_number == first.serial_number
    now[0] += 100 * 86400  # past two thirds: a new one, for new connections
    assert tls.check() is True
    second = served()
    assert second.serial_number != first.serial_number
    assert second.not_valid_after_utc > first.not_valid_after_utc
    with open(os.path.join(str(tmp_path), "server.pem"), "rb") as f:
        assert pki.load_certificate(f.read()).serial_number == second.serial_number
    assert pki.names_in(pki.cert_to_pem(second), ["tcm.example"])


def test_an_admins_server_certificate_is_left_alone(tmp_path):
    from tcm.server.certificates import Certificates, ServerTLS
    from tcm.server.config import ServerConfig

    now = [time.time()]
    ca = CertificateAuthority.load_or_create(str(tmp_path / "ca"), clock=lambda: now[0])
    key_pem, cert_pem = ca.issue_server_certificate(["own.example"], days=10)
    pki.write_private(str(tmp_path / "own.key"), key_pem)
    pki.write_public(str(tmp_path / "own.pem"), cert_pem)
    config = ServerConfig(
        state_dir=str(tmp_path), cert=str(tmp_path / "own.pem"), key=str(tmp_path / "own.key")
    )
    tls = ServerTLS(Certificates(ca, unit="s1", clock=lambda: now[0]), config)
    now[0] += 9 * 86400
    assert tls.check() is False and tls.cert_pem == cert_pem


class _CAOverAPI:
    """The agent API's renew call answered by a real CA (as AgentAPI.renew would), or
    failing while `down` is set."""

    def __init__(self, ca: CertificateAuthority, lifetime: datetime.timedelta):
        self.ca = ca
        self.lifetime = lifetime
        self.down = False
        self.calls = 0

    def call(self, method: str, path: str, body=None, timeout=None, via=None):
        from twisted.internet.defer import fail, succeed

        from tcm.agent.link import CallFailed, Response

        self.calls += 1
        assert (method, path) == ("POST", "/agent/v1/renew")
        if self.down:
            return fail(CallFailed("POST /agent/v1/renew over HTTPS: connection refused"))
        cert = self.ca.sign_csr(body["csr"].encode(), "a-1", lifetime=self.lifetime)
        return succeed(Response(200, {"certificate": cert.decode(), "ca": ""}, "https"))


def test_renewal_is_scheduled_retried_and_put_in_force(tmp_path):
    from twisted.internet.task import Clock

    from tcm.agent.link import Identity
    from tcm.agent.renewal import RETRY, CertificateRenewal

    clock = Clock()
    clock.advance(time.time())
    ca = CertificateAuthority.load_or_create(str(tmp_path / "ca"), clock=clock.seconds)
    lifetime = datetime.timedelta(hours=3)
    api = _CAOverAPI(ca, lifetime)
    key = pki.generate_key()
    identity = Identity(
        ca_pem=ca.cert_pem,
        cert_pem=ca.sign_csr(pki.make_csr(key), "a-1", lifetime=lifetime),
        key_pem=pki.key_to_pem(key),
    )
    old_options = identity.options_now("tcm.example")
    renewal = CertificateRenewal(clock, str(tmp_path), identity, api, fraction=0.5)
    renewal.start()
    first = renewal.status()
    assert first is not None and api.calls == 0
    # due at half the span from not_before (3 h and the 5 min of skew) to not_after
    clock.advance(first["renew_at"] - clock.seconds() - 1)
    assert api.calls == 0
    api.down = True
    clock.advance(1)
    assert api.calls == 1 and "connection refused" in renewal.status()["last_error"]
    api.down = False
    clock.advance(RETRY)
    assert api.calls == 2
    second = renewal.status()
    assert second["serial"] != first["serial"] and second["last_error"] is None
    assert identity.options_now("tcm.example") is not old_options  # new connections: new cert
    with open(tmp_path / "cert.pem", "rb") as f:
        assert f.read() == identity.cert_pem
    with open(tmp_path / "key.pem", "rb") as f:
        assert f.read() == identity.key_pem
    clock.advance(RETRY)
    assert api.calls == 2  # not again until the new certificate is due
    clock.advance(second["renew_at"] - clock.seconds())
    assert api.calls == 3
    renewal.stop()


def test_a_gateway_worker_takes_the_certificate_another_worker_renewed(tmp_path):
    """Workers share the state directory; the first renews, the others follow the files."""
    from twisted.internet.task import Clock

    from tcm.tls.identity import Identity
    from tcm.tls.renewal import FollowRenewals

    ca = CertificateAuthority.load_or_create(str(tmp_path / "ca"))
    d = tmp_path / "node"
    d.mkdir()

    def issue() -> tuple[bytes, bytes]:
        key = pki.generate_key()
        cert = ca.sign_csr(pki.make_csr(key, "node:gw1"), "node:gw1", days=1)
        return cert, pki.key_to_pem(key)

    cert1, key1 = issue()
    (d / "cert.pem").write_bytes(cert1)
    (d / "key.pem").write_bytes(key1)
    identity = Identity(ca.cert_pem, cert1, key1)
    old_options = identity.options_now("gw.example")
    clock = Clock()
    follow = FollowRenewals(clock, str(d), identity, every=30)
    follow.start()
    assert identity.cert_pem == cert1
    cert2, key2 = issue()
    (d / "key.pem").write_bytes(key2)  # the key renamed, the certificate not yet: wait
    clock.advance(30)
    assert identity.cert_pem == cert1
    (d / "cert.pem").write_bytes(cert2)
    clock.advance(30)
    assert (identity.cert_pem, identity.key_pem) == (cert2, key2)
    assert identity.options_now("gw.example") is not old_options  # new connections: new cert
    follow.stop()
    assert not clock.getDelayedCalls()
