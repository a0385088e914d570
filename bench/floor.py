#!/usr/bin/env python3
"""The floor of this stack: a minimal Twisted + Autobahn TLS server broadcasting one prepared
message to N WebSocket connections, with no tcm code in the path.

`python bench/floor.py --count N` starts one server process (ECDSA P-256 certificate, like
tcm's) and client processes (up to 9,000 connections each, over several loopback source
addresses), waits until all N are open, broadcasts once, and prints the arrival times
(client clock minus the send time written in the message: one machine, one clock). Each
client then answers with a message the size of a tcm `ping` result and the server answers
each with one the size of its acknowledgement: the server process's CPU from the broadcast
until the last answer is sent, per answer (`cpu_per_result_ms`), is the floor of a result's
cost — a TLS record and WebSocket frame in, one out — with nothing stored.

`python bench/floor.py --connect --count N` is the floor of a reconnect: the server
requires a client certificate (tcm's own server TLS options and a client certificate of its
CA, like an agent's), each client opens a WebSocket, sends one message and gets one back;
the figure is the server process's CPU per connection (`floor_cpu_per_connect_ms`).

Roles --role server / --role clients are the child processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PER_PROCESS = 9000
# A `ping` job's result as a tcm agent sends it, and the server's acknowledgement (sizes as
# on the wire: the floor's cost per result is for messages of the same size).
RESULT = json.dumps(
    {
        "type": "request",
        "id": "r1" + "0" * 30,
        "method": "POST",
        "path": "/api/v1/jobs/" + "0" * 32 + "/results",
        "body": {"status": "succeeded", "exit_code": 0, "output": {"pong": True}, "x": "0" * 90},
    }
).encode()
ACK = json.dumps({"type": "response", "id": "r1" + "0" * 30, "status": 200, "body": {}}).encode()


def serve(args) -> int:
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor, ssl
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.internet.stdio import StandardIO
    from twisted.protocols.basic import LineReceiver

    from tcm.process import raise_descriptor_limit
    from tcm.server.ca import CertificateAuthority

    raise_descriptor_limit()
    ca = CertificateAuthority.load_or_create(args.dir)
    key_pem, cert_pem = ca.issue_server_certificate(["127.0.0.1"])
    from tcm.tls import pki

    if args.mtls:  # as tcm's server: client certificates of the CA verified
        from tcm.tls.server import server_tls_options

        options = server_tls_options(key_pem, cert_pem, [ca.cert_pem], groups=args.tls_groups)
        key = pki.generate_key()
        with open(os.path.join(args.dir, "client.pem"), "wb") as f:
            f.write(ca.sign_csr(pki.make_csr(key), "floor-client"))
        with open(os.path.join(args.dir, "client.key"), "wb") as f:
            f.write(pki.key_to_pem(key))
    else:
        options = ssl.CertificateOptions(
            privateKey=pki.load_key(key_pem),
            certificate=pki.load_certificate(cert_pem),
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )
    conns: list = []
    push = {"expected": 0, "answered": 0, "cpu0": 0.0}

    def cpu_now() -> float:
        t = os.times()
        return t.user + t.system

    class Proto(WebSocketServerProtocol):
        def onOpen(self):
            conns.append(self)

        def onMessage(self, payload, is_binary):
            if args.mtls:
                self.sendMessage(payload, is_binary)  # one message each way
                return
            self.sendMessage(ACK)  # a result in, its acknowledgement out
            push["answered"] += 1
            if push["answered"] == push["expected"]:
                done = {"answered": push["answered"], "cpu_s": cpu_now() - push["cpu0"]}
                print(json.dumps(done), flush=True)

        def onClose(self, *a):
            if self in conns:
                conns.remove(self)

    factory = WebSocketServerFactory(f"wss://127.0.0.1:{args.port}")
    factory.protocol = Proto
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line):
            if line == b"count":
                self.sendLine(str(len(conns)).encode())
            elif line == b"cpu":
                t = os.times()
                self.sendLine(str(t.user + t.system).encode())
            elif line == b"go":
                push["expected"], push["answered"], push["cpu0"] = len(conns), 0, cpu_now()
                sent = time.time()
                prepared = factory.prepareMessage(json.dumps({"t": sent}).encode())
                for c in conns:
                    c.sendPreparedMessage(prepared)
                self.sendLine(
                    json.dumps(
                        {"sent": sent, "to": len(conns), "send_s": time.time() - sent}
                    ).encode()
                )

    StandardIO(Control())
    SSL4ServerEndpoint(reactor, args.port, options, interface="127.0.0.1", backlog=2048).listen(
        factory
    )
    print(json.dumps({"ready": True}), flush=True)
    reactor.run()
    return 0


def clients(args) -> int:
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet import reactor, ssl
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    from tcm.process import raise_descriptor_limit

    raise_descriptor_limit()
    with open(os.path.join(args.dir, "ca.pem"), "rb") as f:
        ca_pem = f.read()
    ca = ssl.Certificate.loadPEM(ca_pem)
    if args.mtls:
        from tcm.tls import pki

        with open(os.path.join(args.dir, "client.pem"), "rb") as f:
            client_pem = f.read()
        with open(os.path.join(args.dir, "client.key"), "rb") as f:
            client_key = f.read()
        creator = pki.client_tls_options("127.0.0.1", ca_pem, client_pem, client_key)
    else:
        creator = ssl.optionsForClientTLS("127.0.0.1", trustRoot=ca)
    arrivals: list[float] = []
    opened = [0]
    echoed = [0]
    acked = [0]

    class Proto(WebSocketClientProtocol):
        was_open = False

        def onOpen(self):
            self.was_open = True
            opened[0] += 1
            if args.mtls:
                self.sendMessage(b'{"type":"hello"}')
            if opened[0] == args.count:
                print(json.dumps({"opened": opened[0]}), flush=True)

        def onMessage(self, payload, is_binary):
            if args.mtls:
                echoed[0] += 1
                if echoed[0] == args.count:
                    print(json.dumps({"echoed": echoed[0]}), flush=True)
                return
            if payload.startswith(b'{"type": "response"'):  # our result's acknowledgement
                acked[0] += 1
                if acked[0] == args.count:
                    reactor.callLater(0.5, reactor.stop)
                return
            arrivals.append(time.time() - json.loads(payload)["t"])
            self.sendMessage(RESULT)
            if len(arrivals) == args.count:
                print(json.dumps({"arrivals": arrivals}), flush=True)

        def onClose(self, was_clean, code, reason):
            if not self.was_open:  # refused or dropped under the burst: once more, later
                retry()

    retries = [0]

    def retry() -> None:
        retries[0] += 1
        reactor.callLater(0.5 + random.random(), connect, retries[0])

    factory = WebSocketClientFactory(f"wss://127.0.0.1:{args.port}")
    factory.protocol = Proto
    factory.setProtocolOptions(autoPingInterval=0, failByDrop=False)
    sources = [f"127.0.1.{i}" for i in range(1, 17)]

    def connect(i: int) -> None:
        ep = HostnameEndpoint(
            reactor, "127.0.0.1", args.port, bindAddress=(sources[i % len(sources)], 0)
        )
        wrapClientTLS(creator, ep).connect(factory).addErrback(lambda f: retry())

    def start(i=0):
        for j in range(i, min(args.count, i + 50)):
            connect(j)
        if i + 50 < args.count:
            reactor.callLater(0.02, start, i + 50)

    reactor.callWhenRunning(start)
    reactor.callLater(args.timeout, reactor.stop)
    reactor.run()
    return 0


def measure(count: int, timeout: float = 180.0) -> dict:
    """Run one broadcast to `count` connections; the arrival figures."""
    sys.path.insert(0, ROOT)
    from tests.harness import free_port

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tcm-floor-") as d:
        server = subprocess.Popen(
            [sys.executable, __file__, "--role", "server", "--port", str(port), "--dir", d],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert server.stdout is not None
        assert json.loads(server.stdout.readline()).get("ready")
        procs = []
        left = count
        while left > 0:
            n = min(PER_PROCESS, left)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--role",
                        "clients",
                        "--port",
                        str(port),
                        "--dir",
                        d,
                        "--count",
                        str(n),
                        "--timeout",
                        str(timeout),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                )
            )
            left -= n
        try:
            t0 = time.monotonic()
            for p in procs:
                assert p.stdout is not None
                line = p.stdout.readline()
                assert json.loads(line).get("opened"), line
            connect_s = time.monotonic() - t0
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write("go\n")
            server.stdin.flush()
            sent = json.loads(server.stdout.readline())
            arrivals: list[float] = []
            for p in procs:
                assert p.stdout is not None
                arrivals.extend(json.loads(p.stdout.readline())["arrivals"])
            answered = json.loads(server.stdout.readline())  # every result acknowledged
        finally:
            for p in procs:
                p.kill()
            server.kill()
    arrivals.sort()
    return {
        "count": count,
        "connect_s": connect_s,
        "send_loop_s": sent["send_s"],
        "p50": arrivals[len(arrivals) // 2],
        "p99": arrivals[int(len(arrivals) * 0.99) - 1],
        "last": arrivals[-1],
        "cpu_s": answered["cpu_s"],
        "cpu_per_result_ms": 1000 * answered["cpu_s"] / answered["answered"],
    }


def measure_connect(count: int, timeout: float = 300.0, tls_groups: str | None = None) -> dict:
    """`count` clients connect once each (mutual TLS, WebSocket upgrade, one message each
    way): the server process's CPU seconds from its start being done until every client
    got its answer, and per connection."""
    sys.path.insert(0, ROOT)
    from tests.harness import free_port

    port = free_port()
    extra = ["--mtls"] + (["--tls-groups", tls_groups] if tls_groups else [])
    with tempfile.TemporaryDirectory(prefix="tcm-floor-") as d:
        server = subprocess.Popen(
            [sys.executable, __file__, "--role", "server", "--port", str(port), "--dir", d] + extra,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        procs = []
        try:
            assert server.stdin is not None and server.stdout is not None
            assert json.loads(server.stdout.readline()).get("ready")
            server.stdin.write("cpu\n")
            server.stdin.flush()
            cpu0 = float(server.stdout.readline())
            t0 = time.monotonic()
            left = count
            while left > 0:
                n = min(PER_PROCESS, left)
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--role", "clients", "--port", str(port)]
                        + ["--dir", d, "--count", str(n), "--timeout", str(timeout)]
                        + extra,
                        stdout=subprocess.PIPE,
                        text=True,
                        bufsize=1,
                    )
                )
                left -= n
            for p in procs:
                assert p.stdout is not None
                assert json.loads(p.stdout.readline()).get("opened")
                assert json.loads(p.stdout.readline()).get("echoed")
            wall = time.monotonic() - t0
            server.stdin.write("cpu\n")
            server.stdin.flush()
            cpu1 = float(server.stdout.readline())
        finally:
            for p in procs:
                p.kill()
            server.kill()
    return {
        "count": count,
        "connect_all_s": round(wall, 2),
        "floor_cpu_s": round(cpu1 - cpu0, 3),
        "floor_cpu_per_connect_ms": round(1000 * (cpu1 - cpu0) / count, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=["server", "clients"])
    p.add_argument("--mtls", action="store_true", help="client certificates (--connect)")
    p.add_argument("--connect", action="store_true", help="measure connections, not a push")
    p.add_argument("--tls-groups", default=None)
    p.add_argument("--port", type=int)
    p.add_argument("--dir")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=180.0)
    args = p.parse_args()
    if args.role == "server":
        return serve(args)
    if args.role == "clients":
        return clients(args)
    if args.connect:
        print(json.dumps(measure_connect(args.count, args.timeout, args.tls_groups)))
        return 0
    print(json.dumps(measure(args.count, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
