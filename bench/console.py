"""The web console at scale: a real `twistd tcm-server`, N real agents (`tcm-agent swarm`),
and Debian's chromium driven by Playwright.

Measured:
- endpoints page: from navigation to every one of the N agents in the (virtualized) table
  (the page's own clock, `performance.now()`, and wall time), and how long a scroll to the
  last row takes to show it;
- job page: a `ping` to all N agents created through the API while the job page is open;
  from the last result stored (the server's `stored_at`, same machine clock) to the page
  showing N succeeded, with no reload;
- the browser's memory (the page's JS heap and DOM nodes, Chrome's Performance metrics) and
  the server's CPU seconds for the job with the page watching.

Run under the shared bench lock (10,000 agents):
    flock /work/wt/_notes/bench.lock .venv/bin/python bench/console.py --agents 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import BenchServer, SwarmProcs, emit  # noqa: E402
from tests.harness import launch_chromium  # noqa: E402


def heap(page, cdp) -> dict:
    metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    return {
        "js_heap_mib": round(metrics.get("JSHeapUsedSize", 0) / 2**20, 1),
        "dom_nodes": int(metrics.get("Nodes", 0)),
        "browser_uss_mib": browser_uss_mib(),
    }


def browser_uss_mib() -> float:
    """The memory of every chromium process this bench started (browser, renderer, GPU,
    network service), in MiB: the sum of their unique set sizes (pages only that process
    has; shared libraries not counted once per process)."""
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name():
                total += child.memory_full_info().uss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def measure(n: int, work: str, timeout: float) -> dict:
    from playwright.sync_api import sync_playwright

    server = BenchServer(work, extra=[])
    server.start()
    with open(os.path.join(server.state_dir, "admin.token")) as f:
        admin = f.read().strip()
    swarm = SwarmProcs(work, server, n, server.token(uses=n + 10), extra=["--backoff-max", "5"])
    row: dict = {"agents": n}
    try:
        swarm.start()
        server.wait_sessions(n, timeout=max(300, n / 20))
        time.sleep(2)
        with sync_playwright() as p:
            browser = launch_chromium(p)
            context = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1400, "height": 900}
            )
            page = context.new_page()
            page.set_default_timeout(timeout * 1000)
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            cdp = context.new_cdp_session(page)
            cdp.send("Performance.enable")
            page.goto(f"{server.url}/console/")
            page.get_by_label("API token").fill(admin)
            page.get_by_role("button", name="Sign in").click()
            page.locator("#whoami").wait_for()

            # -- the endpoints page: first render of all N rows
            t0 = time.monotonic()
            page.goto(f"{server.url}/console/endpoints")
            page.wait_for_function(
                f"() => (document.querySelector('#endpoint-counts')?.textContent || '')"
                f".startsWith('{n} shown')",
                polling=50,
            )
            row["endpoints_wall_s"] = round(time.monotonic() - t0, 3)
            row["endpoints_page_ms"] = round(page.evaluate("performance.now()"), 1)
            row["endpoints_rows_in_dom"] = page.locator(".vt-body .vt-row").count()
            t1 = time.monotonic()
            page.evaluate(
                "() => { const v = document.querySelector('.vt-viewport');"
                " v.scrollTop = v.scrollHeight; }"
            )
            page.wait_for_function(
                "() => { const v = document.querySelector('.vt-viewport');"
                " const rows = document.querySelectorAll('.vt-body .vt-row');"
                " return rows.length && v.scrollTop > 0 &&"
                " rows[rows.length - 1].getBoundingClientRect().top <"
                " v.getBoundingClientRect().bottom; }",
                polling="raf",
            )
            row["scroll_to_end_ms"] = round(1000 * (time.monotonic() - t1), 1)
            row.update({f"endpoints_{k}": v for k, v in heap(page, cdp).items()})

            # -- a job to all N, watched live on its page
            api = server.api()
            ps = server.ps()
            cpu0 = ps.cpu_times()
            created = api.call("POST", "/jobs", {"action": "ping", "targets": "all", "ttl": 600})
            job_id = created["job"]
            page.goto(f"{server.url}/console/jobs/{job_id}")
            page.evaluate("window.__no_reload = 1")
            page.wait_for_function(
                "() => document.querySelector('[data-count=\"succeeded\"] .n')?.textContent"
                f" === '{n}'",
                polling=50,
            )
            shown = time.time()
            stats = page.evaluate("window.tcmStats")
            cpu1 = ps.cpu_times()
            assert page.evaluate("window.__no_reload") == 1, "the job page reloaded"
            job = api.call("GET", f"/jobs/{job_id}")
            stored = [r["stored_at"] for r in job["results"] if r["stored_at"]]
            row["job_succeeded"] = job["counts"]["succeeded"]
            row["last_stored_s"] = round(max(stored) - job["created_at"], 3)
            row["page_all_succeeded_after_last_stored_s"] = round(shown - max(stored), 3)
            # when the page's stream got its last batch: the server's part of that lag
            last_batch = stats["lastBatchAt"]  # None: the snapshot already had every result
            row["last_batch_after_last_stored_s"] = (
                None if last_batch is None else round(last_batch - max(stored), 3)
            )
            row["job_page_batches"] = stats["batches"]
            row["job_page_events"] = stats["events"]
            row["job_page_resyncs"] = stats["resyncs"]
            row["server_cpu_s_job"] = round(
                (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), 2
            )
            row["server_cpu_ms_per_agent"] = round(1000 * row["server_cpu_s_job"] / n, 3)
            row.update({f"job_{k}": v for k, v in heap(page, cdp).items()})
            row["browser_errors"] = len(errors)
            browser.close()
    finally:
        swarm.stop()
        server.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed path)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="tcm-bench-console-")
    try:
        row = measure(args.agents, work, args.timeout)
    finally:
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    emit(
        "console",
        [row],
        [
            ("agents", "agents"),
            ("endpoints_page_ms", "endpoints page ms"),
            ("endpoints_wall_s", "wall s"),
            ("scroll_to_end_ms", "scroll ms"),
            ("endpoints_js_heap_mib", "heap MiB"),
            ("last_stored_s", "last stored s"),
            ("page_all_succeeded_after_last_stored_s", "page lag s"),
            ("job_js_heap_mib", "job heap MiB"),
            ("job_dom_nodes", "DOM nodes"),
            ("job_browser_uss_mib", "browser USS MiB"),
            ("server_cpu_ms_per_agent", "server CPU ms/agent"),
        ],
    )


if __name__ == "__main__":
    main()
