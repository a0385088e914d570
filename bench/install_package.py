#!/usr/bin/env python3
"""How long the server takes to answer an agent install package (the console's download,
POST /api/v1/profiles/{name}/package): the first one of a tcm version, which waits for
`pip wheel` into an empty `--package-wheels` cache, and the next ones, from the cache; and
how the reactor answers `GET /api/v1/status` while the first is built.

One real `twistd tcm-server` on 127.0.0.1 with a fresh cache; every request is bounded
(--timeout). pip needs its index (or its cache) for the first build.

Usage: .venv/bin/python bench/install_package.py [--next 3] [--timeout 600]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness import Server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--next", type=int, default=3, help="packages after the first")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="tcm-bench-package-")
    server = Server(base, extra=["--package-wheels", os.path.join(base, "cache")])
    server.start()
    try:
        server.cli("profiles", "create", "bench")
        with open(os.path.join(server.state_dir, "admin.token")) as f:
            token = f.read().strip()

        def session() -> requests.Session:
            s = requests.Session()
            s.trust_env = False
            s.verify = server.ca
            s.headers["Authorization"] = f"Bearer {token}"
            return s

        url = f"{server.url}/api/v1/profiles/bench/package"
        first: dict = {}

        def build() -> None:
            started = time.monotonic()
            r = session().post(url, json={}, timeout=args.timeout)
            first.update(status=r.status_code, wheels=r.headers.get("x-tcm-wheels"))
            first.update(seconds=time.monotonic() - started, bytes=len(r.content))

        thread = threading.Thread(target=build)
        thread.start()
        status, latencies = session(), []
        while thread.is_alive():
            started = time.monotonic()
            status.get(f"{server.url}/api/v1/status", timeout=args.timeout)
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        thread.join()
        print(
            f"first package: {first['status']} wheels {first['wheels']}, "
            f"{first['bytes'] / 1e6:.1f} MB in {first['seconds']:.1f} s; GET /status meanwhile: "
            f"{len(latencies)} requests, median {statistics.median(latencies) * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms"
        )
        for _ in range(args.next):
            started = time.monotonic()
            r = session().post(url, json={}, timeout=args.timeout)
            print(
                f"next package: {r.status_code} wheels {r.headers.get('x-tcm-wheels')}, "
                f"{len(r.content) / 1e6:.1f} MB in {time.monotonic() - started:.2f} s"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
