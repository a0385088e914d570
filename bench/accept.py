#!/usr/bin/env python3
"""What accepting a connection costs the agents' listener before any byte is read: N TCP
connections that send nothing (as ten thousand agents' connections wait in the handshake
gate after a restart), the server process's CPU per accepted connection, for the listener
tcm runs (`tcm.compat.LeanTLSFactory` under the handshake watcher and gate, then the `Site`)
and, in the same run, the same stack with Twisted's own `TLSMemoryBIOFactory`; each mode in
a fresh server process, the modes alternating `--rounds` times.

Usage: .venv/bin/python bench/accept.py [--count 8000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402

MODES = ("tcm", "twisted")


def serve(mode: str, count: int) -> None:
    """One server process: listens, tells its port, prints its CPU per accepted connection
    once `count` connections were built, and stops."""
    import tempfile

    from twisted.internet import reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from tcm.compat import LeanTLSFactory
    from tcm.server.admission import HandshakeGate
    from tcm.server.ca import CertificateAuthority
    from tcm.tls.handshake import HandshakeLogger
    from tcm.tls.server import server_tls_options

    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    with tempfile.TemporaryDirectory(prefix="tcm-accept-") as d:
        ca = CertificateAuthority.load_or_create(d)
        key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
    options = server_tls_options(key_pem, cert_pem, [ca.cert_pem])
    inner = HandshakeLogger(Site(Resource()), HandshakeGate(reactor, 100))
    factory_class = LeanTLSFactory if mode == "tcm" else TLSMemoryBIOFactory
    factory = factory_class(options, False, inner)
    built = [0]
    build = factory.buildProtocol

    def counting(addr):
        built[0] += 1
        return build(addr)

    factory.buildProtocol = counting  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, backlog=4096, interface="127.0.0.1")
    print(json.dumps({"port": port.getHost().port}), flush=True)
    started: list[float] = []

    def check() -> None:
        if built[0] and not started:
            started.append(time.process_time())
        if built[0] >= count:
            cpu = time.process_time() - started[0]
            print(json.dumps({"cpu_per_accept_us": round(1e6 * cpu / count, 1)}), flush=True)
            reactor.stop()
            return
        reactor.callLater(0.01, check)

    reactor.callLater(0, check)
    reactor.callLater(120, reactor.stop)  # bounded, whatever happens
    reactor.run()


def measure(mode: str, count: int) -> float:
    server = subprocess.Popen(
        [sys.executable, __file__, "--role", "server", "--mode", mode, "--count", str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    clients: list[socket.socket] = []
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        for _ in range(count):
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            clients.append(c)
        return float(json.loads(server.stdout.readline())["cpu_per_accept_us"])
    finally:
        for c in clients:
            c.close()
        server.kill()
        server.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="tcm", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "server":
        serve(args.mode, args.count)
        return 0
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    runs: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            runs[mode].append(measure(mode, args.count))
    rows = [
        {
            "listener": "tcm (LeanTLSFactory)" if m == "tcm" else "Twisted's TLSMemoryBIOFactory",
            "connections": args.count,
            "cpu_per_accept_us": sorted(runs[m])[len(runs[m]) // 2],
            "runs_us": runs[m],
        }
        for m in MODES
    ]
    emit(
        "accept",
        rows,
        [
            ("listener", "listener"),
            ("connections", "connections"),
            ("cpu_per_accept_us", "server CPU µs per accept (median)"),
        ],
        notes=["both: the handshake watcher and gate (100) over TLS, then a Site; no byte sent"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
