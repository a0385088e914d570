#!/usr/bin/env python3
"""What TLS session resumption saves a reconnecting agent and the server: N connections in a
row over loopback, each a full handshake, then N that offer the previous session as the
agent does (`tcm.agent.link.Identity`: its last welcomed session per host), then N that
offer the resumption token the last connection's server gave (tcm.tls.resumption: what
resumes after a restart; the server makes a fresh token per connection, as its welcome
does), with tcm's own server and client TLS options and an agent certificate; one process
holds both sides, so the CPU figure is client + server per connection.

Usage: .venv/bin/python bench/tls_resume.py [--count 300] [--tls-groups X25519]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--tls-groups", default=None)
    args = p.parse_args()

    import json

    from twisted.internet import defer, endpoints, protocol, reactor

    from tcm.agent.link import Identity
    from tcm.server.ca import CertificateAuthority
    from tcm.tls import pki
    from tcm.tls.resumption import ResumptionKeys, token_message
    from tcm.tls.server import server_tls_options

    rows: list[dict] = []
    tmp = tempfile.mkdtemp(prefix="tcm-resume-")
    ca = CertificateAuthority.load_or_create(tmp)
    key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
    key = pki.generate_key()
    agent = ca.sign_csr(pki.make_csr(key), "bench-agent"), pki.key_to_pem(key)
    options = server_tls_options(key_pem, cert_pem, [ca.cert_pem], groups=args.tls_groups)
    keys = ResumptionKeys(os.urandom(32))
    with_tokens = server_tls_options(
        key_pem, cert_pem, [ca.cert_pem], groups=args.tls_groups, resumption=(keys, time.time)
    )

    class Echo(protocol.Protocol):
        def dataReceived(self, data):
            self.transport.write(data)

    class Welcome(protocol.Protocol):
        """Answers with a token, made as the server's welcome makes it (tcm.server.hub)."""

        def dataReceived(self, data):
            peer = pki.resumption_peer(self.transport)
            self.transport.write(json.dumps(token_message(*keys.issue(peer, time.time()))).encode())

    class Once(protocol.Protocol):
        def __init__(self, identity, done):
            self.identity, self.done = identity, done

        def connectionMade(self):
            self.transport.write(b"x")

        def dataReceived(self, data):
            self.reused = pki.handshake_kind(self.transport) != "full"
            resume = json.loads(data) if data != b"x" else None
            self.identity.remember_tls_session(self.transport, resume)
            self.transport.loseConnection()
            self.done.callback(self.reused)

    @defer.inlineCallbacks
    def run():
        port = yield endpoints.SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1"
        ).listen(protocol.Factory.forProtocol(Echo))
        token_port = yield endpoints.SSL4ServerEndpoint(
            reactor, 0, with_tokens, interface="127.0.0.1"
        ).listen(protocol.Factory.forProtocol(Welcome))
        for mode in ("full handshake", "resumed", "token"):
            number = (token_port if mode == "token" else port).getHost().port
            identity = Identity(ca.cert_pem, *agent)
            if mode == "token":  # the token of an earlier server (the same secret)
                yield connect_once(identity, number)
            reused = 0
            t0 = time.process_time()
            for _ in range(args.count):
                if mode == "full handshake":
                    identity.forget_tls_sessions()
                reused += yield connect_once(identity, number)
            cpu = time.process_time() - t0
            rows.append(
                {
                    "mode": mode,
                    "groups": args.tls_groups or "default",
                    "connections": args.count,
                    "resumed": reused,
                    "cpu_ms_per_connection_both_sides": round(1000 * cpu / args.count, 3),
                }
            )
        yield port.stopListening()
        yield token_port.stopListening()
        reactor.stop()

    @defer.inlineCallbacks
    def connect_once(identity, number):
        done: defer.Deferred = defer.Deferred()
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", number)
        ep = endpoints.wrapClientTLS(identity.tls_options("127.0.0.1"), tcp)
        yield endpoints.connectProtocol(ep, Once(identity, done))
        return (yield done)

    reactor.callWhenRunning(run)
    reactor.run()
    emit(
        "tls_resume",
        rows,
        [
            ("mode", "connection"),
            ("groups", "groups"),
            ("resumed", "resumed"),
            ("cpu_ms_per_connection_both_sides", "CPU ms/connection (both sides)"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
