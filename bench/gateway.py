#!/usr/bin/env python3
"""N agent sessions through the tcm gateway vs through nginx as a TLS-terminating WebSocket
proxy in front of the same server, side by side in one run.

For each N, one twistd tcm-server; the same enrolled agents (`tcm-agent swarm`, real agents,
several source addresses 127.0.0.x) connect first through `twistd tcm-gateway` (one upstream
link carries every session), then through nginx (Debian's, its own instance and configuration
in the work directory: TLS with client certificates from the tcm CA, WebSocket proxying to
the server over TLS with the gateway's node certificate, the agent's certificate forwarded in
X-Tcm-Client-Cert). Measured for each: the proxy's RSS per session (all its processes),
its CPU while idle (agents ping every 50 s: the window covers a ping round), the time for all
N to connect, and the push latency: job creation (server clock) to the last agent having the
request (agent clock, same machine), median of the rounds, and when the server had written
it (to the gateway's link, or to each session nginx relays).

Usage: .venv/bin/python bench/gateway.py [--counts 1000,10000] [--idle 60] [--rounds 3]
       [--work /tmp/tcm-bench-gateway]
Everything it starts, it stops; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    PYTHON,
    BenchServer,
    SwarmProcs,
    emit,
    free_port,
    run_job,
    summary,
    wait_until,
)

from tests.harness import GatewayProc  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

NGINX_CONF = """
worker_processes 2;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections 20000; use epoll; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{port} ssl reuseport backlog=4096;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    location / {{
      proxy_pass https://127.0.0.1:{upstream};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header X-Tcm-Client-Cert $ssl_client_escaped_cert;
      proxy_ssl_certificate {cert};
      proxy_ssl_certificate_key {key};
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_verify on;
      proxy_ssl_name localhost;
      proxy_ssl_session_reuse on;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
      proxy_buffering off;
    }}
  }}
}}
"""


class Nginx:
    """nginx from Debian with its own configuration and prefix in `dir`."""

    def __init__(self, dir: str, port: int, upstream: int, cert: str, key: str, ca: str):
        self.dir = dir
        self.port = port
        os.makedirs(dir, exist_ok=True)
        self.conf = os.path.join(dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(
                NGINX_CONF.format(dir=dir, port=port, upstream=upstream, cert=cert, key=key, ca=ca)
            )
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(os.path.join(self.dir, "nginx.out"), "ab")
        self.proc = subprocess.Popen(
            [NGINX, "-p", self.dir, "-c", self.conf], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                with open(os.path.join(self.dir, "error.log")) as f:
                    raise AssertionError("nginx exited: " + f.read()[-2000:])
            return len(self.procs()) >= 3

        wait_until(listening, 20, 0.1, "nginx workers")

    def procs(self) -> list[psutil.Process]:
        assert self.proc is not None
        master = psutil.Process(self.proc.pid)
        return [master, *master.children()]

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.procs())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def cpu_of(procs: list[psutil.Process], seconds: float) -> float:
    """CPU use of several processes together over `seconds`, in % of one core."""
    before = [p.cpu_times() for p in procs]
    time.sleep(seconds)
    after = [p.cpu_times() for p in procs]
    used = sum(
        (a.user - b.user) + (a.system - b.system) for a, b in zip(after, before, strict=True)
    )
    return 100.0 * used / seconds


def through(
    kind: str,
    proxy_url: str,
    proxy_procs,
    server: BenchServer,
    base: str,
    n: int,
    token: str,
    idle: float,
    rounds: int,
) -> dict:
    rss0 = sum(p.memory_info().rss for p in proxy_procs())
    swarm = SwarmProcs(base, server, n, token, extra=["--backoff-max", "5"], url=proxy_url)
    try:
        t0 = time.monotonic()
        swarm.start()
        server.wait_sessions(n, timeout=max(300, n / 10))
        connect_s = time.monotonic() - t0
        time.sleep(5)  # settle
        rss1 = sum(p.memory_info().rss for p in proxy_procs())
        cpu = cpu_of(proxy_procs(), idle)
        api = server.api()
        body = {"action": "ping", "targets": "all", "ttl": 120}
        run_job(api, body, n, 60)  # warm-up
        results = [run_job(api, body, n, 60) for _ in range(rounds)]
    finally:
        swarm.stop()
        wait_until(lambda: server.status()["sessions"] == 0, 120, 0.5, "sessions gone")
    lasts = sorted(max(r["received"]) for r in results if r["received"])
    received = [x for r in results for x in r["received"]]
    sent_lasts = sorted(max(r["sent"]) for r in results if r["sent"])
    return {
        "via": kind,
        "agents": n,
        "sessions": n,
        "connect_s": round(connect_s, 2),
        "proxy_rss_mb": round(rss1 / 2**20, 1),
        "proxy_kb_per_session": round((rss1 - rss0) / n / 1024, 1),
        "idle_cpu_pct": round(cpu, 2),
        "push_last_s": round(lasts[len(lasts) // 2], 3) if lasts else None,
        # when the server had written the request (to the link, or to every session)
        "server_sent_s": round(sent_lasts[len(sent_lasts) // 2], 3) if sent_lasts else None,
        "push": summary(received),
        "succeeded": min(r["counts"]["succeeded"] for r in results),
    }


def bench_count(n: int, idle: float, rounds: int, work: str) -> list[dict]:
    base = os.path.join(work, f"n{n}")
    os.makedirs(base, exist_ok=True)
    server = BenchServer(base, extra=["--name", "bench"])
    server.start()
    token = server.token(uses=n + 10)
    gw = GatewayProc(base, "gw", {"s": server}, extra=["--max-clients", "19500"])
    nginx: Nginx | None = None
    rows = []
    try:
        gw.start()
        if not os.path.isdir(os.path.join(base, "swarm")):  # enroll once, directly
            enroll = SwarmProcs(base, server, n, token, extra=["--backoff-max", "5"])
            enroll.start()
            server.wait_sessions(n, timeout=max(600, n / 5))
            enroll.stop()
            wait_until(lambda: server.status()["sessions"] == 0, 120, 0.5, "sessions gone")
        gw_ps = psutil.Process(gw.proc.pid)  # type: ignore[union-attr]
        rows.append(
            through("tcm-gateway", gw.url, lambda: [gw_ps], server, base, n, token, idle, rounds)
        )
        node = os.path.join(gw.state_dir, "upstreams", "s")
        nginx = Nginx(
            os.path.join(base, "nginx"),
            free_port(),
            server.port,
            os.path.join(node, "cert.pem"),
            os.path.join(node, "key.pem"),
            server.ca,
        )
        nginx.start()
        rows.append(through("nginx", nginx.url, nginx.procs, server, base, n, token, idle, rounds))
    finally:
        if nginx is not None:
            nginx.stop()
        gw.stop()
        server.stop()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1000,10000")
    p.add_argument("--idle", type=float, default=60.0, help="seconds of idle CPU sampling")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="/tmp/tcm-bench-gateway")
    p.add_argument("--fresh", action="store_true", help="forget earlier identities first")
    args = p.parse_args()
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    rows = [
        r
        for n in args.counts.split(",")
        for r in bench_count(int(n), args.idle, args.rounds, args.work)
    ]
    emit(
        "gateway",
        rows,
        [
            ("via", "via"),
            ("agents", "agents"),
            ("connect_s", "connect s"),
            ("proxy_kb_per_session", "proxy KB/session"),
            ("proxy_rss_mb", "proxy MB"),
            ("idle_cpu_pct", "proxy idle CPU %"),
            ("server_sent_s", "server sent s"),
            ("push_last_s", "push last s"),
            ("push.p50", "push p50 s"),
            ("succeeded", "ok"),
        ],
        [
            f"command: {PYTHON} bench/gateway.py --counts {args.counts} --idle {args.idle} "
            f"--rounds {args.rounds}"
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
