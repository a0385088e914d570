#!/usr/bin/env python3
"""What one server-side TLS connection costs in OpenSSL alone, with tcm's real server
context: C heap per idle connection, and CPU per full handshake on each side.

No sockets and no reactor: N client/server pairs of OpenSSL connections over memory BIOs (as
Twisted runs them), handshaken in this process with tcm's `server_tls_options` and
`pki.client_tls_options` and agent certificates from a fresh tcm CA; the client sides are
then freed, and glibc's count of bytes in use tells what the N server sides hold.

Usage: .venv/bin/python bench/tls_memory.py [--count 2000] [--tls-groups X25519]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit, heap_in_use  # noqa: E402
from OpenSSL import SSL  # noqa: E402

from tcm.server.ca import CertificateAuthority  # noqa: E402
from tcm.tls import pki  # noqa: E402
from tcm.tls.buffers import release_handshake_buffers  # noqa: E402
from tcm.tls.server import server_tls_options  # noqa: E402


class _Factory:  # what Twisted's client connection creator asks of its protocol
    _negotiate = None
    wrappedFactory = None


class _Proto:
    factory = _Factory()

    def _verifyHostname(self, *args: object) -> None:
        pass


def _pump(a: SSL.Connection, b: SSL.Connection) -> None:
    while True:
        try:
            b.bio_write(a.bio_read(65536))
        except SSL.WantReadError:
            return


def _drain(conn: SSL.Connection) -> None:
    try:
        conn.recv(65536)
    except (SSL.WantReadError, SSL.ZeroReturnError):
        pass


def handshake(server_ctx, client_creator, timing: list[float]):
    if client_creator is not None:
        client = client_creator.clientConnectionForTLS(_Proto())
    else:
        plain = SSL.Context(SSL.TLS_METHOD)
        plain.set_verify(SSL.VERIFY_NONE)
        client = SSL.Connection(plain, None)
    client.set_connect_state()
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    for _ in range(6):
        for a, b, side in ((client, server, 1), (server, client, 0)):
            t0 = time.perf_counter()
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            timing[side] += time.perf_counter() - t0
            _pump(a, b)
    # one message each way, as a session's hello and welcome; session tickets read
    client.send(b"x" * 300)
    _pump(client, server)
    _drain(server)
    server.send(b"y" * 300)
    _pump(server, client)
    _drain(client)
    return server, client


def measure(count: int, server_ctx, creators, release: bool) -> dict:
    timing = [0.0, 0.0]
    warm = [handshake(server_ctx, creators[0], timing) for _ in range(20)]
    del warm
    gc.collect()
    before = heap_in_use()
    timing = [0.0, 0.0]
    servers = []
    for i in range(count):
        server, client = handshake(server_ctx, creators[i % len(creators)], timing)
        if release:
            assert release_handshake_buffers(server)
        servers.append(server)
        del client
    gc.collect()
    after = heap_in_use()
    return {
        "group": servers[0].get_group_name(),
        "kb_per_connection": round((after - before) / count / 1024, 1),
        "server_ms_per_handshake": round(1000 * timing[0] / count, 3),
        "client_ms_per_handshake": round(1000 * timing[1] / count, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--tls-groups", default=None, help="the server's --tls-groups")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.load_or_create(tmp)
        key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
        server_ctx = server_tls_options(
            key_pem, cert_pem, [ca.cert_pem], groups=args.tls_groups
        ).getContext()
        creators = []
        for i in range(20):
            key = pki.generate_key()
            cert = ca.sign_csr(pki.make_csr(key), f"bench-agent-{i}")
            creators.append(
                pki.client_tls_options("127.0.0.1", ca.cert_pem, cert, pki.key_to_pem(key))
            )
        rows = [
            {
                "case": "agent certificate (as tcm runs)",
                **measure(args.count, server_ctx, creators, False),
            },
            {
                "case": "agent certificate, BIOs released",
                **measure(args.count, server_ctx, creators, True),
            },
            {"case": "no client certificate", **measure(args.count, server_ctx, [None], False)},
        ]
    emit(
        "tls_memory",
        rows,
        [
            ("case", "server connection"),
            ("group", "key exchange"),
            ("kb_per_connection", "KB (C heap)"),
            ("server_ms_per_handshake", "server ms/handshake"),
            ("client_ms_per_handshake", "client ms/handshake"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
