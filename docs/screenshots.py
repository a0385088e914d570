"""Make the web console's screenshots in docs/console/: a real `twistd tcm` (all-in-one)
with real agents, Debian's chromium driven by Playwright.

    .venv/bin/python docs/screenshots.py [--agents 4] [--out docs/console]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

from tcm.tls import pki  # noqa: E402
from tests.harness import Server, launch_chromium, start_agents  # noqa: E402

HOSTILE = "<img src=x onerror=alert(1)>"


def shoot(base: str, out: str, n: int) -> list[str]:
    from playwright.sync_api import sync_playwright

    server = Server(base, plugin="tcm")
    server.start()
    agents = start_agents(base, server, n)
    made: list[str] = []
    try:
        r = requests.post(
            f"{server.url}/agent/v1/enroll",
            json={
                "token": server.token(uses=1),
                "csr": pki.make_csr(pki.generate_key()).decode(),
                "hostname": HOSTILE,
            },
            verify=server.ca,
            timeout=30,
        )
        r.raise_for_status()
        server.cli("targets", "create", "linux", "--filter", 'platform == "linux"')
        ids = ",".join(a.agent_id for a in agents)
        server.cli("run", "inventory.collect", "--targets", ids, "--wait", "--wait-timeout", "60")
        with open(os.path.join(server.state_dir, "admin.token")) as f:
            admin = f.read().strip()
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_context(
                ignore_https_errors=True, viewport={"width": 1360, "height": 820}
            ).new_page()
            page.set_default_timeout(30_000)

            def snap(name: str) -> None:
                path = os.path.join(out, f"{name}.png")
                page.screenshot(path=path)
                made.append(os.path.relpath(path, ROOT))

            page.goto(f"{server.url}/console/")
            page.get_by_label("API token").fill("")
            snap("signin")
            page.get_by_label("API token").fill(admin)
            page.get_by_role("button", name="Sign in").click()
            page.locator('[data-count="persistent"]').wait_for()
            page.wait_for_function(
                f"() => document.querySelector('[data-count=\"persistent\"] .n')?"
                f".textContent === '{n}'"
            )
            snap("overview")
            page.get_by_role("link", name="Endpoints").click()
            page.locator(".vt-body .vt-row").first.wait_for()
            snap("endpoints")  # all agents, the hostile hostname among them (as text)
            page.locator("#filter").fill("online and platfrom = 1")
            page.get_by_role("button", name="Filter", exact=True).click()
            page.locator(".filter-error .msg-error").wait_for()
            snap("endpoints-filter-error")
            page.locator("#filter").fill("online")
            page.get_by_role("button", name="Filter", exact=True).click()
            page.wait_for_function(
                f"() => document.querySelector('#endpoint-counts').textContent"
                f".startsWith('{n} shown')"
            )
            for a in agents:
                page.locator(f'.vt-row[data-key="{a.agent_id}"] input[type="checkbox"]').check()
            snap("endpoints-selection")
            page.get_by_role("button", name="Run action on selection").click()
            page.locator("#action").select_option("command.run")
            script = "for i in 1 2 3; do echo step $i on $(hostname); sleep 0.5; done"
            page.locator("#arg-argv").fill(f"sh\n-c\n{script}")
            snap("run")
            page.get_by_role("button", name="Run", exact=True).click()
            page.wait_for_url("**/console/jobs/*")
            page.wait_for_function(
                f"() => document.querySelector('[data-count=\"succeeded\"] .n')?"
                f".textContent === '{n}'"
            )
            page.locator(f'.vt-row[data-key="{agents[0].agent_id}"]').click()
            snap("job")
            page.get_by_role("link", name="Inventory").click()
            page.get_by_role("heading", name="Per class").wait_for()
            snap("inventory")
            page.get_by_role("link", name="Settings").click()
            page.get_by_role("heading", name="Approval queue").wait_for()
            snap("settings")
            page.get_by_role("link", name="Audit").click()
            page.locator("table.grid").wait_for()
            snap("audit")
            browser.close()
    finally:
        for a in agents:
            a.stop()
        server.stop()
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "console"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    base = tempfile.mkdtemp(prefix="tcm-screenshots-")
    try:
        print(json.dumps(shoot(base, args.out, args.agents)))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
